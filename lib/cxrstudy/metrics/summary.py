"""The tables every notebook reports: one model's metrics, and models compared to a reference.

:func:`summarize` gives per-class AUC (patient-bootstrap CI), AP and F1, and the overall macro
and micro AUC (CIs from the same resamples), macro AP and macro F1. The overall dict is
JSON-ready: plain Python numbers, with NaN (an undefined metric) written as ``None`` so that
``json.dumps`` emits ``null`` rather than the non-standard ``NaN`` token.
:func:`compare_models` sets models side by side with DeLong tests, and
:func:`paired_auc_difference` gives two models' ΔAUC per class and over class sets with paired
patient-bootstrap CIs.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .bootstrap import bootstrap_ci
from .classification import (_nanmean_rows, check_inputs, f1_at_threshold, label_counts,
                             mean_over_classes, micro_auc, micro_auc_weighted, per_class_ap,
                             per_class_auc, per_class_auc_weighted)
from .delong import delong_per_class


def json_ready(value):
    """Recursively turn numpy scalars/arrays into Python numbers/lists and NaN/inf into None."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())  # a 0-d array becomes a plain number
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _auc_panel(defined: np.ndarray):
    """The metric :func:`summarize` bootstraps: per-class AUCs, their macro mean over the fixed
    class set ``defined`` (the classes with an AUC on the whole test set; a resample losing one
    of them has no macro value, :func:`mean_over_classes`), then the micro AUC: [C + 2]."""
    def panel(y_true, y_score, mask=None) -> np.ndarray:
        per_class = per_class_auc(y_true, y_score, mask)
        return np.r_[per_class, mean_over_classes(per_class, defined),
                     micro_auc(y_true, y_score, mask)]

    def weighted(y_true, y_score, mask, weights) -> np.ndarray:
        per_class = per_class_auc_weighted(y_true, y_score, mask, weights)
        return np.column_stack([per_class, mean_over_classes(per_class, defined),
                                micro_auc_weighted(y_true, y_score, mask, weights)])

    panel.weighted = weighted
    return panel


