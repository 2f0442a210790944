"""The two steps every study notebook repeats: prepare the splits, then train and evaluate a model.

Notebooks call these instead of writing loops: :func:`open_study` returns patient-level
train/val/test datasets and the notebook's :class:`~cxrstudy.outputs.Outputs` (the split saved
as ``splits.csv``), and :func:`train_and_evaluate` trains one
model with the shared trainer, evaluates it on the test split with bootstrap CIs, and writes its
history, checkpoint and predictions under the notebook's output folder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .data import CXRDataset, load_dataset
from .data.splits import subsample_dataset
from .outputs import Outputs

if TYPE_CHECKING:  # the schedule's type (train is imported when a model trains)
    from .train import Schedule


@dataclass
class StudyData:
    """Patient-level train/val/test splits of one dataset at one image size."""

    train: CXRDataset
    val: CXRDataset
    test: CXRDataset
    classes: list[str]
    image_size: int
    dataset: str
    synthetic: bool = False
    #: image id → why it was left out (missing or undecodable file); empty when none was
    dropped_images: dict[str, str] = field(default_factory=dict)

    def split_table(self) -> pd.DataFrame:
        frames = []
        for name in ("train", "val", "test"):
            part = getattr(self, name).records[["image_id", "patient_id"]].copy()
            part["split"] = name
            frames.append(part)
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> pd.DataFrame:
        rows = []
        for name in ("train", "val", "test"):
            part = getattr(self, name)
            positives = np.nansum(part.labels == 1, axis=0)
            rows.append({"split": name, "images": len(part),
                         "patients": part.records["patient_id"].nunique(),
                         "classes with no positive": int((positives == 0).sum())})
        return pd.DataFrame(rows)


def prepare_data(dataset: str, data_root=None, image_size: int = 224, *, seed: int = 0,
                 max_images: int | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, cache: bool = True, progress: bool = True,
                 **options) -> StudyData:
    """Load ``dataset``, optionally keep ``max_images`` (whole patients), split by patient.

    The split comes from the release's official lists when present, else a seeded patient-level
    split. Images that could not be read are left out (an error when the dataset is strict, see
    ``load_dataset``) and listed in ``data.dropped_images``; :func:`open_study` also records
    them and the split in the notebook's results folder, so a run never drops images silently.
    """
    full = load_dataset(dataset, data_root, split="all", image_size=image_size, seed=seed,
                        val_fraction=val_fraction, test_fraction=test_fraction, **options)
    full = subsample_dataset(full, max_images, seed)
    assignment = np.asarray(full.split_assignment)
    if cache:
        from .data.cache import attach_cache

        ids_before = full.records["image_id"].to_numpy()
        full = attach_cache(full, progress=progress)
        kept = pd.Index(ids_before).get_indexer(full.records["image_id"])
        assignment = assignment[kept]  # rows dropped as unreadable leave the split too
    parts = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(assignment == name)
        if len(rows) == 0:
            raise ValueError(f"{dataset}: the {name} split is empty with max_images={max_images}; "
                             "use more images or other split fractions")
        parts[name] = full.subset(rows, split_name=name)
    data = StudyData(classes=list(full.classes), image_size=int(image_size), dataset=dataset,
                     synthetic=bool(getattr(full, "synthetic", False)),
                     dropped_images=dict(getattr(full, "dropped_images", {})), **parts)
    return data


def record_data(data: StudyData, out: Outputs, caption: str) -> None:
    """What every study notebook keeps of its data: ``splits.csv`` (each image's patient and
    split, which later notebooks check before reusing a model), the images dropped as
    unreadable (``dropped_images`` in ``metrics.json``) and the ``splits`` table."""
    out.save_splits(data.split_table())
    out.save_metrics(dropped_images=data.dropped_images)
    out.save_table(data.summary(), "splits", caption=caption)


def open_study(output_dir, dataset: str, data_root=None, image_size: int = 224, *,
               seed: int = 0, max_images: int | None = None, caption_note: str = "",
               **options) -> tuple[StudyData, Outputs]:
    """A study notebook's first step in one call: the data (:func:`prepare_data`, ``options``
    included), then its results folder, told whether the data is synthetic, with the split
    recorded (:func:`record_data`). ``caption_note`` is added to the splits table's caption
    (e.g. ``"views: frontal"``)."""
    data = prepare_data(dataset, data_root, image_size, seed=seed, max_images=max_images, **options)
    out = Outputs(output_dir, synthetic=data.synthetic)
    note = f", {caption_note}" if caption_note else ""
    record_data(data, out, caption=f"Patient-level splits of {dataset} (seed {seed}{note})")
    return data, out


@dataclass
class RunResult:
    """One trained model's test-set evaluation and where its artefacts went."""

    tag: str
    model_name: str
    model: torch.nn.Module
    history: pd.DataFrame
    probs: np.ndarray
    targets: np.ndarray
    masks: np.ndarray
    patient_ids: np.ndarray
    per_class: pd.DataFrame
    overall: dict[str, Any]
    n_params: int
    train_seconds: float
    checkpoint_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)


