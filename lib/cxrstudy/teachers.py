"""Teachers for knowledge distillation: torchxrayvision's CheXpert DenseNet, or one of our runs.

Every teacher here is an ``nn.Module`` that takes the student's batch images ([B, 1, S, S] in
[0, 1]), does its own preprocessing and returns logits [B, C] in the *student's* class order,
with a ``teacher_mask`` buffer [C] (1 = the teacher predicts that class) and a
``teacher_name`` string. :class:`cxrstudy.methods.mxa.distillation.DistillationTrainer` reads both.

torchxrayvision's ``densenet121-res224-chex`` (Cohen et al., MIDL 2022) predicts 18 outputs in
xrv's default pathology order, 11 of them named for these weights (unused outputs are ""). They
map to the 14 CheXpert classes by name (:func:`cxrstudy.data.labels.canonical`, so xrv
"Effusion" is CheXpert "Pleural Effusion"); the table is :func:`txv_chexpert_mapping`:

- the 11 named outputs → the CheXpert class of the same finding (logit as is);
- "No Finding" → p = Π (1 − p_k) over exactly those mapped pathologies k (Atelectasis,
  Consolidation, Pneumothorax, Edema, Effusion, Pneumonia, Cardiomegaly, Lung Lesion,
  Fracture, Lung Opacity, Enlarged Cardiomediastinum), treating them as independent; as a
  logit, log p − log(1 − p) with log p = −Σ softplus(z_k);
- "Pleural Other" and "Support Devices" have no xrv output: logit 0, ``teacher_mask`` 0.

xrv expects one-channel 224-px images in [−1024, 1024] (:func:`txv_preprocess`). The weights
come only from xrv's local cache (``~/.torchxrayvision/models_data/`` unless ``cache_dir``);
when absent, :class:`~cxrstudy.models.pretrained.PretrainedWeightsUnavailable` names the file
and how to get it, at once — nothing is downloaded unless ``download=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .data.augment import resize_square
from .data.labels import CHEXPERT_CLASSES, canonical, match_classes
from .models.distill import DistilledOutput
from .models.pretrained import PretrainedWeightsUnavailable, hub_offline
from .outputs import parse_run_reference
from .train.checkpoint import load_model_from_checkpoint

if TYPE_CHECKING:
    from .experiment import StudyData
    from .outputs import Outputs
    from .train import Schedule

TXV_CHEX_WEIGHTS = "densenet121-res224-chex"
TXV_PREFIX = "txv-"
TXV_TEACHER_NAME = TXV_PREFIX + TXV_CHEX_WEIGHTS
NO_FINDING = canonical("No Finding")
RULE_SAME = "same finding"
RULE_NO_FINDING = "no finding = Π(1 − p) over the mapped pathologies"
RULE_ABSENT = "absent (teacher_mask 0)"
_PROBABILITY_EPS = 1e-6


# ---- the mapping ----------------------------------------------------------------------------
def txv_pathologies(weights: str = TXV_CHEX_WEIGHTS) -> list[str]:
    """The output names of xrv ``weights`` ("" = unused output), read without loading them."""
    import torchxrayvision as xrv

    if weights not in xrv.models.model_urls:
        known = sorted(k for k in xrv.models.model_urls if "-" in k)
        raise ValueError(f"torchxrayvision has no weights {weights!r}; known: {known}")
    return list(xrv.models.model_urls[weights]["labels"])


def txv_class_mapping(pathologies: Sequence[str], class_names: Sequence[str]) -> pd.DataFrame:
    """How each of ``class_names`` is read off the xrv outputs ``pathologies``.

    One row per class, in order: ``class``, ``rule`` (same finding / no finding / absent),
    ``txv_outputs`` and ``txv_indices`` (tuples of the outputs used) and ``teacher_mask``.
    """
    named = {name: i for i, name in enumerate(pathologies) if name}
    pairs, _, _ = match_classes(list(class_names), list(named))
    partner = dict(pairs)
    mapped = tuple(partner[c] for c in class_names if c in partner)
    rows = []
    for name in class_names:
        if name in partner:
            rows.append((name, RULE_SAME, (partner[name],), (named[partner[name]],), 1.0))
        elif canonical(name) == NO_FINDING and mapped:
            rows.append((name, RULE_NO_FINDING, mapped, tuple(named[m] for m in mapped), 1.0))
        else:
            rows.append((name, RULE_ABSENT, (), (), 0.0))
    return pd.DataFrame(rows, columns=["class", "rule", "txv_outputs", "txv_indices",
                                       "teacher_mask"])


def txv_chexpert_mapping(pathologies: Sequence[str] | None = None) -> pd.DataFrame:
    """The table for the 14 CheXpert classes (default: the ``densenet121-res224-chex`` outputs)."""
    return txv_class_mapping(txv_pathologies() if pathologies is None else pathologies,
                             CHEXPERT_CLASSES)


# ---- preprocessing --------------------------------------------------------------------------
def txv_preprocess(images: torch.Tensor, resolution: int = 224) -> torch.Tensor:
    """Our [B, 1, S, S] in [0, 1] → xrv's [B, 1, resolution²] in [−1024, 1024] (0 → −1024)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"torchxrayvision models take one-channel images [B, 1, S, S], got "
                         f"{tuple(images.shape)}")
    return resize_square(images.float(), resolution) * 2048.0 - 1024.0


