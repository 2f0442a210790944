"""The low-resolution study (MLCAK, arXiv 2405.13370): one patient split at every resolution,
the teacher, the three student arms, and the tables and maps notebook 04 shows.

Arms per student resolution differ only in distillation
(:class:`cxrstudy.methods.mlcak.training.MLCAKTrainer`): their α, β, γ come from the notebook's
``distillation`` table, ``{arm: {"alpha": α, "beta": β, "gamma": γ}}`` — in notebook 04
``alone`` (all 0: no teacher), ``logit_kd`` (α, β; γ = 0) and ``mlcak`` (α, β, γ). The table
lives in the notebook only; this module reads it (:func:`arm_weights`), so an arm is added by
adding a line there. What every student shares is one :class:`StudentSetup`. Beside them, the
EfficientViT-M hybrid trained plainly at each resolution. The paper's numbers are not public in
our sources, so nothing here is compared with them.

:func:`loss_on_one_batch` writes out L's terms on one real batch, each computed from its pieces
beside :func:`~cxrstudy.methods.mlcak.training.mlcak_loss`'s own values, with the attention maps
the loss compares.

The distilled arms feed the teacher the same training rows at its own resolution
(``teacher_input="high_res"``, from the teacher's :class:`~cxrstudy.experiment.StudyData`) or
the student's batch upsampled (``"upsampled_lr"``); each run records which in
``run.extra["teacher_input"]`` and the global label's rule in ``run.extra["global_label"]``
(:mod:`cxrstudy.methods.mlcak.training`).

The small-vs-large contrast (:func:`contrast_pairs`, :func:`paired_deltas`) gives each
comparison's ΔAUC per class and per class group with paired patient-bootstrap CIs, the test
positives beside each class, and leaves classes with few test positives out of the group means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from ...data.labels import canonical
from ...models import patch_size_for
from ...tables import AUC_COLUMNS, overall_row, run_metrics
from .training import check_weights

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from ...experiment import StudyData
    from ...outputs import Outputs
    from ...train import Schedule

#: The keys of each arm's entry in the notebook's ``distillation`` table: L's weights.
WEIGHTS = ("alpha", "beta", "gamma")
#: Findings that occupy a few pixels at 28 px, by each release's name (matched by
#: :func:`~cxrstudy.data.labels.canonical` name): NIH/ChestMNIST "Nodule" and "Mass", CheXpert
#: "Lung Lesion" (its nodules and masses), VinDr-CXR "Nodule/Mass".
SMALL_LESIONS = ("Nodule", "Mass", "Lung Lesion", "Nodule/Mass")
#: Findings that fill a large part of the film: "Cardiomegaly" in all three, and the effusion,
#: spelled "Effusion" (NIH), "Pleural Effusion" (CheXpert), "Pleural effusion" (VinDr-CXR).
LARGE_FINDINGS = ("Cardiomegaly", "Effusion", "Pleural Effusion", "Pleural effusion")
NO_TEACHER = "—"
GROUPS = ("small lesion", "large finding", "other")
#: Classes with fewer known positives on the test split stay out of the group means
#: (see :func:`paired_deltas`).
MIN_TEST_POSITIVES = 5


def prepare_resolutions(dataset: str, data_root, sizes: Iterable[int], **prepare_kwargs
                        ) -> dict[int, object]:
    """:func:`cxrstudy.experiment.prepare_data` at each size: the same patients in every split
    (the split and subsample depend on the seed, not on the size — checked here)."""
    from ...experiment import prepare_data

    sizes = sorted({int(s) for s in sizes})
    datasets = {size: prepare_data(dataset, data_root, size, **prepare_kwargs) for size in sizes}
    first = datasets[sizes[0]]
    for size, data in datasets.items():
        for split in ("train", "val", "test"):
            ours = getattr(data, split).records["image_id"].to_numpy()
            if not np.array_equal(ours, getattr(first, split).records["image_id"].to_numpy()):
                raise RuntimeError(f"the {split} split at {size} px holds other images than at "
                                   f"{sizes[0]} px")
    return datasets


def open_resolutions(output_dir, dataset: str, data_root, sizes: Iterable[int], *, seed: int = 0,
                     max_images: int | None = None, **options
                     ) -> tuple[dict[int, "StudyData"], "Outputs"]:
    """Notebook 04's first step in one call, the shape of :func:`cxrstudy.experiment.open_study`:
    the data at every size (:func:`prepare_resolutions`), then the results folder, with the one
    split (the same at every size) recorded."""
    from ...experiment import record_data
    from ...outputs import Outputs

    data = prepare_resolutions(dataset, data_root, sizes, seed=seed, max_images=max_images, **options)
    first = data[min(data)]
    out = Outputs(output_dir, synthetic=first.synthetic)
    shown = ", ".join(str(size) for size in sorted(data))
    record_data(first, out, caption=f"Patient-level splits of {dataset} (seed {seed}), the same "
                                    f"patients at {shown} px")
    return data, out


def vit_kwargs(image_size: int, grid: int) -> dict:
    """Patch size keeping a ``grid``×``grid`` token grid at ``image_size`` (224 → 16, 28 → 2).

    Where ``image_size`` is not a multiple of ``grid`` (ChestMNIST's 64 and 128 px with a
    14-token grid) the patch is the largest divisor of ``image_size`` not above
    ``image_size / grid``, so the grid is a little finer (64 → patch 4, 16×16) and the teacher's
    maps are interpolated to it (``align="interpolate"``).
    """
    try:
        return {"patch_size": patch_size_for(image_size, grid)}
    except ValueError:
        patch = max(p for p in range(1, image_size // grid + 1) if image_size % p == 0)
        return {"patch_size": patch}


def token_grids(sizes: Iterable[int], grid: int) -> pd.DataFrame:
    """Patch size and token grid of the ViT at each size (what the attention maps align on)."""
    rows = []
    for size in sorted({int(s) for s in sizes}):
        patch = vit_kwargs(size, grid)["patch_size"]
        rows.append({"resolution": size, "patch": patch, "grid": f"{size // patch}×{size // patch}",
                     "patch tokens": (size // patch) ** 2})
    return pd.DataFrame(rows)


def train_teacher(data: StudyData, out: Outputs, schedule: Schedule | None = None, *,
                  model: str = "deit_small_mt", grid: int = 14,
                  global_label: str = "no_finding", model_kwargs: dict | None = None,
                  pretrained: bool | str = False, **train_kwargs):
    """The two-task ViT teacher at the data's (highest) resolution, trained alone
    (``model_kwargs``: more options of the ViT beside the patch size).

    ``pretrained`` is the teacher's initialisation, which the paper does not give: False (from
    scratch), True (the ViT's ImageNet weights from the local timm cache, through
    :func:`cxrstudy.models.create_model`, which says what to download when they are missing) or
    a weight file. The students always start from scratch.
    """
    from ...experiment import train_and_evaluate
    from .training import MLCAKTrainer, dataset_global_labels

    labels = dataset_global_labels(data.train, global_label)
    run = train_and_evaluate(model, data, out, schedule, tag=f"teacher_{data.image_size}",
                             pretrained=pretrained,
                             model_kwargs=dict(vit_kwargs(data.image_size, grid),
                                               **(model_kwargs or {})),
                             trainer_cls=MLCAKTrainer,
                             trainer_kwargs={"teacher": None, "global_label": labels},
                             **train_kwargs)
    run.extra.update(teacher_input=None, global_label=labels.rule)
    return run


def loss_weights(weights: Mapping[str, float], owner: str = "the loss") -> dict[str, float]:
    """``{"alpha": α, "beta": β, "gamma": γ}`` as floats, refused unless exactly those three
    non-negative weights are given (``owner`` names them in the error)."""
    weights = dict(weights)
    if set(weights) != set(WEIGHTS):
        raise ValueError(f"{owner} must give exactly {', '.join(WEIGHTS)}, got "
                         f"{', '.join(weights) or 'nothing'}")
    check_weights(*(weights[name] for name in WEIGHTS))
    return {name: float(weights[name]) for name in WEIGHTS}


def arm_weights(distillation: Mapping[str, Mapping[str, float]], arm: str) -> dict[str, float]:
    """The arm's weights (:func:`loss_weights`) from the notebook's ``distillation`` table."""
    if arm not in distillation:
        raise ValueError(f"unknown arm {arm!r}; the distillation table has "
                         f"{', '.join(distillation)}")
    return loss_weights(distillation[arm], f"arm {arm!r}")


def distils(weights: Mapping[str, float]) -> bool:
    """Whether an arm learns from the teacher at all (some weight above 0). One that does not is
    the student alone: the teacher is never run for it, so it costs what a plain run costs."""
    return any(float(weights[name]) > 0 for name in WEIGHTS)


@dataclass(frozen=True)
class StudentSetup:
    """What every student run of notebook 04 shares, built once after the teacher, so that one
    run reads ``train_student(arm, data[size], out, schedule, setup)``.

    ``distillation``: the notebook's table ``{arm: {"alpha", "beta", "gamma"}}`` (module
    docstring). ``teacher``: the trained teacher (None only if every arm is the student alone).
    ``teacher_data``: the :class:`~cxrstudy.experiment.StudyData` at the teacher's resolution
    (same split as the students'), whose training split the teacher reads with
    ``teacher_input="high_res"``; ``"upsampled_lr"`` needs none. ``model``/``grid``/
    ``model_kwargs``: the two-task ViT at every size (:func:`vit_kwargs`). ``global_label``,
    ``attention_levels``, ``align``: :class:`~cxrstudy.methods.mlcak.training.MLCAKTrainer`'s.
    ``seed``, ``n_boot``: every run's seed and bootstrap resamples.
    """

    distillation: Mapping[str, Mapping[str, float]]
    teacher: object = None
    teacher_data: "StudyData | None" = None
    teacher_input: str = "high_res"
    global_label: str = "no_finding"
    model: str = "deit_small_mt"
    grid: int = 14
    attention_levels: int = 3
    align: str = "interpolate"
    model_kwargs: Mapping | None = None
    seed: int = 0
    n_boot: int = 1000

    def trainer_kwargs(self, arm: str) -> dict:
        """The :class:`~cxrstudy.methods.mlcak.training.MLCAKTrainer` settings of ``arm``
        (without the global label): no teacher for the student alone, else the teacher, its
        input and the arm's weights."""
        from .training import TEACHER_INPUTS

        weights = arm_weights(self.distillation, arm)
        if not distils(weights):
            return {"teacher": None}
        if self.teacher is None:
            raise ValueError(f"arm {arm!r} distils from a teacher: set StudentSetup(teacher=)")
        if self.teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"teacher_input must be one of {', '.join(TEACHER_INPUTS)}, "
                             f"got {self.teacher_input!r}")
        high_res = self.teacher_input == "high_res"
        if high_res and self.teacher_data is None:
            raise ValueError(f"arm {arm!r} with teacher_input='high_res' needs teacher_data (the "
                             f"data at the teacher's resolution)")
        return dict(weights, teacher=self.teacher, teacher_input=self.teacher_input,
                    teacher_data=self.teacher_data.train if high_res else None,
                    attention_levels=self.attention_levels, align=self.align)


