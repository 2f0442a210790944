"""DeLong's test for two correlated ROC-AUCs and DeLong confidence intervals.

DeLong, DeLong & Clarke-Pearson (1988, Biometrics 44:837) estimate the covariance of AUCs
measured on the same cases from *structural components* (placement values). For m positives
X_i and n negatives Y_j of modality k, with ψ(x, y) = 1 if x > y, ½ if x = y, 0 otherwise:

    V10_k(X_i) = (1/n) Σ_j ψ(X_i, Y_j)        V01_k(Y_j) = (1/m) Σ_i ψ(X_i, Y_j)
    AUC_k = mean_i V10_k(X_i) = mean_j V01_k(Y_j)
    S = S10 / m + S01 / n,   S10, S01 = sample covariance matrices (over i, over j) of V10, V01

and the test of AUC_a = AUC_b is z = (AUC_a − AUC_b) / sqrt(S_aa + S_bb − 2 S_ab), two-sided
p = 2 Φ(−|z|). The components come from midranks in O((m + n) log(m + n)) (Sun & Xu 2014,
IEEE Signal Process. Lett. 21:1389): V10(X_i) = (T_Z(X_i) − T_X(X_i)) / n and
V01(Y_j) = 1 − (T_Z(Y_j) − T_Y(Y_j)) / m, with T the midranks within positives (X), negatives
(Y) and both (Z). At least two positives and two negatives are needed for the covariances.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from .classification import check_inputs, midranks


def structural_components(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC [K] and placement values V10 [K, m], V01 [K, n] of K score vectors on one labelling.

    ``scores`` is [K, N] (or [N] for one modality); ``labels`` is bool-like [N].
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = int(labels.sum()), int((~labels).sum())
    positives, negatives = scores[:, labels], scores[:, ~labels]
    v10 = np.empty((len(scores), m))
    v01 = np.empty((len(scores), n))
    for k in range(len(scores)):
        combined = midranks(np.r_[positives[k], negatives[k]])
        v10[k] = (combined[:m] - midranks(positives[k])) / n
        v01[k] = 1.0 - (combined[m:] - midranks(negatives[k])) / m
    return v10.mean(axis=1), v10, v01


def delong_covariance(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [K] and their DeLong covariance matrix S = S10/m + S01/n [K, K].

    Returns NaN (AUC and/or covariance) when fewer than one (AUC) or two (covariance) cases of
    either label are present.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    k = len(scores)
    m, n = int(labels.sum()), int((~labels).sum())
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    auc, v10, v01 = structural_components(labels, scores)
    if m < 2 or n < 2:
        return auc, np.full((k, k), np.nan)
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return auc, s10 / m + s01 / n


def _one_class(y_true, *scores) -> tuple[np.ndarray, list[np.ndarray]]:
    """Validate 1-D labels and score vectors of one class (no unknowns allowed here)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    if y_true.ndim != 1:
        raise ValueError(f"y_true must be 1-D for one class, got shape {y_true.shape}")
    checked = []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        if s.shape != y_true.shape:
            raise ValueError(f"scores {s.shape} do not match y_true {y_true.shape}")
        labels, values, _ = check_inputs(y_true, s, np.ones_like(y_true))
        checked.append(values[:, 0])
    return labels[:, 0], checked


def _compare(labels, score_a, score_b) -> dict:
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    auc, cov = delong_covariance(labels, np.vstack([score_a, score_b]))
    diff = auc[0] - auc[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if np.isnan(var) or np.isnan(diff):
        z = p_value = float("nan")
    elif var <= 0:
        # Both AUCs are exact (e.g. identical scores): no difference means nothing to reject.
        var = 0.0
        z = 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
        p_value = 1.0 if diff == 0 else 0.0
    else:
        z = diff / np.sqrt(var)
        p_value = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": float(diff),
            "var": float(var), "z": float(z), "p_value": float(p_value),
            "n_pos": n_pos, "n_neg": n_neg}


def delong_test(y_true, score_a, score_b) -> dict:
    """DeLong test of AUC(score_a) = AUC(score_b) on the same cases of one class.

    Returns ``dict(auc_a, auc_b, diff, var, z, p_value, n_pos, n_neg)``, ``diff = auc_a −
    auc_b``, ``var`` its variance. Identical scores give z = 0, p = 1. NaN throughout when
    a label value is missing; NaN z/p with fewer than two cases of either label.
    """
    labels, (a, b) = _one_class(y_true, score_a, score_b)
    return _compare(labels, a, b)


def delong_ci(y_true, score, alpha: float = 0.05) -> tuple[float, float, float]:
    """AUC with its DeLong (1 − α) Wald interval, clipped to [0, 1]: ``(auc, low, high)``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    labels, (values,) = _one_class(y_true, score)
    auc, cov = delong_covariance(labels, values)
    half_width = norm.ppf(1 - alpha / 2) * np.sqrt(np.maximum(cov[0, 0], 0.0))  # NaN stays NaN
    auc = float(auc[0])
    return auc, float(np.clip(auc - half_width, 0, 1)), float(np.clip(auc + half_width, 0, 1))


def delong_per_class(y_true, score_a, score_b, mask=None,
                     classes: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`delong_test` for every class over its known rows, one row per class.

    Columns: class, n_pos, n_neg, auc_a, auc_b, diff, var, z, p_value. Classes with a single
    known label value get NaN statistics. p-values are not corrected for multiple classes.
    """
    labels, scores_a, known = check_inputs(y_true, score_a, mask)
    _, scores_b, _ = check_inputs(y_true, score_b, mask)
    n_classes = labels.shape[1]
    if classes is None:
        classes = [str(c) for c in range(n_classes)]
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names for {n_classes} score columns")
    rows = []
    for c in range(n_classes):
        keep = known[:, c]
        result = _compare(labels[keep, c], scores_a[keep, c], scores_b[keep, c])
        rows.append({"class": classes[c], **result})
    columns = ["class", "n_pos", "n_neg", "auc_a", "auc_b", "diff", "var", "z", "p_value"]
    return pd.DataFrame(rows)[columns]


def pooled_delong_p(targets, scores_a, scores_b, mask=None) -> float:
    """DeLong p for two models' micro AUCs: every known (image, class) pair pooled.

    The pairs of one image are not independent, so this p is optimistic; it is reported
    because papers compare micro AUCs. NaN when the pooled pairs hold one label value only.
    """
    known = np.ones_like(np.asarray(targets), dtype=bool) if mask is None else np.asarray(mask) > 0
    y = np.asarray(targets)[known]
    if y.min() == y.max():
        return float("nan")
    return float(delong_test(y, np.asarray(scores_a)[known], np.asarray(scores_b)[known])["p_value"])