# ---- weights ----------------------------------------------------------------------------------
def txv_weight_path(weights: str = TXV_CHEX_WEIGHTS, cache_dir=None) -> Path:
    """Where xrv keeps (or would download) the file of ``weights``."""
    import torchxrayvision as xrv

    txv_pathologies(weights)  # validates the name
    url = xrv.models.model_urls[weights]["weights_url"]
    folder = cache_dir if cache_dir is not None else xrv.utils.get_cache_dir()
    return Path(os.path.expanduser(os.fspath(folder))) / os.path.basename(url)


def _missing_weights_message(weights: str, path: Path, why: str) -> str:
    import torchxrayvision as xrv

    url = xrv.models.model_urls[weights]["weights_url"]
    return (
        f"torchxrayvision weights {weights!r} are not available: {why}.\n"
        f"Expected file: {path}\n"
        f"To get them, on a machine with network access run\n"
        f"  wget {url} -O {path}\n"
        f"(or `python -c \"import torchxrayvision as xrv; xrv.models.get_model('{weights}')\"`, "
        f"which stores them in {xrv.utils.get_cache_dir()}), copy the file there, or pass "
        f"cache_dir= for the folder holding it; download=True lets xrv fetch it when the "
        f"network is reachable and HF_HUB_OFFLINE is not set.")


def load_txv_model(weights: str = TXV_CHEX_WEIGHTS, cache_dir=None, download: bool = False
                   ) -> nn.Module:
    """xrv's model with ``weights`` from the local cache, or an immediate, explained error."""
    import torchxrayvision as xrv

    path = txv_weight_path(weights, cache_dir)
    if not path.is_file():
        if not download:
            raise PretrainedWeightsUnavailable(_missing_weights_message(
                weights, path, "the file is not in the local cache and download=False"))
        if hub_offline():
            raise PretrainedWeightsUnavailable(_missing_weights_message(
                weights, path, "the file is not in the local cache and HF_HUB_OFFLINE is set"))
    return xrv.models.get_model(weights, cache_dir=str(path.parent))


