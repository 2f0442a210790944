"""Per-class ranking and threshold metrics for multi-label outputs.

Shared conventions (every function in :mod:`cxrstudy.metrics` follows them):

- ``y_true`` [N, C] in {0, 1}; ``y_score`` [N, C], probabilities or logits (ranking metrics
  only use the order); ``mask`` [N, C], 1 = label known. A 1-D array is read as one class.
- Unknown labels are dropped per class, never read as negatives. With ``mask=None``, NaN in
  ``y_true`` marks an unknown label (the dataset contract's ``labels`` array can be passed as is).
- A class whose known rows hold a single label value has no ROC-AUC: it is NaN, reported, and
  left out of macro averages (``nanmean``).

ROC-AUC is computed from ranks (the Mann–Whitney U statistic, ties counted as one half), which
equals scikit-learn's ``roc_auc_score`` to rounding, and is fast enough to evaluate thousands of
bootstrap resamples. The ``*_weighted`` variants evaluate many resamples at once from row
multiplicities (see :func:`cxrstudy.metrics.bootstrap_ci`).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score

# Work arrays in the batched (weighted) AUC hold at most this many elements at a time.
_MAX_BATCH_ELEMENTS = 1 << 22


def check_inputs(y_true, y_score, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and normalise the three arrays.

    Returns ``(labels, scores, known)``: ``labels`` bool [N, C] (False where unknown),
    ``scores`` float64 [N, C] (0 where unknown, so stray NaN there cannot spread) and
    ``known`` bool [N, C]. Raises ValueError naming the first offending row and class.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 1:
        y_true = y_true[:, None]
    if y_score.ndim == 1:
        y_score = y_score[:, None]
    if y_true.ndim != 2 or y_score.ndim != 2:
        raise ValueError(f"y_true and y_score must be [N, C]; got shapes {y_true.shape} and "
                         f"{y_score.shape}")
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} differ in shape")
    if mask is None:
        known = ~np.isnan(y_true)
    else:
        mask = np.asarray(mask, dtype=np.float64)
        if mask.ndim == 1:
            mask = mask[:, None]
        if mask.shape != y_true.shape:
            raise ValueError(f"mask {mask.shape} does not match y_true {y_true.shape}")
        bad = ~np.isin(mask, (0.0, 1.0))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(f"mask must hold 0/1; row {row}, class {col} holds {mask[row, col]}")
        known = mask == 1.0
    bad = known & ~np.isin(y_true, (0.0, 1.0))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"y_true must be 0/1 where the label is known; row {row}, class {col} "
                         f"holds {y_true[row, col]}")
    bad = known & ~np.isfinite(y_score)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"y_score must be finite where the label is known; row {row}, class "
                         f"{col} holds {y_score[row, col]}")
    labels = known & (y_true == 1.0)
    scores = np.where(known, y_score, 0.0)
    return labels, scores, known


def label_counts(y_true, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Known positives and known negatives per class, as two int arrays [C]."""
    y_true = np.asarray(y_true, dtype=np.float64)
    labels, _, known = check_inputs(y_true, np.zeros_like(y_true), mask)
    n_pos = labels.sum(axis=0)
    return n_pos.astype(np.int64), (known.sum(axis=0) - n_pos).astype(np.int64)


# ---- ROC-AUC -----------------------------------------------------------------------------

