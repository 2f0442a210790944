"""The MXA study (Rand & Ibrahim, arXiv 2504.02277): its ablation arms, the paper's numbers, and
the tables notebooks 02 and 03 show about the block (sizes, shapes, where the ROI boxes land).

The arm ``authors_baseline`` reproduces the paper's baseline as the authors' public code trains
it: a forward that ends in a sigmoid, fed to BCE-with-logits (a double sigmoid, see
:mod:`cxrstudy.methods.mxa.sigmoid_output`). Its loss cannot fall below a floor computable by hand,
and the paper's 0.66 is that collapsed model; :func:`paper_gain_parts` splits the paper's +0.19
into the bug and what MXA + KD add over a baseline trained correctly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from ...models import count_parameters, create_model
from .sigmoid_output import (NEGATIVE_FLOOR, POSITIVE_FLOOR, double_sigmoid_loss_floor)
from ... import reference

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from ...experiment import RunResult, StudyData
    from ...outputs import Outputs
    from ...train import Schedule

# The paper's numbers live in params/paper_reference.yaml, each with its source. They are read
# when first asked for (cxrstudy.reference caches the file), not when this module is imported:
# the module-level names PAPER, PAPER_MICRO_AUC, ... below are computed on access (PEP 562).


def paper_entry() -> dict:
    """The MXA paper's entry of params/paper_reference.yaml."""
    return reference.paper("mxa")


def authors_parameters_m() -> dict[str, dict[str, float]]:
    """The authors' logged parameter counts in millions (M5, 14 classes, 224 px), by run:
    ``without MXA`` (their baseline, a three-channel stem), ``with MXA`` and ``with MXA + KD``
    (the distillation head too). The paper's text gives no count we could cite; the 12.09 M and
    16.16 M quoted for it round the first and the last of these."""
    logged = authors_n_parameters()
    runs = {"without MXA": "baseline", "with MXA": "mxa", "with MXA + KD": "mxa_kd"}
    variant = paper_entry()["setting"]["model_id"]
    return {variant: {label: logged[run] / 1e6 for label, run in runs.items() if run in logged}}


def paper_micro_auc() -> dict[str, float]:
    """Reported micro-AUC of the arms the paper gives (EfficientViT-M5), by the paper's name."""
    return reference.values_by_prefix("mxa", "micro_auc")


def paper_gain() -> float:
    """The paper's reported gain of M5 + MXA + KD over its baseline (0.85 − 0.66)."""
    reported = paper_micro_auc()
    return round(reported["mxa_kd"] - reported["baseline"], 4)


def paper_micro_auc_by_arm(notebook: str = "03_knowledge_distillation",
                           settings: Mapping[str, Mapping[str, Any]] | None = None
                           ) -> dict[str, float]:
    """The paper's micro AUCs keyed by the arm of ``notebook`` each belongs beside (the ``arms``
    of its entry in params/paper_reference.yaml): the 0.66 baseline sits beside
    ``authors_baseline``, the model that reproduces it, not beside our correctly trained one.

    ``settings`` (arm → :func:`arm_settings`, what the notebook ran) keeps a number only beside
    an arm that rebuilds the authors' model (the entry's ``requires``): the paper's 0.85 does not
    stand beside an ``mxa_kd`` run with our ``mixer`` placement. Without ``settings``, the
    entries' arms as listed."""
    found = {}
    for entry in paper_entry()["numbers"]:
        if entry["key"].startswith("micro_auc.") and "value" in entry:
            for spec in entry.get("arms", []):
                source, _, arm = spec.partition("/")
                if source != notebook:
                    continue
                if settings is not None and not reference.meets_requirements(
                        entry, settings.get(arm))[0]:
                    continue
                found[arm] = entry["value"]
    return found


def authors_n_parameters() -> dict[str, int]:
    """``n_parameters`` of the authors' logs (params/paper_reference.yaml, ``log_n_parameters.*``)."""
    return reference.values_by_prefix("mxa", "log_n_parameters")