# ---- teachers -------------------------------------------------------------------------------
class TXVTeacher(nn.Module):
    """A torchxrayvision classifier speaking the student's classes (module docstring).

    ``model`` needs ``pathologies`` (or ``targets``): the names of its outputs. Its logits are
    used as they are; with ``calibrated=True`` xrv's operating-point normalisation is kept
    (outputs rescaled so each class's threshold maps to 0.5) and those probabilities become
    logits. Otherwise the wrapper switches it off (``op_threshs = None``) on ``model``.
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str] = CHEXPERT_CLASSES,
                 resolution: int = 224, calibrated: bool = False,
                 name: str = TXV_TEACHER_NAME):
        super().__init__()
        pathologies = getattr(model, "pathologies", None) or getattr(model, "targets", None)
        if not pathologies:
            raise ValueError(f"{type(model).__name__} names no outputs (no pathologies/targets)")
        if not calibrated and getattr(model, "op_threshs", None) is not None:
            model.op_threshs = None
        self.model = model
        self.pathologies = list(pathologies)
        self.class_names = [str(c) for c in class_names]
        self.resolution = int(resolution)
        self.teacher_name = name
        self.mapping = txv_class_mapping(self.pathologies, self.class_names)
        same = self.mapping[self.mapping["rule"] == RULE_SAME]
        no_finding = self.mapping[self.mapping["rule"] == RULE_NO_FINDING]
        self._buffer("direct_columns", list(same.index))
        self._buffer("direct_sources", [i for (i,) in same["txv_indices"]])
        self.no_finding_column = int(no_finding.index[0]) if len(no_finding) else None
        self._buffer("no_finding_sources",
                     list(no_finding["txv_indices"].iloc[0]) if len(no_finding) else [])
        self.register_buffer("teacher_mask", torch.tensor(
            self.mapping["teacher_mask"].to_numpy(), dtype=torch.float32), persistent=False)

    def _buffer(self, name: str, values: list[int]) -> None:
        self.register_buffer(name, torch.tensor(values, dtype=torch.long), persistent=False)

    @classmethod
    def from_pretrained(cls, weights: str = TXV_CHEX_WEIGHTS,
                        class_names: Sequence[str] = CHEXPERT_CLASSES, cache_dir=None,
                        download: bool = False, calibrated: bool = False) -> "TXVTeacher":
        """xrv's ``weights`` from the local cache (see :func:`load_txv_model`)."""
        import torchxrayvision as xrv

        model = load_txv_model(weights, cache_dir, download)
        resolution = xrv.models.model_urls[weights].get("input_resolution", 224)
        return cls(model, class_names, resolution=resolution, calibrated=calibrated,
                   name=TXV_PREFIX + weights)

    def outputs_are_probabilities(self) -> bool:
        return (getattr(self.model, "op_threshs", None) is not None
                or bool(getattr(self.model, "apply_sigmoid", False)))

    def pathology_logits(self, images: torch.Tensor) -> torch.Tensor:
        """xrv's raw outputs as logits [B, len(pathologies)] for our [0, 1] images."""
        out = self.model(txv_preprocess(images, self.resolution)).float()
        if out.ndim != 2 or out.shape[1] != len(self.pathologies):
            raise ValueError(f"{type(self.model).__name__} returned {tuple(out.shape)}, expected "
                             f"[B, {len(self.pathologies)}] (one per named pathology slot)")
        if self.outputs_are_probabilities():
            out = torch.logit(out.clamp(_PROBABILITY_EPS, 1.0 - _PROBABILITY_EPS))
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        source = self.pathology_logits(images)
        logits = source.new_zeros(source.shape[0], len(self.class_names))
        logits[:, self.direct_columns] = source[:, self.direct_sources]
        if self.no_finding_column is not None:
            # log Π(1 − p_k) = −Σ softplus(z_k); logit(p) = log p − log(1 − p)
            log_p = (-F.softplus(source[:, self.no_finding_sources]).sum(dim=1)).clamp(max=-1e-7)
            logits[:, self.no_finding_column] = log_p - torch.log(-torch.expm1(log_p))
        return logits


