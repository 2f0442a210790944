"""The low-resolution study (MLCAK, arXiv 2405.13370): one patient split at every resolution,
the teacher, the three student arms, and the tables and maps notebook 04 shows.

Arms per student resolution, differing only in distillation (:class:`cxrstudy.methods.mlcak.training.MLCAKTrainer`):
``alone`` (no teacher), ``logit_kd`` (α, β; γ = 0) and ``mlcak`` (α, β, γ). Beside them, the
EfficientViT-M hybrid trained plainly at each resolution. The paper's numbers are not public in
our sources, so nothing here is compared with them.

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

from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ...data.labels import canonical
from ...models import patch_size_for
from ...tables import AUC_COLUMNS, overall_row, run_metrics
from .training import DEFAULT_GAMMA

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from ...experiment import StudyData
    from ...outputs import Outputs
    from ...train import Schedule

ARMS = ("alone", "logit_kd", "mlcak")
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


def train_student(arm: str, data: StudyData, out: Outputs, schedule: Schedule | None = None, *,
                  teacher, teacher_data=None,
                  teacher_input: str = "high_res", global_label: str = "no_finding",
                  model: str = "deit_small_mt", grid: int = 14, alpha: float = 1.0,
                  beta: float = 1.0, gamma: float = DEFAULT_GAMMA, attention_levels: int = 3,
                  align: str = "interpolate", model_kwargs: dict | None = None, **train_kwargs):
    """One student arm at the data's resolution (see module docstring).

    ``teacher_data``: the :class:`~cxrstudy.experiment.StudyData` at the teacher's resolution
    (same split as ``data``), whose training split the teacher reads with
    ``teacher_input="high_res"``; ``"upsampled_lr"`` needs none.
    """
    from ...experiment import train_and_evaluate
    from .training import TEACHER_INPUTS, MLCAKTrainer, dataset_global_labels

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if arm != "alone" and teacher is None:
        raise ValueError(f"arm {arm!r} distils from a teacher: pass teacher=")
    if teacher_input not in TEACHER_INPUTS:
        raise ValueError(f"teacher_input must be one of {', '.join(TEACHER_INPUTS)}, "
                         f"got {teacher_input!r}")
    if arm != "alone" and teacher_input == "high_res" and teacher_data is None:
        raise ValueError(f"arm {arm!r} with teacher_input='high_res' needs teacher_data (the "
                         f"data at the teacher's resolution)")
    distil = dict(teacher=teacher, alpha=alpha, beta=beta, teacher_input=teacher_input,
                  teacher_data=None if teacher_input != "high_res" else teacher_data.train)
    settings = {"alone": dict(teacher=None),
                "logit_kd": dict(distil, gamma=0.0),
                "mlcak": dict(distil, gamma=gamma, attention_levels=attention_levels,
                              align=align)}[arm]
    labels = dataset_global_labels(data.train, global_label)
    run = train_and_evaluate(model, data, out, schedule, tag=f"{arm}_{data.image_size}",
                             model_kwargs=dict(vit_kwargs(data.image_size, grid),
                                               **(model_kwargs or {})),
                             trainer_cls=MLCAKTrainer,
                             trainer_kwargs=dict(settings, global_label=labels), **train_kwargs)
    run.extra.update(teacher_input=None if arm == "alone" else teacher_input,
                     global_label=labels.rule)
    return run


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
                   reference: str = "alone", distilled: Sequence[str] = ("logit_kd", "mlcak")
                   ) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
    """The comparisons of the small-vs-large table, ``(comparison, model, reference)`` run keys:

    - ``"distillation"``: each distilled arm minus ``reference`` (the student alone) at the
      same size: what the teacher adds, everything else equal;
    - ``"resolution"``: every run at a smaller size minus the same network at the teacher's
      size. For the ViT arms that network is the teacher — the same two-task ViT trained alone,
      on the same split, but for ``teacher_epochs``; for any other network (the hybrid) its own
      run at that size, where there is one.

    Pairs whose reference did not run are left out.
    """
    pairs = []
    for (arm, size) in runs:
        if arm in distilled and (reference, size) in runs:
            pairs.append(("distillation", (arm, size), (reference, size)))
    for (arm, size) in runs:
        if arm == "teacher" or size >= teacher_size:
            continue
        large = ("teacher", teacher_size) if arm in ARMS else (arm, teacher_size)
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


__all__ = ["ARMS", "SMALL_LESIONS", "LARGE_FINDINGS", "NO_TEACHER", "GROUPS",
           "MIN_TEST_POSITIVES",
           "prepare_resolutions", "open_resolutions",
           "vit_kwargs", "token_grids", "train_teacher", "train_student", "arm_metrics",
           "resolution_table", "class_group", "class_groups", "contrast_pairs", "paired_deltas",
           "left_out_classes",
           "attention_figure", "resolution_strip"]