def summarize(y_true, y_score, classes: Sequence[str], mask=None, patient_ids=None,
              n_boot: int = 1000, seed: int = 0, threshold=0.5, alpha: float = 0.05,
              progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Per-class table and overall dict for one model on one test set.

    CIs are (1 − α) percentile bootstrap intervals resampling ``patient_ids`` (images when
    None). Per-class columns: class, n_pos, n_neg, auc, auc_low, auc_high, ap, f1 and
    auc_n_valid (resamples in which that class's AUC was defined). ``threshold`` (scalar or
    per class) applies to F1; 0.5 assumes probabilities.

    The overall dict holds macro_auc (+ _low/_high), micro_auc (+ _low/_high), macro_ap,
    macro_f1, n_images, n_patients (None without ids), n_classes, n_classes_undefined (AUC
    undefined: one label value among known rows; left out of macro means), n_boot,
    macro_auc_n_valid, macro_auc_resamples_skipped, alpha and resampling_unit. NaN values are
    stored as None.

    The macro interval averages, in every resample, the classes the point estimate averages
    (those with an AUC on the whole test set). A resample in which any of them has no known
    positive or no known negative has no macro value: it is skipped and counted in
    ``macro_auc_resamples_skipped`` (``n_boot − macro_auc_n_valid``). With a class of k positive
    patients among n, a resample loses it with probability (1 − k/n)ⁿ ≈ e⁻ᵏ (37% for k = 1), so
    rare classes can leave few resamples. Per-class and micro intervals skip only the resamples
    where their own value is undefined.
    """
    labels, scores, known = check_inputs(y_true, y_score, mask)
    y_true = np.where(known, labels, np.nan)  # unknowns carried as NaN from here on
    classes = [str(c) for c in classes]
    if len(classes) != labels.shape[1]:
        raise ValueError(f"{len(classes)} class names for {labels.shape[1]} score columns")
    n_pos, n_neg = label_counts(y_true)
    defined = np.isfinite(per_class_auc(y_true, scores))
    ci = bootstrap_ci(_auc_panel(defined), y_true, scores, None, groups=patient_ids,
                      n_boot=n_boot, alpha=alpha, seed=seed, progress=progress)
    n_classes = len(classes)
    per_class_f1, macro_f1 = f1_at_threshold(y_true, scores, threshold=threshold)
    ap = per_class_ap(y_true, scores)
    per_class = pd.DataFrame({
        "class": classes, "n_pos": n_pos, "n_neg": n_neg,
        "auc": ci["point"][:n_classes], "auc_low": ci["low"][:n_classes],
        "auc_high": ci["high"][:n_classes], "ap": ap, "f1": per_class_f1,
        "auc_n_valid": ci["n_valid"][:n_classes],
    })
    overall = {
        "macro_auc": ci["point"][n_classes], "macro_auc_low": ci["low"][n_classes],
        "macro_auc_high": ci["high"][n_classes],
        "micro_auc": ci["point"][n_classes + 1], "micro_auc_low": ci["low"][n_classes + 1],
        "micro_auc_high": ci["high"][n_classes + 1],
        "macro_ap": _nanmean_rows(ap), "macro_f1": macro_f1,
        "n_images": labels.shape[0],
        "n_patients": None if patient_ids is None else int(pd.Series(patient_ids).nunique()),
        "n_classes": n_classes,
        "n_classes_undefined": int(np.isnan(ci["point"][:n_classes]).sum()),
        "n_boot": int(n_boot), "macro_auc_n_valid": ci["n_valid"][n_classes],
        "macro_auc_resamples_skipped": int(n_boot) - int(ci["n_valid"][n_classes]),
        "alpha": alpha, "threshold": threshold,
        "resampling_unit": "image" if patient_ids is None else "patient",
    }
    return per_class, json_ready(overall)


def compare_models(y_true, scores: Mapping[str, object], reference: str, mask=None,
                   classes: Sequence[str] | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """One row per model: macro AUC, its difference to ``reference`` and per-class DeLong p.

    Columns: model, is_reference, macro_auc, macro_auc_diff (model − reference), n_better and
    n_worse (classes where the model's AUC is higher/lower with DeLong p < ``alpha``,
    uncorrected for the number of classes), then ``p_<class>`` per class (NaN on the reference
    row and for classes whose AUC is undefined). The reference row comes first.
    """
    if reference not in scores:
        raise KeyError(f"reference model {reference!r} is not among {list(scores)}")
    n_classes = check_inputs(y_true, scores[reference], mask)[0].shape[1]
    if classes is None:
        classes = [str(c) for c in range(n_classes)]
    classes = [str(c) for c in classes]
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names for {n_classes} score columns")
    reference_macro = float(_nanmean_rows(per_class_auc(y_true, scores[reference], mask)))
    rows = []
    for name in [reference] + [n for n in scores if n != reference]:
        try:
            per_class = per_class_auc(y_true, scores[name], mask)
        except ValueError as exc:
            raise ValueError(f"model {name!r}: {exc}") from exc
        macro = float(_nanmean_rows(per_class))
        row = {"model": name, "is_reference": name == reference, "macro_auc": macro,
               "macro_auc_diff": macro - reference_macro}
        if name == reference:
            row.update(n_better=0, n_worse=0, **{f"p_{c}": np.nan for c in classes})
        else:
            tests = delong_per_class(y_true, scores[name], scores[reference], mask, classes)
            significant = tests["p_value"] < alpha
            row.update(n_better=int((significant & (tests["diff"] > 0)).sum()),
                       n_worse=int((significant & (tests["diff"] < 0)).sum()),
                       **{f"p_{c}": p for c, p in zip(classes, tests["p_value"])})
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_panel(n_classes: int, class_sets: Sequence[np.ndarray]):
    """The metric :func:`paired_auc_difference` bootstraps on [N, 2C] (model a's columns, then
    model b's): the C per-class differences, then their mean over each fixed class set."""
    def differences(per_class: np.ndarray) -> np.ndarray:
        delta = per_class[..., :n_classes] - per_class[..., n_classes:]
        means = [mean_over_classes(delta, columns) for columns in class_sets]
        stacked = (np.stack(means, axis=-1) if means
                   else np.empty(delta.shape[:-1] + (0,)))
        return np.concatenate([delta, stacked], axis=-1)

    def panel(y_true, y_score, mask=None) -> np.ndarray:
        return differences(per_class_auc(y_true, y_score, mask))

    def weighted(y_true, y_score, mask, weights) -> np.ndarray:
        return differences(per_class_auc_weighted(y_true, y_score, mask, weights))

    panel.weighted = weighted
    return panel


def paired_auc_difference(y_true, score_a, score_b, classes: Sequence[str] | None = None,
                          mask=None, patient_ids=None,
                          class_sets: Mapping[str, Sequence[str]] | None = None,
                          n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                          progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ΔAUC = AUC(a) − AUC(b) of two models on the same test rows, per class and as the mean
    over each named set of classes, with paired patient-bootstrap (1 − α) percentile CIs.

    Paired: each resample draws the patients once and scores both models on those images, so
    the interval of Δ carries the correlation of two models read on the same images (two
    models that agree give Δ = 0 in every resample: the CI [0, 0]). A set's mean
    Δ̄_S = (1/|S|) Σ_{c∈S} Δ_c is over its classes with an AUC on the whole test set, fixed for
    every resample as in :func:`summarize`'s macro; a resample losing one of them is skipped.

    Returns ``(per_class, sets)``. per_class: class, n_pos, n_neg, auc_a, auc_b, delta,
    delta_low, delta_high, n_valid. sets (one row per ``class_sets`` entry, in order): set,
    classes (the averaged ones, ", "-joined), n_classes, delta, delta_low, delta_high,
    n_valid, resamples_skipped.
    """
    labels, scores_a, known = check_inputs(y_true, score_a, mask)
    _, scores_b, _ = check_inputs(y_true, score_b, mask)
    y_true = np.where(known, labels, np.nan)
    n_classes = labels.shape[1]
    classes = [str(c) for c in (range(n_classes) if classes is None else classes)]
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names for {n_classes} score columns")
    class_sets = dict(class_sets or {})
    for name, members in class_sets.items():
        unknown = sorted(set(map(str, members)) - set(classes))
        if unknown:
            raise ValueError(f"class set {name!r} names classes not among the scores: "
                             f"{', '.join(unknown)}")
    defined = np.isfinite(per_class_auc(y_true, scores_a))  # labels decide: the same for b
    columns = [np.isin(classes, [str(m) for m in members]) & defined
               for members in class_sets.values()]
    ci = bootstrap_ci(_paired_panel(n_classes, columns), np.hstack([y_true, y_true]),
                      np.hstack([scores_a, scores_b]), None, groups=patient_ids,
                      n_boot=n_boot, alpha=alpha, seed=seed, progress=progress)
    n_pos, n_neg = label_counts(y_true)
    per_class = pd.DataFrame({
        "class": classes, "n_pos": n_pos, "n_neg": n_neg,
        "auc_a": per_class_auc(y_true, scores_a), "auc_b": per_class_auc(y_true, scores_b),
        "delta": ci["point"][:n_classes], "delta_low": ci["low"][:n_classes],
        "delta_high": ci["high"][:n_classes], "n_valid": ci["n_valid"][:n_classes],
    })
    sets = pd.DataFrame([
        {"set": name, "classes": ", ".join(np.asarray(classes)[chosen]),
         "n_classes": int(chosen.sum()), "delta": ci["point"][n_classes + k],
         "delta_low": ci["low"][n_classes + k], "delta_high": ci["high"][n_classes + k],
         "n_valid": int(ci["n_valid"][n_classes + k]),
         "resamples_skipped": int(n_boot) - int(ci["n_valid"][n_classes + k])}
        for k, (name, chosen) in enumerate(zip(class_sets, columns))],
        columns=["set", "classes", "n_classes", "delta", "delta_low", "delta_high", "n_valid",
                 "resamples_skipped"])
    return per_class, sets