class CheckpointTeacher(nn.Module):
    """One of our trained models as a teacher: its outputs reordered to the student's classes
    by name, classes it lacks masked out, and the images resized to its training resolution."""

    def __init__(self, model: nn.Module, teacher_classes: Sequence[str],
                 class_names: Sequence[str], image_size: int | None = None,
                 name: str = "checkpoint"):
        super().__init__()
        self.model = model
        self.class_names = [str(c) for c in class_names]
        self.teacher_classes = [str(c) for c in teacher_classes]
        self.image_size = None if image_size is None else int(image_size)
        self.teacher_name = name
        pairs, _, _ = match_classes(self.class_names, self.teacher_classes)
        if not pairs:
            raise ValueError(f"the teacher's classes {self.teacher_classes} share no class with "
                             f"the student's {self.class_names}")
        source = {ours: self.teacher_classes.index(theirs) for ours, theirs in pairs}
        columns = [i for i, c in enumerate(self.class_names) if c in source]
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long),
                             persistent=False)
        self.register_buffer("sources", torch.tensor(
            [source[self.class_names[i]] for i in columns], dtype=torch.long), persistent=False)
        mask = torch.zeros(len(self.class_names))
        mask[columns] = 1.0
        self.register_buffer("teacher_mask", mask, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size is not None:
            images = resize_square(images, self.image_size)
        out = self.model(images)
        if isinstance(out, DistilledOutput):
            out = (out.cls + out.dist) / 2
        logits = out.new_zeros(out.shape[0], len(self.class_names))
        logits[:, self.columns] = out[:, self.sources]
        return logits



# ---- a teacher by name ------------------------------------------------------------------------
def load_teacher(name_or_checkpoint, num_classes: int, class_names: Sequence[str] | None = None,
                 *, cache_dir=None, download: bool = False, calibrated: bool = False,
                 use_ema: bool = True) -> nn.Module:
    """A teacher for a student with ``num_classes`` outputs named ``class_names``.

    ``"txv-densenet121-res224-chex"`` (or ``"txv-<other xrv weights>"``) → :class:`TXVTeacher`;
    a cxrstudy checkpoint file or run folder → :class:`CheckpointTeacher` (the checkpoint's own
    class names are matched to ``class_names``; its EMA weights when it has them).
    """
    if class_names is not None and len(class_names) != int(num_classes):
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    key = os.fspath(name_or_checkpoint)
    if key.startswith(TXV_PREFIX):
        if class_names is None:
            raise ValueError("a torchxrayvision teacher needs class_names to map its outputs")
        return TXVTeacher.from_pretrained(key[len(TXV_PREFIX):], class_names, cache_dir=cache_dir,
                                          download=download, calibrated=calibrated)
    path = Path(key).expanduser()
    if not path.exists():
        raise ValueError(f"unknown teacher {key!r}: give {TXV_TEACHER_NAME!r} (or 'txv-' + "
                         f"another torchxrayvision weight name) or the path of a cxrstudy "
                         f"checkpoint or run folder; {path} does not exist")
    model, meta = load_model_from_checkpoint(path, use_ema=use_ema)
    config = meta["model_config"]
    teacher_classes = meta.get("class_names")
    if teacher_classes is None or class_names is None:
        if int(config["num_classes"]) != int(num_classes):
            raise ValueError(f"{meta['path']} predicts {config['num_classes']} classes, the "
                             f"student {num_classes}, and without class names on both sides "
                             f"they cannot be matched")
        teacher_classes = teacher_classes or class_names or [str(i) for i in range(num_classes)]
        class_names = class_names or teacher_classes
    name = f"checkpoint:{config['name']}:{Path(meta['path']).parent.name}/{Path(meta['path']).name}"
    return CheckpointTeacher(model, teacher_classes, class_names,
                             image_size=config.get("image_size"), name=name)


# ---- a teacher for a notebook: trained here, another notebook's run, or a file -------------
def sibling_run(spec: str, out: Outputs, data: StudyData) -> Path:
    """Checkpoint folder of ``run:<notebook>/<tag>``, a notebook of the same profile as ``out``.

    Refused when that notebook has not run, or when it trained on any image of our test split
    (its ``splits.csv`` is compared with ours), so a reused teacher never saw our test set.
    """
    notebook, tag = parse_run_reference(spec) or ("", "")
    if not notebook or not tag:
        raise ValueError(f"teacher {spec!r}: write run:<notebook>/<model tag>, e.g. "
                         f"run:01_baseline/densenet121")
    source = out.sibling(notebook)
    folder = source.checkpoint_dir(tag)
    if not folder.is_dir():
        raise FileNotFoundError(f"teacher {spec!r}: {folder} does not exist; run {notebook} with "
                                f"this profile first, or set teacher='own'")
    if not source.splits_file.is_file():
        raise FileNotFoundError(f"teacher {spec!r}: {source.splits_file} is missing, so it cannot "
                                f"be checked that the teacher never trained on our test images")
    leaked = sorted(source.trained_on("image_id") & set(data.test.records["image_id"].astype(str)))
    if leaked:
        raise ValueError(f"teacher {spec!r} trained on {len(leaked)} of our test images (e.g. "
                         f"{leaked[0]}): its split differs from ours (another seed or subsample); "
                         f"set teacher='own'")
    return folder


def teacher_sentence(result: dict) -> str:
    """One line on the teacher :func:`prepare_teacher` evaluated: its macro AUC with the 95% CI
    and its micro AUC on this notebook's test split."""
    from .display import format_ci

    o = result["overall"]
    return (f"Teacher {result['teacher']}: macro AUC "
            f"{format_ci(o.get('macro_auc'), o.get('macro_auc_low'), o.get('macro_auc_high'), label='95% CI ')}, "
            f"micro AUC {format_ci(o.get('micro_auc'), None, None)}")


def prepare_teacher(teacher: str, data: StudyData, out: Outputs, schedule: Schedule | None = None,
                    *, teacher_model: str = "densenet121", n_boot: int = 1000, seed: int = 0,
                    **train_kwargs):
    """The frozen teacher and its own test-set result.

    ``teacher="own"`` trains ``teacher_model`` with ``schedule`` on the same training split (the
    default: it works offline and on any dataset); ``"run:01_baseline/densenet121"`` reuses a
    model another notebook of the same profile trained (see :func:`sibling_run`);
    ``"txv-densenet121-res224-chex"`` is torchxrayvision's CheXpert DenseNet from its local
    cache (the paper's teacher); any other value is the path of a cxrstudy checkpoint or run
    folder.
    """
    from .evaluate import predict_probabilities
    from .experiment import make_loaders, train_and_evaluate
    from .metrics import summarize
    from .train import Schedule

    if parse_run_reference(teacher) is not None:
        teacher = str(sibling_run(teacher, out, data))
    if teacher == "own":
        run = train_and_evaluate(teacher_model, data, out, schedule, tag="teacher",
                                 n_boot=n_boot, seed=seed, **train_kwargs)
        module = load_teacher(run.checkpoint_dir, len(data.classes), data.classes)
        return module, {"teacher": f"own {teacher_model}", "overall": run.overall,
                        "per_class": run.per_class}
    module = load_teacher(teacher, len(data.classes), data.classes)
    batch_size = (schedule or Schedule()).batch_size
    _, _, test_loader = make_loaders(data, batch_size, seed)
    predicted = predict_probabilities(module, test_loader, desc="teacher")
    mask = predicted.masks * module.teacher_mask.cpu().numpy()[None, :]
    patients = data.test.patient_ids[predicted.indices]
    per_class, overall = summarize(predicted.targets, predicted.probs, data.classes,
                                   mask=mask, patient_ids=patients, n_boot=n_boot, seed=seed)
    return module, {"teacher": teacher, "overall": overall, "per_class": per_class}


__all__ = ["load_teacher", "prepare_teacher", "sibling_run", "teacher_sentence", "TXVTeacher", "CheckpointTeacher", "load_txv_model",
           "txv_class_mapping", "txv_chexpert_mapping", "txv_pathologies", "txv_preprocess",
           "txv_weight_path", "TXV_CHEX_WEIGHTS", "TXV_PREFIX", "TXV_TEACHER_NAME"]
