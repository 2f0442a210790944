"""The tables every notebook reports: one model's metrics, and models compared to a reference.

:func:`summarize` gives per-class AUC (patient-bootstrap CI), AP and F1, and the overall macro
and micro AUC (CIs from the same resamples), macro AP and macro F1. The overall dict is
JSON-ready: plain Python numbers, with NaN (an undefined metric) written as ``None`` so that
``json.dumps`` emits ``null`` rather than the non-standard ``NaN`` token.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .bootstrap import bootstrap_ci
from .classification import (_nanmean_rows, check_inputs, f1_at_threshold, label_counts,
                             micro_auc, micro_auc_weighted, per_class_ap, per_class_auc,
                             per_class_auc_weighted)
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


def _auc_panel(y_true, y_score, mask=None) -> np.ndarray:
    """Per-class AUCs, then their macro mean, then the micro AUC: [C + 2]."""
    per_class = per_class_auc(y_true, y_score, mask)
    return np.r_[per_class, _nanmean_rows(per_class), micro_auc(y_true, y_score, mask)]


def _auc_panel_weighted(y_true, y_score, mask, weights) -> np.ndarray:
    per_class = per_class_auc_weighted(y_true, y_score, mask, weights)
    return np.column_stack([per_class, _nanmean_rows(per_class),
                            micro_auc_weighted(y_true, y_score, mask, weights)])


_auc_panel.weighted = _auc_panel_weighted


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
    macro_auc_n_valid, alpha and resampling_unit. NaN values are stored as None.
    """
    labels, scores, known = check_inputs(y_true, y_score, mask)
    y_true = np.where(known, labels, np.nan)  # unknowns carried as NaN from here on
    classes = [str(c) for c in classes]
    if len(classes) != labels.shape[1]:
        raise ValueError(f"{len(classes)} class names for {labels.shape[1]} score columns")
    n_pos, n_neg = label_counts(y_true)
    ci = bootstrap_ci(_auc_panel, y_true, scores, None, groups=patient_ids, n_boot=n_boot,
                      alpha=alpha, seed=seed, progress=progress)
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