def train_student(arm: str, data: StudyData, out: Outputs, schedule: Schedule | None,
                  setup: StudentSetup, **train_kwargs):
    """One student arm at the data's resolution: the two-task ViT trained with the arm's
    weights from ``setup.distillation`` (module docstring). ``train_kwargs`` go to
    :func:`~cxrstudy.experiment.train_and_evaluate` (e.g. ``progress=False``)."""
    from ...experiment import train_and_evaluate
    from .training import MLCAKTrainer, dataset_global_labels

    settings = setup.trainer_kwargs(arm)
    labels = dataset_global_labels(data.train, setup.global_label)
    run = train_and_evaluate(setup.model, data, out, schedule, tag=f"{arm}_{data.image_size}",
                             model_kwargs=dict(vit_kwargs(data.image_size, setup.grid),
                                               **(setup.model_kwargs or {})),
                             trainer_cls=MLCAKTrainer,
                             trainer_kwargs=dict(settings, global_label=labels),
                             **{"seed": setup.seed, "n_boot": setup.n_boot, **train_kwargs})
    run.extra.update(teacher_input=None if settings["teacher"] is None else setup.teacher_input,
                     global_label=labels.rule)
    return run


class OneBatchLoss(NamedTuple):
    """:func:`loss_on_one_batch`'s answer: the terms table, the attention maps per block pair,
    and the CLS attention of teacher and student on the batch's first images, for
    :func:`cxrstudy.plots.map_overlays`."""

    terms: pd.DataFrame          # term, in L, weight, by hand, mlcak_loss, weighted
    levels: pd.DataFrame         # per block pair: the maps' shapes, grids and MSE
    images: list[np.ndarray]     # the first images at the teacher's size, uint8
    maps: dict[str, np.ndarray]  # "teacher …" / "student …" → CLS attention [N, h, w] in [0, 1]
    image_ids: list[str]