_ON_ACCESS = {
    "PAPER": lambda: f"{paper_entry()['short']}, {paper_entry()['setting']['dataset']}",
    "AUTHORS_PARAMETERS_M": authors_parameters_m,
    "PAPER_MICRO_AUC": paper_micro_auc,
    "PAPER_GAIN": paper_gain,
    "PAPER_MICRO_AUC_BY_ARM": paper_micro_auc_by_arm,  # every arm a number is listed for (03)
    "AUTHORS_N_PARAMETERS": authors_n_parameters,
}


def __getattr__(name: str):
    if name in _ON_ACCESS:
        return _ON_ACCESS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Arm:
    """One ablation arm: the backbone with or without MXA, trained with or without KD.

    ``output="sigmoid"`` is the authors' forward, which ends in a sigmoid that the BCE-with-logits
    loss then repeats; ``"logits"`` (every other arm) is the correct model.
    """

    mxa: bool
    kd: bool
    crop: str = "faithful"
    mxa_mode: str = "sum"
    roi_init: str = "default"
    output: str = "logits"
    #: where the MXA block sits (:data:`cxrstudy.methods.mxa.model.MXA_PLACEMENTS`); None: the
    #: notebook's ``mxa_placement``. ``*_mixer`` arms pin ours, whatever the notebook says.
    placement: str | None = None


ARMS = {
    "baseline": Arm(mxa=False, kd=False),
    # the paper's baseline as the authors' code trains it: a double sigmoid that collapses
    "authors_baseline": Arm(mxa=False, kd=False, output="sigmoid"),
    "mxa": Arm(mxa=True, kd=False),
    "kd": Arm(mxa=False, kd=True),
    "mxa_kd": Arm(mxa=True, kd=True),
    # our placement (beside LWA) as an arm of its own, so that a profile running the authors'
    # block_input wiring for mxa / mxa_kd (the rows beside their numbers) still shows ours
    "mxa_mixer": Arm(mxa=True, kd=False, placement="mixer"),
    "mxa_kd_mixer": Arm(mxa=True, kd=True, placement="mixer"),
    # our options, beside the authors' faithful sum: a crop the loss can train, and the gate
    "mxa_kd_differentiable": Arm(mxa=True, kd=True, crop="differentiable", roi_init="whole"),
    "mxa_kd_gated": Arm(mxa=True, kd=True, mxa_mode="gated"),
}


def arm_model(arm: str, backbone: str = "efficientvit_m5") -> tuple[str, dict]:
    """Registry name and ``create_model`` kwargs of ``arm`` on ``backbone``."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    spec = ARMS[arm]
    if spec.output not in ("logits", "sigmoid"):
        raise ValueError(f"arm {arm!r}: output must be 'logits' or 'sigmoid', got {spec.output!r}")
    if spec.output == "sigmoid" and spec.kd:
        # the authors' distilled student returns its two heads' logits in training, so the bug
        # never reached their KD arms: there is nothing to reproduce
        raise ValueError(f"arm {arm!r}: a sigmoid output is the authors' non-distilled model only")
    if not spec.mxa:
        name, kwargs = backbone, ({"distilled": True} if spec.kd else {})
    else:
        name, kwargs = f"{backbone}_mxa", dict(mxa_mode=spec.mxa_mode, crop=spec.crop,
                                               roi_init=spec.roi_init)
        if spec.placement is not None:
            kwargs["mxa_placement"] = spec.placement
        if spec.kd:
            kwargs["distilled"] = True
    if spec.output == "sigmoid":
        return "sigmoid_output", dict(backbone=name, **kwargs)
    return name, kwargs


#: The model the authors' code trains (and their logs and the paper's numbers come from): MXA
#: summed at each block's input, their integer crop, PyTorch's initialisation of the ROI head.
AUTHORS_MXA = {"placement": "block_input", "mxa_mode": "sum", "crop": "faithful",
               "roi_init": "default"}


def arm_settings(arm: str, mxa_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``arm`` trains once the notebook's options are applied: the :class:`Arm` fields,
    ``mxa_options`` (``crop``, ``mxa_mode``, ``roi_init``, ``mxa_placement``) over the arm's own
    MXA settings, its ``mxa_placement`` (default ``"mixer"``) for arms that do not pin theirs;
    and whether that is a model the authors trained (``authors_model``: their double-sigmoid
    baseline, or MXA wired as :data:`AUTHORS_MXA`), the only arms a number of theirs may stand
    beside."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    settings = asdict(ARMS[arm])
    options = dict(mxa_options or {})
    placement = options.pop("mxa_placement", "mixer")  # the models' own default
    if settings["placement"] is None:
        settings["placement"] = placement
    if settings["mxa"]:
        unknown = sorted(set(options) - {"crop", "mxa_mode", "roi_init"})
        if unknown:
            raise ValueError(f"mxa_options: unknown {unknown}; use crop, mxa_mode, roi_init, "
                             f"mxa_placement")
        settings.update(options)
    else:  # no block: its options do not apply
        settings.update(crop=None, mxa_mode=None, roi_init=None, placement=None)
    if settings["mxa"]:  # their +MXA and +MXA+KD runs
        settings["authors_model"] = all(settings[k] == v for k, v in AUTHORS_MXA.items())
    else:  # their baseline is the double-sigmoid model; they ran no KD without MXA
        settings["authors_model"] = settings["output"] == "sigmoid" and not settings["kd"]
    return settings


def settings_by_arm(arms: Iterable[str], mxa_options: Mapping[str, Any] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Arm → :func:`arm_settings`: what metrics.json records, and what decides which arm a
    number of the paper may stand beside."""
    return {arm: arm_settings(arm, mxa_options) for arm in arms}