def make_loaders(data: StudyData, batch_size: int, seed: int, num_workers: int = 0):
    from .data.loader import BatchLoader

    pin = torch.cuda.is_available()  # page-locked batches let the copies to the GPU overlap
    train = BatchLoader(data.train, batch_size, shuffle=True, seed=seed, drop_last=False,
                        num_workers=num_workers, pin_memory=pin)
    val = BatchLoader(data.val, batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin)
    test = BatchLoader(data.test, batch_size, shuffle=False, num_workers=num_workers,
                       pin_memory=pin)
    return train, val, test


def first_batch(data: StudyData, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The first batch of the training loader :func:`train_and_evaluate` builds with this
    ``batch_size`` and ``seed``, as it comes off the loader (before augmentation): ``image``
    [B, 1, S, S], ``target`` and ``mask`` [B, C], ``index`` (rows of ``data.train``)."""
    train, _, _ = make_loaders(data, batch_size, seed)
    return next(iter(train))


def initial_model(name: str, data: StudyData, *, seed: int = 0, pretrained: bool = False,
                  **model_kwargs) -> torch.nn.Module:
    """Registry model ``name`` for ``data`` as :func:`train_and_evaluate` builds it before
    training (the same seed, so the same initial weights)."""
    from .models import create_model
    from .train import seed_everything

    seed_everything(seed)
    return create_model(name, num_classes=len(data.classes), in_chans=1,
                        image_size=data.image_size, pretrained=pretrained, **model_kwargs)


def shared_test_targets(runs: dict[str, RunResult]) -> tuple[np.ndarray, np.ndarray]:
    """The test targets and label masks every run of ``runs`` was evaluated on, for a figure
    or test that sets the runs side by side (ROC curves, DeLong); refused unless every run
    holds the same test rows, in the same order."""
    if not runs:
        raise ValueError("no runs")
    (first_tag, first), *others = runs.items()
    for tag, run in others:
        same = all(np.array_equal(getattr(run, part), getattr(first, part))
                   for part in ("patient_ids", "targets", "masks"))
        if not same:
            raise ValueError(f"run {tag!r} was tested on other rows than {first_tag!r}: their "
                             f"predictions cannot be compared image by image")
    return first.targets, first.masks


def train_and_evaluate(model: str | torch.nn.Module, data: StudyData, out: Outputs,
                       schedule: Schedule | None = None, *, tag: str | None = None,
                       seed: int = 0, n_boot: int = 1000, pretrained: bool = False,
                       loss: str | Any = "bce", trainer_cls=None, trainer_kwargs: dict | None = None,
                       model_kwargs: dict | None = None, progress: bool = True,
                       channels_last: bool = True, compile: bool = False,
                       cpu: bool = False) -> RunResult:
    """Train ``model`` (a registry name or a built module) on ``data`` and evaluate on its test split.

    ``schedule`` (:class:`cxrstudy.train.Schedule`, its defaults when None) says how: epochs,
    batch size, learning rate, ..., augmentation, and how many processes. ``seed`` seeds the
    model's initialisation, the data order, the augmentation and the bootstrap of ``n_boot``
    resamples.

    Checkpoints go to ``<output_dir>/checkpoints/<tag>/`` (resumed when a same-config run was
    interrupted), the history to ``tables/history_<tag>.csv`` and the test predictions to
    ``predictions/<tag>.npz`` so later notebooks (DeLong tests, explainability) can reuse them.
    ``channels_last`` (CUDA only) and ``compile`` change speed, not results; ``cpu`` keeps the
    run on the CPU where a GPU exists.

    The schedule's ``num_processes`` > 1, or an Accelerate config file naming several machines
    (its ``accelerate_config``), trains data-parallel (DDP): that many processes are forked from
    this one (:mod:`cxrstudy.train.launch`), each takes a slice of every global batch of
    ``batch_size``, and the test predictions are gathered from all of them. This process then
    holds the trained weights on the CPU and writes the same files as a one-process run; it must
    not have used CUDA before (a forked process cannot inherit a CUDA context).
    """
    from .train import Schedule, seed_everything
    from .train.launch import plan_launch

    schedule = Schedule() if schedule is None else schedule
    plan = plan_launch(schedule.num_processes, schedule.accelerate_config)
    if isinstance(model, str):
        model_name = model
        model = initial_model(model_name, data, seed=seed, pretrained=pretrained,
                              **(model_kwargs or {}))
    else:
        seed_everything(seed)
        model_name = getattr(model, "cxr_config", {}).get("name", type(model).__name__)
    tag = tag or model_name
    checkpoint_dir = out.checkpoint_dir(tag)

    def build_trainer():
        from .train import Trainer, make_loss

        config = schedule.train_config(seed=seed, checkpoint_dir=str(checkpoint_dir), resume=True,
                                       progress=progress, channels_last=channels_last,
                                       compile=compile, cpu=cpu)
        loss_fn = make_loss(loss) if isinstance(loss, str) else loss
        return (trainer_cls or Trainer)(model, config, loss_fn=loss_fn,
                                        augment=schedule.augmenter(seed),
                                        class_names=data.classes, **(trainer_kwargs or {}))

    def fit_and_predict() -> tuple[Any, dict[str, Any]]:
        trainer = build_trainer()
        train_loader, val_loader, test_loader = make_loaders(data, schedule.batch_size, seed,
                                                             schedule.num_workers)
        start = time.perf_counter()
        history = trainer.fit(train_loader, val_loader)
        train_seconds = time.perf_counter() - start
        best_epoch = None
        if (checkpoint_dir / "best.pt").is_file():  # model selection on validation macro AUC
            best_epoch = int(trainer.load_best().get("epoch", 0)) or None
        return trainer, {"history": history, "train_seconds": train_seconds,
                         "best_epoch": best_epoch, "predictions": trainer.predict(test_loader)}

    if plan.distributed:
        result = _fit_and_predict_data_parallel(fit_and_predict, plan)
        eval_model = _load_trained_weights(model, checkpoint_dir)
    else:
        trainer, result = fit_and_predict()
        eval_model = trainer.eval_model
    return _evaluate_and_save(result, data, out, tag=tag, model_name=model_name, model=model,
                              eval_model=eval_model, checkpoint_dir=checkpoint_dir,
                              n_boot=n_boot, seed=seed)


def _fit_and_predict_data_parallel(fit_and_predict, plan) -> dict[str, Any]:
    """Run ``fit_and_predict`` in every process of ``plan``; return what process 0 of this
    machine measured (each process holds the same history and the gathered predictions)."""
    import pickle
    import shutil
    import tempfile

    from .train.launch import launch

    handoff_dir = Path(tempfile.mkdtemp(prefix="cxrstudy-ddp-"))
    handoff = handoff_dir / "result.pkl"
    try:
        launch(_hand_off, args=(fit_and_predict, str(handoff)), plan=plan)
        if not handoff.is_file():
            raise RuntimeError("the data-parallel run ended without handing back its results")
        with handoff.open("rb") as stream:
            return pickle.load(stream)
    finally:
        shutil.rmtree(handoff_dir, ignore_errors=True)


def _hand_off(fit_and_predict, path: str) -> None:
    """In each launched process: train and predict; this machine's first process writes what
    the notebook's process needs (history, timing, best epoch, test predictions) to ``path``."""
    import pickle

    trainer, result = fit_and_predict()
    if trainer.accelerator.is_local_main_process:
        with open(path, "wb") as stream:
            pickle.dump(result, stream)
    trainer.accelerator.wait_for_everyone()


def _load_trained_weights(model: torch.nn.Module, checkpoint_dir: Path) -> torch.nn.Module:
    """The weights a data-parallel run evaluated (EMA when on), from its checkpoint, into
    ``model`` on the CPU: best.pt, or last.pt where no epoch improved the validation AUC."""
    from .train import load_checkpoint

    for name in ("best.pt", "last.pt"):
        if (checkpoint_dir / name).is_file():
            payload = load_checkpoint(checkpoint_dir / name)
            weights = payload.get("ema") if payload.get("ema") is not None else payload["model"]
            model.load_state_dict(weights)
            return model
    raise FileNotFoundError(f"the data-parallel run left no checkpoint in {checkpoint_dir}")


def _evaluate_and_save(result: dict[str, Any], data: StudyData, out: Outputs, *, tag: str,
                       model_name: str, model: torch.nn.Module, eval_model: torch.nn.Module,
                       checkpoint_dir: Path, n_boot: int, seed: int) -> RunResult:
    """Test metrics with bootstrap CIs; the history table and the test predictions on disk."""
    from .metrics import summarize
    from .models import count_parameters

    history, predictions = result["history"], result["predictions"]
    patient_ids = data.test.patient_ids[np.asarray(predictions.indices)]
    per_class, overall = summarize(predictions.targets, predictions.probs, data.classes,
                                   mask=predictions.masks, patient_ids=patient_ids,
                                   n_boot=n_boot, seed=seed)
    out.save_table(history, f"history_{tag}", caption=f"Training history of {tag}")
    predictions_file = out.predictions_file(tag)
    predictions_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(predictions_file, probs=predictions.probs, targets=predictions.targets,
                        masks=predictions.masks,
                        image_ids=data.test.records["image_id"].to_numpy()[np.asarray(predictions.indices)],
                        patient_ids=patient_ids, classes=np.asarray(data.classes))
    return RunResult(tag=tag, model_name=model_name, model=eval_model, history=history,
                     probs=predictions.probs, targets=predictions.targets, masks=predictions.masks,
                     patient_ids=patient_ids, per_class=per_class, overall=overall,
                     n_params=count_parameters(model), train_seconds=result["train_seconds"],
                     checkpoint_dir=checkpoint_dir, extra={"best_epoch": result["best_epoch"]})