def midranks(values) -> np.ndarray:
    """1-based ranks with ties given their average rank (the "midranks" of Sun & Xu 2014)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    if n == 0:
        return np.empty(0)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], n]
    mid = (starts + ends + 1) / 2.0  # average of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(mid, ends - starts)
    return ranks


def rank_auc(labels, scores) -> float:
    """ROC-AUC of one class as the normalised Mann–Whitney U statistic.

    AUC = (R₊ − n₊(n₊+1)/2) / (n₊ n₋), with R₊ the sum of the positives' midranks among all
    scores: the fraction of (positive, negative) pairs ranked correctly, ties counting 1/2.
    NaN when either group is empty.
    """
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = midranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def weighted_auc(labels, scores, weights, columns=None) -> np.ndarray:
    """ROC-AUC under many row weightings at once: one value per row of ``weights``.

    With integer weights (bootstrap multiplicities) this equals :func:`rank_auc` on the data
    with each row repeated that many times: AUC_b = Σ_pairs w_i w_j [s_i > s_j, ties ½] /
    (W₊ W₋). Scores are sorted once; each weighting then costs O(n). ``columns`` maps each
    entry to its column of ``weights`` (micro-AUC has several entries per image).
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.atleast_2d(weights)
    out = np.full(len(weights), np.nan)
    if len(labels) == 0 or labels.all() or not labels.any():
        return out
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    positive = labels[order]
    columns = order if columns is None else np.asarray(columns)[order]
    block_starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    step = max(1, _MAX_BATCH_ELEMENTS // len(labels))
    for lo in range(0, len(weights), step):
        w = weights[lo:lo + step][:, columns].astype(np.float64)
        w_pos = np.where(positive, w, 0.0)
        pos_in_block = np.add.reduceat(w_pos, block_starts, axis=1)
        neg_in_block = np.add.reduceat(w - w_pos, block_starts, axis=1)
        neg_below = np.cumsum(neg_in_block, axis=1) - neg_in_block
        correct_pairs = np.einsum("bk,bk->b", pos_in_block, neg_below + 0.5 * neg_in_block)
        pairs = pos_in_block.sum(axis=1) * neg_in_block.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo:lo + step] = np.where(pairs > 0, correct_pairs / pairs, np.nan)
    return out


def per_class_auc(y_true, y_score, mask=None) -> np.ndarray:
    """ROC-AUC of each class over its known rows; NaN where only one label value is known.

    Rank-based (:func:`rank_auc`); equal to ``sklearn.metrics.roc_auc_score`` per class.
    """
    labels, scores, known = check_inputs(y_true, y_score, mask)
    return np.array([rank_auc(labels[known[:, c], c], scores[known[:, c], c])
                     for c in range(labels.shape[1])])


