"""Ablation tables: every arm against a reference arm on the same test images.

Each row gives the micro and macro AUC with their patient-bootstrap 95% CIs (from
:func:`cxrstudy.metrics.summarize`), the macro difference to the reference, two DeLong readings
of "is this arm different from the reference":

* ``DeLong p (micro)`` — DeLong's test on the pooled (image, class) pairs that define the
  micro AUC. The pairs of one image are not independent, so this p is optimistic; it is there
  because the MXA paper reports the micro AUC.
* ``better``/``worse`` — classes whose own DeLong test (p < 0.05, uncorrected) favours the arm
  or the reference (:func:`cxrstudy.metrics.compare_models`).

and ``collapsed`` — classes whose test scores are all the same (AUC exactly 0.5): the failure the
MXA paper's baseline showed, made visible instead of hidden in a mean. A column of the paper's
own numbers can be added; it is labelled and kept apart from ours.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .metrics import compare_models
from .metrics.delong import delong_test


def constant_score_classes(scores, classes: Sequence[str], mask=None, tol: float = 1e-7) -> list[str]:
    """Classes whose scores do not vary over the known test images (a collapsed output)."""
    scores = np.asarray(scores, dtype=np.float64)
    known = np.ones_like(scores, dtype=bool) if mask is None else np.asarray(mask) > 0
    collapsed = []
    for c, name in enumerate(classes):
        column = scores[known[:, c], c]
        if len(column) and float(column.max() - column.min()) <= tol:
            collapsed.append(str(name))
    return collapsed


def pooled_delong_p(targets, scores_a, scores_b, mask=None) -> float:
    """DeLong p for two models' micro AUCs (all known (image, class) pairs pooled)."""
    known = np.ones_like(np.asarray(targets), dtype=bool) if mask is None else np.asarray(mask) > 0
    y = np.asarray(targets)[known]
    if y.min() == y.max():
        return float("nan")
    return float(delong_test(y, np.asarray(scores_a)[known], np.asarray(scores_b)[known])["p_value"])


def _ci(low, high) -> str:
    return "" if low is None or high is None else f"{low:.3f}–{high:.3f}"


def ablation_table(runs: Mapping[str, object], reference: str, classes: Sequence[str],
                   paper: Mapping[str, float] | None = None,
                   paper_label: str = "paper (reported)") -> pd.DataFrame:
    """One row per arm (``runs``: arm → :class:`cxrstudy.experiment.RunResult`), see module doc.

    All runs must hold predictions for the same test images in the same order.
    """
    if reference not in runs:
        raise KeyError(f"reference arm {reference!r} is not among {list(runs)}")
    ref = runs[reference]
    for tag, run in runs.items():
        if run.targets.shape != ref.targets.shape or not np.array_equal(run.targets, ref.targets):
            raise ValueError(f"arm {tag!r} was tested on other images than {reference!r}")
    per_class_tests = compare_models(ref.targets, {k: r.probs for k, r in runs.items()},
                                     reference=reference, mask=ref.masks,
                                     classes=classes).set_index("model")
    rows = []
    for tag, run in runs.items():
        o = run.overall
        is_ref = tag == reference
        row = {
            "arm": tag, "params (M)": run.n_params / 1e6,
            "micro AUC": o.get("micro_auc"), "micro 95% CI": _ci(o.get("micro_auc_low"),
                                                                 o.get("micro_auc_high")),
            "macro AUC": o.get("macro_auc"), "macro 95% CI": _ci(o.get("macro_auc_low"),
                                                                 o.get("macro_auc_high")),
            "Δ macro": per_class_tests.loc[tag, "macro_auc_diff"],
            "DeLong p (micro)": np.nan if is_ref else pooled_delong_p(
                ref.targets, run.probs, ref.probs, ref.masks),
            "better": int(per_class_tests.loc[tag, "n_better"]),
            "worse": int(per_class_tests.loc[tag, "n_worse"]),
            "collapsed": len(constant_score_classes(run.probs, classes, run.masks)),
        }
        if paper is not None:
            row[paper_label] = paper.get(tag, np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["ablation_table", "constant_score_classes", "pooled_delong_p"]