def arms_table(arms: Iterable[str], mxa_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """What each arm changes (:func:`arm_settings`), for the notebook's table of arms."""
    return pd.DataFrame([dict(arm=arm, **settings)
                         for arm, settings in settings_by_arm(arms, mxa_options).items()])


def _meta_model(name: str, num_classes: int, **kwargs) -> torch.nn.Module:
    """``create_model(name, …)`` on the meta device: shapes only, nothing allocated or
    initialised, so counting even M5 at 224 px takes a fraction of a second."""
    with torch.device("meta"):
        return create_model(name, num_classes, **kwargs)


def parameter_counts(variants: Iterable[str] = ("efficientvit_m0", "efficientvit_m5"),
                     num_classes: int = 14, in_chans: int = 1, image_size: int = 224
                     ) -> pd.DataFrame:
    """Parameters with and without MXA (millions), the authors' logged counts beside ours
    (:func:`authors_parameters_m`; their baseline's count is that of a three-channel stem)."""
    rows = []
    for variant in variants:
        shape = dict(in_chans=in_chans, image_size=image_size)
        plain = _meta_model(variant, num_classes, **shape)
        with_mxa = _meta_model(f"{variant}_mxa", num_classes, **shape)
        logged = authors_parameters_m().get(variant, {})
        rows.append({
            "model": variant, "without MXA (M)": count_parameters(plain) / 1e6,
            "with MXA (M)": count_parameters(with_mxa) / 1e6,
            "trained with faithful crop (M)": count_parameters(with_mxa, trainable_only=True) / 1e6,
            "authors' log without (M)": logged.get("without MXA", np.nan),
            "authors' log with (M)": logged.get("with MXA", np.nan),
            "authors' log with + KD (M)": logged.get("with MXA + KD", np.nan),
        })
    return pd.DataFrame(rows)


#: The authors' three logged runs (``Results/ablation_study/<log>/log.txt`` in their repository)
#: and the ``create_model`` arguments that rebuild each model: the baseline's count is that of a
#: three-channel stem, the MXA runs have one channel, and the KD run adds the distillation head.
AUTHORS_RUNS: dict[str, dict] = {
    "baseline": {"log": "augs:u1", "model": "efficientvit_m5", "in_chans": 3},
    "mxa": {"log": "augs:u1+MXA", "model": "efficientvit_m5_mxa", "in_chans": 1},
    "mxa_kd": {"log": "augs:u1+MXA+KD", "model": "efficientvit_m5_mxa", "in_chans": 1,
               "distilled": True},
}
#: Their class count and input size (args.txt: nb_classes 14, input_size 224; the paper's setting).
AUTHORS_NUM_CLASSES = 14
AUTHORS_IMAGE_SIZE = 224


def authors_parameter_counts() -> pd.DataFrame:
    """The authors' logged ``n_parameters`` beside ``create_model``'s count of the configuration
    that rebuilds each run (:data:`AUTHORS_RUNS`): exact integers, and their difference."""
    rows = []
    for run, spec in AUTHORS_RUNS.items():
        kwargs = {k: v for k, v in spec.items() if k not in ("log", "model")}
        kwargs["image_size"] = AUTHORS_IMAGE_SIZE
        ours = count_parameters(_meta_model(spec["model"], AUTHORS_NUM_CLASSES, **kwargs))
        call = ", ".join([repr(spec["model"]), str(AUTHORS_NUM_CLASSES)]
                         + [f"{k}={v!r}" for k, v in kwargs.items()])
        logged = authors_n_parameters().get(run)
        rows.append({"run": run, "authors' log": f"Results/ablation_study/{spec['log']}/log.txt",
                     "configuration": f"create_model({call})",
                     "authors' n_parameters": logged, "ours": ours,
                     "ours − authors'": None if logged is None else ours - logged})
    return pd.DataFrame(rows)


def model_for_arm(arm: str, backbone: str = "efficientvit_m5",
                  mxa_options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
    """Registry name and ``create_model`` kwargs of the network :func:`train_arm` trains:
    :func:`arm_model`, with ``mxa_options`` over an MXA arm's own settings except the placement
    an arm pins (``mxa_mixer``, ``mxa_kd_mixer``)."""
    name, model_kwargs = arm_model(arm, backbone)
    if mxa_options and ARMS[arm].mxa:
        model_kwargs.update(mxa_options)
    if ARMS[arm].placement is not None:  # a *_mixer arm keeps its own placement
        model_kwargs["mxa_placement"] = ARMS[arm].placement
    return name, model_kwargs


def initial_arm_model(arm: str, data: StudyData, backbone: str = "efficientvit_m5",
                      mxa_options: Mapping[str, Any] | None = None, seed: int = 0
                      ) -> torch.nn.Module:
    """The network ``arm`` starts training from in :func:`train_arm` (same seed, same initial
    weights), for looking at one batch before any training."""
    from ...experiment import initial_model

    name, model_kwargs = model_for_arm(arm, backbone, mxa_options)
    return initial_model(name, data, seed=seed, **model_kwargs)


def train_arm(arm: str, data: StudyData, out: Outputs, schedule: Schedule | None = None, *,
              backbone: str = "efficientvit_m5", teacher: torch.nn.Module | None = None,
              alpha: float = 0.5, tau: float = 1.0, kd_mode: str = "soft",
              mxa_options: dict | None = None, **train_kwargs):
    """Train and test one arm with :func:`cxrstudy.experiment.train_and_evaluate`.

    KD arms train with :class:`cxrstudy.methods.mxa.distillation.DistillationTrainer` against ``teacher``;
    ``mxa_options`` (``crop``, ``mxa_mode``, ``roi_init``, ``mxa_placement``) replace the arm's
    own MXA settings, except the placement an arm pins (``mxa_mixer``, ``mxa_kd_mixer``).
    Every arm trains on the same ``schedule``; ``train_kwargs`` (seed, n_boot, …) go to
    ``train_and_evaluate`` as they are.
    """
    from ...experiment import train_and_evaluate
    from .distillation import DistillationTrainer

    name, model_kwargs = model_for_arm(arm, backbone, mxa_options)
    if ARMS[arm].kd:
        if teacher is None:
            raise ValueError(f"arm {arm!r} distils from a teacher: pass teacher=")
        train_kwargs.update(trainer_cls=DistillationTrainer, trainer_kwargs=dict(
            teacher=teacher, alpha=alpha, tau=tau, mode=kd_mode))
    return train_and_evaluate(name, data, out, schedule, tag=arm, model_kwargs=model_kwargs,
                              **train_kwargs)


#: ``views`` of notebook 03: every image of the release, or frontal views only.
VIEWS = ("all", "frontal")


def view_options(dataset: str, views: str) -> dict:
    """Adapter options that keep ``views`` of ``dataset`` (for :func:`~cxrstudy.experiment.prepare_data`).

    CheXpert holds frontal and lateral images: ``"all"`` keeps every row of its CSVs, as the
    authors' loader does (their test set is all 234 images of ``valid.csv``), ``"frontal"`` the
    AP and PA images. NIH ChestX-ray14 (and ChestMNIST, made from it) hold frontal images only,
    so both values keep every image there and nothing is passed.
    """
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    return {"views": views} if dataset == "chexpert" else {}


def authors_baseline_check(run: RunResult, data: StudyData) -> dict:
    """The double sigmoid's loss floor on ``data``'s training labels beside what ``run`` reached.

    ``loss_floor`` is the mean per-entry floor (:func:`double_sigmoid_loss_floor`): no epoch's
    training loss can go below it when every label is known (``all_labels_known``), however
    long the model trains. ``collapsed`` lists the classes whose test scores are all equal.
    """
    from ...metrics import constant_score_classes

    targets, masks = np.asarray(data.train.targets), np.asarray(data.train.masks)
    losses = run.history["train_loss"].astype(float)
    return {"loss_floor": double_sigmoid_loss_floor(targets, masks),
            "positive_floor": POSITIVE_FLOOR, "negative_floor": NEGATIVE_FLOOR,
            "train_positive_rate": float(targets[masks > 0].mean()),
            "all_labels_known": bool((masks > 0).all()),
            "min_train_loss": float(losses.min()), "final_train_loss": float(losses.iloc[-1]),
            "collapsed": constant_score_classes(run.probs, data.classes, run.masks)}


_GAIN_STEPS = (
    ("the double sigmoid (fixed)", "authors_baseline", "baseline", np.nan),
    ("MXA + KD over a correct baseline", "baseline", "mxa_kd", np.nan),
    ("the paper's comparison", "authors_baseline", "mxa_kd", None),  # None: the paper's gain
)


def paper_gain_parts(table: pd.DataFrame) -> pd.DataFrame:
    """What the paper's +0.19 (M5 + MXA + KD over its baseline) is made of, on our arms.

    From an :func:`cxrstudy.tables.ablation_table`: the micro-AUC difference that fixing the
    double sigmoid makes (authors_baseline → baseline), what MXA + KD add over a baseline trained
    correctly (baseline → mxa_kd), and their sum, the paper's own comparison (authors_baseline →
    mxa_kd) beside the paper's +0.19. Steps whose arms did not run are left out.
    """
    micro = table.set_index("arm")["micro AUC"]
    rows = [{"step": step, "from": a, "to": b, "Δ micro AUC (ours)": float(micro[b] - micro[a]),
             "paper Δ micro AUC": paper_gain() if paper is None else paper}
            for step, a, b, paper in _GAIN_STEPS if a in micro.index and b in micro.index]
    return pd.DataFrame(rows, columns=["step", "from", "to", "Δ micro AUC (ours)",
                                       "paper Δ micro AUC"])


def paper_gain_sentence(parts: pd.DataFrame) -> str:
    """The decomposition of :func:`paper_gain_parts` in one plain sentence."""
    delta = {(r["from"], r["to"]): r["Δ micro AUC (ours)"] for r in parts.to_dict("records")}
    bug, method = delta.get(("authors_baseline", "baseline")), delta.get(("baseline", "mxa_kd"))
    if bug is None:
        return ("authors_baseline did not run, so the paper's gain cannot be split here: add it "
                "to `arms`.")
    text = (f"Training the same backbone without the double sigmoid changes micro AUC by "
            f"{bug:+.3f} (authors_baseline → baseline)")
    if method is None:
        return text + "; mxa_kd did not run, so the part MXA + KD add is not measured here."
    total = bug + method
    if total > 0:
        share = bug / total
        verdict = (f"the bug accounts for {share:.0%} of it" if 0 <= share <= 1 else
                   "the bug accounts for more than all of it (MXA + KD lose ground)"
                   if share > 1 else "MXA + KD account for more than all of it")
    else:
        verdict = "no gain at all here"
    return (text + f"; MXA + KD then add {method:+.3f} over that correct baseline. Together "
            f"{total:+.3f}, the comparison the paper reports as {paper_gain():+.2f}: {verdict}.")



def roi_figure(model: torch.nn.Module, dataset, n_images: int):
    """The ROI boxes the first and the last MXA block predict on ``n_images`` of ``dataset``
    (images with annotated boxes first, those drawn in red), each block in the legend by a
    reader's name (:func:`cxrstudy.methods.mxa.model.block_label`, e.g. "MXA, stage 1 block 1")."""
    from ... import plots
    from ...explain.evidence import uint8_images
    from ...explore import boxed_first
    from .model import block_label, roi_boxes

    chosen = boxed_first(dataset, n_images)
    images = torch.stack([dataset[i]["image"] for i in chosen])
    predicted = roi_boxes(model, images)
    ends = list(dict.fromkeys(list(predicted)[:1] + list(predicted)[-1:]))
    return plots.normalised_box_grid(uint8_images(images), {block_label(n): predicted[n] for n in ends},
                                     [dataset.meta(i)["image_id"] for i in chosen],
                                     truth=[dataset.meta(i)["boxes"] for i in chosen])


def one_batch_roi_figure(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], dataset,
                         n_images: int):
    """The box the first MXA block of ``model`` predicts on the first ``n_images`` of ``batch``
    (rows ``batch["index"]`` of ``dataset``), beside the region it really cropped (the whole map
    where the box is empty or inverted), the predicted box's corners in each title."""
    from ... import plots
    from ...explain.evidence import uint8_images
    from .model import block_label, mxa_blocks, roi_boxes

    images = batch["image"][:n_images]
    predicted = roi_boxes(model, images)
    name, first = mxa_blocks(getattr(model, "backbone", model))[0]
    boxes = {f"predicted box ({block_label(name)})": predicted[name],
             "region cropped": first.last_crop_boxes.float().cpu().numpy()}
    titles = [f"{dataset.meta(int(i))['image_id']}\nb = (" + ", ".join(f"{v:.2f}" for v in box) + ")"
              for i, box in zip(batch["index"][:n_images], predicted[name])]
    return plots.normalised_box_grid(uint8_images(images), boxes, titles)


@torch.no_grad()
def one_batch_kd(student: torch.nn.Module, teacher: torch.nn.Module,
                 batch: Mapping[str, torch.Tensor], dataset, *, alpha: float = 0.5,
                 tau: float = 1.0, kd_mode: str = "soft", n_images: int = 2
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """03's loss on one batch, each term from its pieces beside the library's value.

    ``student`` (a distilled model: both heads, z_cls and z_dist) and the frozen ``teacher``
    (logits t in the student's class order, its ``teacher_mask`` w where it has one) run in
    evaluation mode on the batch's images as the loader gives them. By hand, with
    BCE(z, q) = −[q·log σ(z) + (1 − q)·log(1 − σ(z))] per entry, N images and label mask m::

        q = σ(t/τ) (soft) or 1[σ(t) > ½] (hard)
        L_cls  = Σ m·BCE(z_cls, y) / Σ m
        L_dist = Σ w·BCE(z_dist, q) / (N·Σ w)
        L      = (1 − α)·L_cls + α·L_dist

    beside :func:`~cxrstudy.methods.mxa.distillation.teacher_targets`,
    :func:`~cxrstudy.train.losses.masked_bce`, :func:`~cxrstudy.methods.mxa.distillation.distillation_bce`
    and :func:`~cxrstudy.methods.mxa.distillation.kd_loss`. Returns the terms (one row each) and
    the soft targets of the first ``n_images`` (rows ``batch["index"]`` of ``dataset``) with their
    labels and teacher logits, one row per class.
    """
    import torch.nn.functional as F

    from ...models.distill import DistilledOutput
    from ...train.losses import masked_bce
    from .distillation import check_kd_settings, distillation_bce, kd_loss, teacher_targets

    check_kd_settings(alpha, tau, kd_mode)
    device = next(teacher.parameters()).device
    images = batch["image"].to(device)
    y, m = batch["target"].float().to(device), batch["mask"].float().to(device)
    modes = student.training, teacher.training
    student.to(device).eval()
    teacher.eval()
    try:
        heads = student.forward_heads(images) if hasattr(student, "forward_heads") else student(images)
        t = teacher(images)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    if isinstance(t, DistilledOutput):  # a distilled teacher: its two heads averaged
        t = (t.cls + t.dist) / 2
    t = t.float()
    z_cls, z_dist = (heads.cls, heads.dist) if isinstance(heads, DistilledOutput) else (heads, heads)
    z_cls, z_dist = z_cls.float(), z_dist.float()
    teacher_mask = getattr(teacher, "teacher_mask", None)
    w = torch.ones(t.shape[1], device=device) if teacher_mask is None else teacher_mask.float()

    def bce(z, target):
        return -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z))

    q = torch.sigmoid(t / tau) if kd_mode == "soft" else (torch.sigmoid(t) > 0.5).float()
    class_term = (m * bce(z_cls, y)).sum() / m.sum().clamp_min(1.0)
    dist_term = (w * bce(z_dist, q)).sum() / (len(t) * w.sum()).clamp_min(1.0)
    total = (1 - alpha) * class_term + alpha * dist_term

    q_library = teacher_targets(t, tau, kd_mode)
    library = [q_library.mean(), masked_bce(z_cls, y, m),
               distillation_bce(z_dist, t, tau, kd_mode, teacher_mask),
               kd_loss(DistilledOutput(z_cls, z_dist), y, m, t, alpha, tau, kd_mode, teacher_mask)]
    target_name = "q = σ(t/τ)" if kd_mode == "soft" else "q = 1[σ(t) > ½]"
    rows = [("soft targets", f"{target_name}, the teacher's targets", np.nan, len(t) * t.shape[1],
             q.mean(), float((q - q_library).abs().max())),
            ("class term", "L_cls = Σ m·BCE(z_cls, y) / Σ m", 1 - alpha, int(m.sum()),
             class_term, None),
            ("distillation term", "L_dist = Σ w·BCE(z_dist, q) / (N·Σ w)", alpha,
             int(len(t) * w.sum()), dist_term, None),
            ("loss", "L = (1 − α)·L_cls + α·L_dist", 1.0, np.nan, total, None)]
    terms = pd.DataFrame([
        {"term": term, "equation": equation, "weight": weight, "entries": entries,
         "by hand": float(mine), "library": float(theirs),
         "|by hand − library|": abs(float(mine) - float(theirs)) if gap is None else gap}
        for (term, equation, weight, entries, mine, gap), theirs in zip(rows, library)])
    terms.insert(1, "library function", ["teacher_targets (mean)", "masked_bce",
                                         "distillation_bce", "kd_loss"])

    soft = pd.DataFrame({"class": list(dataset.classes),
                         "teacher covers (w)": w.cpu().numpy().astype(int)})
    for k in range(min(n_images, len(t))):
        image_id = dataset.meta(int(batch["index"][k]))["image_id"]
        known = m[k].cpu().numpy() > 0
        soft[f"{image_id} y"] = np.where(known, y[k].cpu().numpy(), np.nan)
        soft[f"{image_id} t"] = t[k].cpu().numpy()
        soft[f"{image_id} {target_name.split(' = ')[1]}"] = q[k].cpu().numpy()
    return terms, soft


__all__ = ["ARMS", "AUTHORS_MXA", "Arm", "arm_model", "arm_settings", "settings_by_arm",
           "paper_entry", "authors_parameters_m", "paper_micro_auc",
           "paper_gain", "authors_n_parameters",
           "arms_table", "parameter_counts", "authors_parameter_counts", "AUTHORS_RUNS",
           "train_arm",
           "paper_micro_auc_by_arm", "VIEWS",
           "view_options", "authors_baseline_check", "paper_gain_parts", "paper_gain_sentence",
           "roi_figure", "model_for_arm", "initial_arm_model", "one_batch_roi_figure",
           "one_batch_kd"]