def per_class_auc_weighted(y_true, y_score, mask, weights) -> np.ndarray:
    """:func:`per_class_auc` under each row weighting in ``weights`` [B, N] → [B, C]."""
    labels, scores, known = check_inputs(y_true, y_score, mask)
    weights = np.atleast_2d(weights)
    out = np.empty((len(weights), labels.shape[1]))
    for c in range(labels.shape[1]):
        rows = np.flatnonzero(known[:, c])
        out[:, c] = weighted_auc(labels[rows, c], scores[rows, c], weights, columns=rows)
    return out


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (no warning) where a row is all NaN."""
    finite = np.isfinite(values)
    count = finite.sum(axis=-1)
    total = np.where(finite, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_over_classes(values: np.ndarray, classes) -> np.ndarray:
    """Mean over the last axis of the fixed column set ``classes`` (a bool mask or indices);
    NaN where any of those columns is NaN, or where the set is empty.

    The macro average of a bootstrap resample: the point estimate averages the classes defined
    on the whole test set, so a resample must average the same classes or describe another
    quantity. A resample that loses one of them (no known positive or negative drawn) has no
    value and is skipped. Summed as :func:`_nanmean_rows` sums, so on the point estimate's own
    class set both give the same float.
    """
    values = np.asarray(values, dtype=np.float64)
    classes = np.asarray(classes)
    if classes.dtype == bool:
        if classes.shape != values.shape[-1:]:
            raise ValueError(f"a class mask of shape {classes.shape} for {values.shape[-1]} "
                             f"classes")
        chosen = classes
    else:
        chosen = np.zeros(values.shape[-1], dtype=bool)
        chosen[classes.astype(np.int64)] = True
    count = int(chosen.sum())
    if count == 0:
        return np.full(values.shape[:-1], np.nan)
    total = np.where(chosen, values, 0.0).sum(axis=-1)
    complete = np.isfinite(values[..., chosen]).all(axis=-1)
    return np.where(complete, total / count, np.nan)


def macro_auc(y_true, y_score, mask=None) -> float:
    """Unweighted mean of the defined per-class AUCs (undefined classes are left out).

    Under :func:`~cxrstudy.metrics.bootstrap_ci` the class set is the one defined on the data
    given (``macro_auc.for_bootstrap``): a resample missing one of those classes is skipped.
    """
    return float(_nanmean_rows(per_class_auc(y_true, y_score, mask)))


def macro_auc_weighted(y_true, y_score, mask, weights) -> np.ndarray:
    """:func:`macro_auc` under each row weighting → [B] (over each weighting's own defined
    classes; :func:`macro_auc_over` fixes the set)."""
    return _nanmean_rows(per_class_auc_weighted(y_true, y_score, mask, weights))


def macro_auc_over(classes):
    """The macro AUC over the fixed class set ``classes`` (bool mask or indices) as a metric
    for :func:`~cxrstudy.metrics.bootstrap_ci`: NaN on data where any of them has no AUC
    (:func:`mean_over_classes`)."""
    def metric(y_true, y_score, mask=None) -> float:
        return float(mean_over_classes(per_class_auc(y_true, y_score, mask), classes))

    def weighted(y_true, y_score, mask, weights) -> np.ndarray:
        return mean_over_classes(per_class_auc_weighted(y_true, y_score, mask, weights), classes)

    metric.weighted = weighted
    return metric


def _macro_auc_for_bootstrap(y_true, y_score, mask=None):
    return macro_auc_over(np.isfinite(per_class_auc(y_true, y_score, mask)))


def _flatten_known(y_true, y_score, mask):
    labels, scores, known = check_inputs(y_true, y_score, mask)
    rows, cols = np.nonzero(known)
    return labels[rows, cols], scores[rows, cols], rows


def micro_auc(y_true, y_score, mask=None) -> float:
    """One ROC-AUC over every known (image, class) entry pooled together.

    This is the micro-AUC of the MXA paper: all classes' scores share one ranking, so it also
    rewards scores that are comparable across classes, unlike the macro average.
    """
    labels, scores, _ = _flatten_known(y_true, y_score, mask)
    return rank_auc(labels, scores)


def micro_auc_weighted(y_true, y_score, mask, weights) -> np.ndarray:
    """:func:`micro_auc` under each row weighting → [B] (an image's weight covers its entries)."""
    labels, scores, rows = _flatten_known(y_true, y_score, mask)
    return weighted_auc(labels, scores, weights, columns=rows)


# Let bootstrap_ci evaluate all resamples of these metrics in one pass (same values as a loop).
per_class_auc.weighted = per_class_auc_weighted
macro_auc.weighted = macro_auc_weighted
macro_auc.for_bootstrap = _macro_auc_for_bootstrap  # resamples average the point's classes
micro_auc.weighted = micro_auc_weighted


# ---- average precision and F1 -----------------------------------------------------------

def per_class_ap(y_true, y_score, mask=None) -> np.ndarray:
    """Average precision (sklearn: Σₙ (Rₙ − Rₙ₋₁) Pₙ) per class over known rows.

    NaN where a class has no known positive (precision/recall are then undefined).
    """
    labels, scores, known = check_inputs(y_true, y_score, mask)
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        rows = known[:, c]
        if labels[rows, c].any():
            out[c] = average_precision_score(labels[rows, c], scores[rows, c])
    return out


def macro_ap(y_true, y_score, mask=None) -> float:
    """Mean average precision over classes with at least one known positive."""
    return float(_nanmean_rows(per_class_ap(y_true, y_score, mask)))


def f1_at_threshold(y_true, y_score, mask=None, threshold=0.5) -> tuple[np.ndarray, float]:
    """F1 = 2TP / (2TP + FP + FN) per class with "positive" meaning ``score >= threshold``.

    ``threshold`` is a scalar or one value per class (0.5 suits probabilities; use 0 for
    logits). A class with no known positive and no positive prediction has undefined F1 (NaN),
    left out of the macro mean. Returns ``(per_class, macro)``.
    """
    labels, scores, known = check_inputs(y_true, y_score, mask)
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim not in (0, 1) or (threshold.ndim == 1
                                        and len(threshold) != labels.shape[1]):
        raise ValueError(f"threshold must be a scalar or one value per class "
                         f"({labels.shape[1]}); got shape {threshold.shape}")
    predicted = (scores >= threshold) & known
    tp = (predicted & labels).sum(axis=0)
    fp = (predicted & ~labels).sum(axis=0)
    fn = (~predicted & labels).sum(axis=0)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)
    return per_class.astype(np.float64), float(_nanmean_rows(per_class))


def constant_score_classes(scores, classes, mask=None, tol: float = 1e-7) -> list[str]:
    """Classes whose scores do not vary over the known test images: a collapsed output, whose
    AUC is exactly 0.5 and would otherwise hide inside a macro mean."""
    scores = np.asarray(scores, dtype=np.float64)
    known = np.ones_like(scores, dtype=bool) if mask is None else np.asarray(mask) > 0
    collapsed = []
    for c, name in enumerate(classes):
        column = scores[known[:, c], c]
        if len(column) and float(column.max() - column.min()) <= tol:
            collapsed.append(str(name))
    return collapsed