def _masked_bce_by_hand(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Σ m·(log(1 + e^z) − y·z) / Σ m, in float64: binary cross-entropy over the known labels."""
    z, y, m = logits.double(), target.double(), mask.double()
    return float(((torch.nn.functional.softplus(z) - y * z) * m).sum() / m.sum().clamp_min(1.0))


def _mse_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """(1/n) Σ (a − b)², in float64, over every entry."""
    return float(((a.double() - b.double()) ** 2).mean())


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(str(n) for n in tensor.shape)


def _cls_row(maps: torch.Tensor, layout) -> np.ndarray:
    """The CLS token's attention over the patches, [B, h, w] scaled to [0, 1] per image."""
    from ...models.attention_maps import minmax_per_image

    return minmax_per_image(maps[:, 0, layout.prefix:].reshape(-1, *layout.grid)).numpy()


def loss_on_one_batch(student_data: StudyData, teacher_data: StudyData, *, model: str,
                      grid: int, weights: Mapping[str, float], attention_levels: int = 3,
                      align: str = "interpolate", teacher_input: str = "high_res",
                      global_label: str = "no_finding", batch_size: int = 32, seed: int = 0,
                      n_images: int = 2, model_kwargs: Mapping | None = None) -> OneBatchLoss:
    """L = L_cls + α·MSE(z_s, z_t) + β·MSE(g_s, g_t) + γ·Σ_k MSE(A_s^k, A_t^k) on one real batch:
    the first ``batch_size`` training rows, at the student's size and (``teacher_input=
    "high_res"``) the same rows at the teacher's, or the student's batch upsampled.

    Each term is computed twice: by hand from its pieces (the logits, the labels and the maps,
    in float64) and by :func:`~cxrstudy.methods.mlcak.training.mlcak_loss`, fed as
    :class:`~cxrstudy.methods.mlcak.training.MLCAKTrainer` feeds it (maps recorded at
    :func:`~cxrstudy.methods.mlcak.training.default_layer_pairs`, the teacher's aligned to the
    student's grid). Both networks are built fresh (untrained, as ``train_and_evaluate`` builds
    them) under a forked random state seeded with ``seed``, so the caller's state is untouched;
    they run in eval mode without gradients. No augmentation: the batch as loaded.
    ``model_kwargs``: more options of the ViT beside the patch size (as :class:`StudentSetup`).
    """
    from ...data.augment import resize_square
    from ...explain.evidence import uint8_images
    from ...models import create_model
    from ...models.attention_maps import (AttentionRecorder, align_attention, attention_modules,
                                          student_view, token_layout)
    from .training import (TEACHER_INPUTS, dataset_global_labels, default_layer_pairs,
                           finding_columns, mlcak_loss)

    if teacher_input not in TEACHER_INPUTS:
        raise ValueError(f"teacher_input must be one of {', '.join(TEACHER_INPUTS)}, "
                         f"got {teacher_input!r}")
    weights = loss_weights(weights)
    train, teacher_train = student_data.train, teacher_data.train
    rows = list(range(min(int(batch_size), len(train))))
    if list(train.records["image_id"].iloc[rows]) != list(
            teacher_train.records["image_id"].iloc[rows]):
        raise ValueError("the student's and the teacher's training splits hold other rows")
    items = [train[i] for i in rows]
    images = torch.stack([item["image"] for item in items])
    target = torch.stack([item["target"] for item in items]).float()
    mask = torch.stack([item["mask"] for item in items]).float()
    teacher_images = (torch.stack([teacher_train[i]["image"] for i in rows])
                      if teacher_input == "high_res"
                      else resize_square(images, size=teacher_data.image_size))
    labels = dataset_global_labels(train, global_label)
    g_target = torch.as_tensor(labels.target[rows])
    g_mask = torch.as_tensor(labels.mask[rows])

    def build(size: int):
        return create_model(model, num_classes=len(train.classes), in_chans=1, image_size=size,
                            **vit_kwargs(size, grid), **(model_kwargs or {})).eval()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        teacher, student = build(teacher_data.image_size), build(student_data.image_size)
    pairs = default_layer_pairs(len(attention_modules(student)), len(attention_modules(teacher)),
                                attention_levels)
    s_layout, t_layout = token_layout(student), token_layout(teacher)
    with torch.no_grad():
        with AttentionRecorder(teacher, [t for _, t in pairs]) as recorded:
            t_out = teacher.forward_tasks(teacher_images)
        t_raw = recorded.ordered()
        with AttentionRecorder(student, [s for s, _ in pairs]) as recorded:
            s_out = student.forward_tasks(images)
        s_maps = [student_view(a, s_layout) for a in recorded.ordered()]
    t_maps = [align_attention(a, t_layout, s_layout, align) for a in t_raw]
    terms = mlcak_loss(s_out, target, mask, t_out, s_maps, t_maps, **weights,
                       findings=finding_columns(train.classes), global_target=g_target,
                       global_mask=g_mask)

    level_mse = [_mse_by_hand(a_s, a_t) for a_s, a_t in zip(s_maps, t_maps)]
    alpha, beta, gamma = (weights[name] for name in WEIGHTS)
    rows_out = [  # (term, in L, weight, by hand, mlcak_loss's)
        ("local BCE", "L_cls: masked BCE(z_s, y)", 1.0,
         _masked_bce_by_hand(s_out.local, target, mask), terms.local),
        ("global BCE", "L_cls: masked BCE(g_s, y_global)", 1.0,
         _masked_bce_by_hand(s_out.global_, g_target, g_mask), terms.global_),
        ("local logit KD", "α·MSE(z_s, z_t)", alpha,
         _mse_by_hand(s_out.local, t_out.local) if alpha > 0 else 0.0, terms.local_kd),
        ("global logit KD", "β·MSE(g_s, g_t)", beta,
         _mse_by_hand(s_out.global_, t_out.global_) if beta > 0 else 0.0, terms.global_kd),
        ("attention", "γ·Σ_k MSE(A_s^k, A_t^k)", gamma,
         sum(level_mse) if gamma > 0 else 0.0, terms.attention),
    ]
    table = pd.DataFrame([{"term": name, "in L": symbol, "weight": weight, "by hand": by_hand,
                           "mlcak_loss": float(ours), "weighted": weight * float(ours)}
                          for name, symbol, weight, by_hand, ours in rows_out])
    by_hand_total = sum(weight * by_hand for _, _, weight, by_hand, _ in rows_out)
    table.loc[len(table)] = {"term": "total", "in L": "L", "weight": np.nan,
                             "by hand": by_hand_total, "mlcak_loss": float(terms.total),
                             "weighted": float(terms.total)}
    levels = pd.DataFrame([{"pair": k, "student block": s, "teacher block": t,
                            "teacher map": _shape(raw),
                            "teacher grid": "×".join(map(str, t_layout.grid)),
                            "aligned teacher map": _shape(a_t), "student map": _shape(a_s),
                            "student grid": "×".join(map(str, s_layout.grid)),
                            "MSE(A_s, A_t)": mse}
                           for k, ((s, t), raw, a_t, a_s, mse)
                           in enumerate(zip(pairs, t_raw, t_maps, s_maps, level_mse), start=1)])
    shown = slice(0, min(int(n_images), len(rows)))
    t_grid, s_grid = ("×".join(map(str, layout.grid)) for layout in (t_layout, s_layout))
    maps = {f"teacher {teacher_data.image_size} px ({t_grid})": _cls_row(t_raw[-1][shown], t_layout),
            f"student {student_data.image_size} px ({s_grid})": _cls_row(s_maps[-1][shown], s_layout)}
    ids = [str(train.records["image_id"].iloc[i]) for i in rows[shown]]
    return OneBatchLoss(table, levels, uint8_images(teacher_images[shown]), maps, ids)


def arm_metrics(runs: Mapping[tuple[str, int], object]) -> dict[str, dict]:
    """:func:`cxrstudy.tables.run_metrics` keyed ``<arm>_<size>``, plus each run's
    ``teacher_input`` (None: no teacher) and ``global_label`` rule (None: no global task)."""
    keyed = {f"{arm}_{size}": run for (arm, size), run in runs.items()}
    metrics = run_metrics(keyed)
    for key, run in keyed.items():
        metrics[key]["teacher_input"] = run.extra.get("teacher_input")
        metrics[key]["global_label"] = run.extra.get("global_label")
    return metrics


def resolution_table(runs: Mapping[tuple[str, int], object]) -> pd.DataFrame:
    """One row per (arm, resolution): the teacher's input (— without a teacher), macro and
    micro AUC with 95% CIs, size, time."""
    rows = []
    for (arm, size), run in runs.items():
        row = overall_row(run)
        rows.append({"arm": arm, "resolution": int(size),
                     "teacher input": run.extra.get("teacher_input") or NO_TEACHER,
                     **{column: row[column] for column in ("params (M)", *AUC_COLUMNS, "train s")}})
    return pd.DataFrame(rows).sort_values(["arm", "resolution"]).reset_index(drop=True)


def class_group(name: str) -> str:
    """"small lesion", "large finding" or "other", by canonical name (any release's spelling)."""
    key = canonical(name)
    if key in {canonical(c) for c in SMALL_LESIONS}:
        return "small lesion"
    if key in {canonical(c) for c in LARGE_FINDINGS}:
        return "large finding"
    return "other"


def class_groups(class_names: Sequence[str]) -> pd.DataFrame:
    """The dataset's classes in each group (the small-vs-large table's denominators)."""
    groups = {}
    for name in class_names:
        groups.setdefault(class_group(name), []).append(name)
    return pd.DataFrame([{"group": group, "classes": ", ".join(groups.get(group, [])) or "—",
                          "count": len(groups.get(group, []))}
                         for group in GROUPS])


def contrast_pairs(runs: Mapping[tuple[str, int], object], teacher_size: int,
                   distillation: Mapping[str, Mapping[str, float]]
                   ) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
    """The comparisons of the small-vs-large table, ``(comparison, model, reference)`` run keys.
    The ViT students are the arms of the notebook's ``distillation`` table; the reference of the
    distillation contrast is its one arm without a teacher (all weights 0, :func:`distils`).

    - ``"distillation"``: each distilling arm minus the student alone at the same size: what
      the teacher adds, everything else equal;
    - ``"resolution"``: every run at a smaller size minus the same network at the teacher's
      size. For the ViT arms that network is the teacher — the same two-task ViT trained alone,
      on the same split, but for ``teacher_epochs``; for any other network (the hybrid) its own
      run at that size, where there is one.

    Pairs whose reference did not run are left out.
    """
    alone = [arm for arm in distillation if not distils(arm_weights(distillation, arm))]
    if len(alone) > 1:
        raise ValueError(f"arms {', '.join(alone)} all train without the teacher: the "
                         f"distillation contrast needs one reference")
    pairs = []
    for (arm, size) in runs:
        if alone and arm in distillation and arm != alone[0] and (alone[0], size) in runs:
            pairs.append(("distillation", (arm, size), (alone[0], size)))
    for (arm, size) in runs:
        if arm == "teacher" or size >= teacher_size:
            continue
        large = ("teacher", teacher_size) if arm in distillation else (arm, teacher_size)
        if large in runs:
            pairs.append(("resolution", (arm, size), large))
    return pairs


def _check_same_test_rows(model, reference, names: tuple[str, str]) -> None:
    """Both runs scored the same test images, in the same order (one split at every size)."""
    same = (np.array_equal(np.asarray(model.patient_ids), np.asarray(reference.patient_ids))
            and np.array_equal(np.asarray(model.masks), np.asarray(reference.masks))
            and np.array_equal(np.asarray(model.targets, dtype=float),
                               np.asarray(reference.targets, dtype=float), equal_nan=True))
    if not same:
        raise ValueError(f"{names[0]} and {names[1]} were scored on different test rows; a "
                         f"paired comparison needs the same images in the same order")


def _with_positives(names: Iterable[str], positives: Mapping[str, int]) -> str:
    return ", ".join(f"{name} ({positives[name]})" for name in names) or "—"


def paired_deltas(runs: Mapping[tuple[str, int], object],
                  pairs: Sequence[tuple[str, tuple[str, int], tuple[str, int]]], *,
                  min_test_positives: int = MIN_TEST_POSITIVES, n_boot: int = 1000,
                  seed: int = 0, alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ΔAUC of each pair of :func:`contrast_pairs`, per class and per group, with paired
    patient-bootstrap CIs (:func:`cxrstudy.metrics.paired_auc_difference`: both models scored
    on the same resampled patients).

    Δ_c = AUC_c(model) − AUC_c(reference); a group's Δ̄ = (1/|G|) Σ_{c∈G} Δ_c over its classes
    with at least ``min_test_positives`` known positives on the test split. Below that a
    class's AUC rests on a handful of images, and a bootstrap resample loses all k positive
    patients with probability ≈ e⁻ᵏ (37% for k = 1, 0.7% for k = 5), so the group's interval
    would rest on the resamples that happen to keep them.

    Returns ``(per_class, groups)``. per_class: comparison, arm, resolution, reference, class,
    group, test positives, AUC, reference AUC, Δ AUC, Δ low, Δ high, in group mean. groups
    (one row per pair and group): comparison, arm, resolution, reference, group, Δ AUC, Δ low,
    Δ high, classes (test positives), left out (test positives), resamples kept.
    """
    from ...metrics import label_counts, paired_auc_difference

    if int(min_test_positives) < 0:
        raise ValueError(f"min_test_positives must be 0 or more, got {min_test_positives}")
    per_class_rows, group_rows = [], []
    for comparison, model_key, reference_key in pairs:
        model, reference = runs[model_key], runs[reference_key]
        names = (f"{model_key[0]} {model_key[1]} px", f"{reference_key[0]} {reference_key[1]} px")
        _check_same_test_rows(model, reference, names)
        classes = [str(c) for c in model.per_class["class"]]
        positives = dict(zip(classes, label_counts(model.targets, model.masks)[0].tolist()))
        groups = {name: class_group(name) for name in classes}
        counted = {name for name in classes if positives[name] >= int(min_test_positives)}
        sets = {group: [c for c in classes if groups[c] == group and c in counted]
                for group in GROUPS}
        per_class, by_group = paired_auc_difference(
            model.targets, model.probs, reference.probs, classes, mask=model.masks,
            patient_ids=model.patient_ids, class_sets=sets, n_boot=n_boot, seed=seed,
            alpha=alpha, progress=False)
        pair = {"comparison": comparison, "arm": model_key[0], "resolution": int(model_key[1]),
                "reference": names[1]}
        averaged = counted & set(per_class.loc[np.isfinite(per_class["delta"]), "class"])
        for row in per_class.itertuples(index=False):
            per_class_rows.append({**pair, "class": row[0], "group": groups[row[0]],
                                   "test positives": int(row.n_pos), "AUC": row.auc_a,
                                   "reference AUC": row.auc_b, "Δ AUC": row.delta,
                                   "Δ low": row.delta_low, "Δ high": row.delta_high,
                                   "in group mean": row[0] in averaged})
        for group, row in zip(sets, by_group.itertuples(index=False)):
            members = [c for c in classes if groups[c] == group]
            left_out = [c for c in members if c not in averaged]
            averaged_here = [c for c in members if c in averaged]
            group_rows.append({**pair, "group": group, "Δ AUC": row.delta,
                               "Δ low": row.delta_low, "Δ high": row.delta_high,
                               "classes (test positives)": _with_positives(averaged_here,
                                                                           positives),
                               "left out (test positives)": _with_positives(left_out, positives),
                               "resamples kept": int(row.n_valid)})
    per_class_columns = ["comparison", "arm", "resolution", "reference", "class", "group",
                         "test positives", "AUC", "reference AUC", "Δ AUC", "Δ low", "Δ high",
                         "in group mean"]
    group_columns = ["comparison", "arm", "resolution", "reference", "group", "Δ AUC", "Δ low",
                     "Δ high", "classes (test positives)", "left out (test positives)",
                     "resamples kept"]
    return (pd.DataFrame(per_class_rows, columns=per_class_columns),
            pd.DataFrame(group_rows, columns=group_columns))


def left_out_classes(per_class: pd.DataFrame) -> str:
    """The classes :func:`paired_deltas` left out of every group mean, with their test
    positives (``"Hernia (1), Edema (2)"``; ``"none"``), for a caption."""
    rows = per_class.drop_duplicates("class")
    names = rows.loc[~rows["in group mean"], ["class", "test positives"]]
    return ", ".join(f"{c} ({n})" for c, n in names.itertuples(index=False)) or "none"


def attention_figure(runs: Mapping[tuple[str, int], object], data: Mapping[int, StudyData],
                     picks: Sequence[int], teacher_size: int, resolutions: Iterable[int],
                     arms: Sequence[str]) -> tuple[list[np.ndarray], dict[str, np.ndarray], list[str]]:
    """What the attention-map figure shows, for :func:`cxrstudy.plots.map_overlays`: the test
    images ``picks`` at the teacher's size (uint8), the CLS attention of the teacher and of one
    student arm at each of ``resolutions`` on those same images (label → maps), and their ids.

    The student shown is ``mlcak`` when it ran, else the last of ``arms``: the maps MLCAK
    distils are the ones worth comparing with the teacher's.
    """
    import torch

    from ...explain.evidence import uint8_images
    from ...models.attention_maps import cls_attention

    def batch(size: int) -> torch.Tensor:  # the same test rows at every size (one split)
        return torch.stack([data[size].test[i]["image"] for i in picks])

    shown = "mlcak" if "mlcak" in arms else arms[-1]
    teacher_images = batch(teacher_size)
    maps = {f"teacher {teacher_size} px": cls_attention(runs[("teacher", teacher_size)].model,
                                                        teacher_images)}
    for size in resolutions:
        maps[f"{shown} {size} px"] = cls_attention(runs[(shown, size)].model, batch(size))
    ids = [data[teacher_size].test.meta(i)["image_id"] for i in picks]
    return uint8_images(teacher_images), maps, ids


def resolution_strip(data: Mapping[int, StudyData], sizes: Iterable[int], index: int
                     ) -> tuple[dict[int, np.ndarray], dict[int, list], str]:
    """One test image at every loading size, for :func:`cxrstudy.plots.resolution_strip`: the
    uint8 pixels per size, its boxes per size (in that size's pixels) and its image id."""
    from ...explain.evidence import uint8_images

    sizes = list(sizes)
    images = {size: uint8_images(data[size].test[index]["image"][None])[0] for size in sizes}
    boxes = {size: data[size].test.meta(index)["boxes"] for size in sizes}
    return images, boxes, data[sizes[0]].test.meta(index)["image_id"]


__all__ = ["WEIGHTS", "SMALL_LESIONS", "LARGE_FINDINGS", "NO_TEACHER", "GROUPS",
           "MIN_TEST_POSITIVES",
           "prepare_resolutions", "open_resolutions",
           "vit_kwargs", "token_grids", "train_teacher", "loss_weights", "arm_weights", "distils", "StudentSetup",
           "train_student", "OneBatchLoss", "loss_on_one_batch", "arm_metrics",
           "resolution_table", "class_group", "class_groups", "contrast_pairs", "paired_deltas",
           "left_out_classes",
           "attention_figure", "resolution_strip"]
