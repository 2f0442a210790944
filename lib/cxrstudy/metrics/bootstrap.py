"""Percentile bootstrap confidence intervals that resample patients, not images.

Images of one patient are correlated (follow-up films share anatomy and disease), so treating
them as independent makes intervals too narrow. Each resample draws as many patients as the
test set holds, with replacement, and keeps all images of every drawn patient (a cluster
bootstrap). The interval is the (α/2, 1 − α/2) percentile range of the metric over resamples
(Efron & Tibshirani 1993, ch. 13).

A resample in which the metric is undefined (NaN, or a ValueError such as scikit-learn's
"only one class present") is skipped and counted: ``n_valid`` says how many remained, per
element for array-valued metrics. Skipping conditions the interval on resamples where the
metric exists; for a class with very few positive patients, read ``n_valid`` with the interval.

A mean over classes must average the same classes in every resample as in the point estimate
(those defined on the whole test set), or its interval describes another quantity: a metric
may carry ``for_bootstrap(y_true, y_score, mask)``, returning the metric to evaluate on the
point and every resample with that set fixed (:func:`~cxrstudy.metrics.macro_auc` does); a
resample that loses one of the classes then has no value and is skipped like any other.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

# Resample counts [chunk, N] are generated this many elements at a time.
_MAX_CHUNK_ELEMENTS = 1 << 23


def group_codes(groups, n_rows: int) -> tuple[np.ndarray, int]:
    """Integer code per row (0..G-1) for the resampling unit; each row its own unit if None."""
    if groups is None:
        return np.arange(n_rows), n_rows
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n_rows:
        raise ValueError(f"groups must be one id per row ({n_rows}); got shape {groups.shape}")
    missing = np.flatnonzero(pd.isna(groups))
    if len(missing):
        raise ValueError(f"groups holds a missing id at row {int(missing[0])}")
    codes, uniques = pd.factorize(groups)
    return codes.astype(np.int64), len(uniques)


def resample_counts(rng: np.random.Generator, codes: np.ndarray, n_groups: int,
                    n_boot: int) -> Iterator[np.ndarray]:
    """Yield row multiplicities [chunk, N] for ``n_boot`` cluster resamples, in order.

    Each resample draws ``n_groups`` groups uniformly with replacement; a row's multiplicity is
    how often its group was drawn, so a patient's images always come (and repeat) together.
    The chunking depends only on the data size, so a seed fixes the resamples whichever way
    the metric is then evaluated.
    """
    chunk = max(1, min(n_boot, _MAX_CHUNK_ELEMENTS // max(len(codes), n_groups, 1)))
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        drawn = rng.integers(0, n_groups, size=(size, n_groups))
        flat = (drawn + (np.arange(size) * n_groups)[:, None]).ravel()
        group_counts = np.bincount(flat, minlength=size * n_groups).reshape(size, n_groups)
        yield group_counts[:, codes].astype(np.int32)
        done += size


def _as_float_array(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def bootstrap_ci(metric: Callable, y_true, y_score, mask=None, groups=None, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, progress: bool = True) -> dict:
    """Percentile bootstrap CI of ``metric(y_true, y_score, mask)`` resampling ``groups``.

    ``metric`` returns a float or an array (e.g. per-class AUCs: all CIs from one set of
    resamples). ``groups`` holds one patient id per row; None resamples rows. If ``metric`` has
    a ``weighted(y_true, y_score, mask, weights)`` attribute returning [B, ...] (the AUC metrics
    of this package do), all resamples are evaluated at once from row multiplicities — the same
    resamples and values as the loop, much faster. Otherwise the metric is called on each
    resample's rows (a patient drawn twice contributes its rows twice; rows keep their order).

    A ``for_bootstrap(y_true, y_score, mask)`` attribute of ``metric`` is called first, on the
    whole data, and what it returns is the metric evaluated (e.g. a macro mean over the classes
    defined on the whole data; see the module docstring).

    Returns ``dict(point, low, high, n_boot, n_valid)``: floats/ints for a scalar metric,
    arrays of the metric's shape otherwise; ``low``/``high`` are NaN where no resample was valid.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    n_boot = int(n_boot)
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    mask = None if mask is None else np.asarray(mask)
    n_rows = len(y_true)
    if len(y_score) != n_rows or (mask is not None and len(mask) != n_rows):
        raise ValueError(f"y_true ({n_rows}), y_score ({len(y_score)}) and mask "
                         f"({None if mask is None else len(mask)}) must have the same rows")
    fixed = getattr(metric, "for_bootstrap", None)
    if fixed is not None:
        metric = fixed(y_true, y_score, mask)
    point = _as_float_array(metric(y_true, y_score, mask))
    codes, n_groups = group_codes(groups, n_rows)
    rng = np.random.default_rng(seed)
    weighted = getattr(metric, "weighted", None)

    values = np.full((n_boot,) + point.shape, np.nan)
    bar = tqdm(total=n_boot, desc="bootstrap", leave=False, disable=not progress)
    done = 0
    for counts in resample_counts(rng, codes, n_groups, n_boot):
        if weighted is not None:
            chunk_values = _as_float_array(weighted(y_true, y_score, mask, counts))
            values[done:done + len(counts)] = chunk_values.reshape((len(counts),) + point.shape)
        else:
            for b, row_counts in enumerate(counts):
                rows = np.repeat(np.arange(n_rows), row_counts)
                try:
                    value = metric(y_true[rows], y_score[rows],
                                   None if mask is None else mask[rows])
                except ValueError:
                    continue  # undefined on this resample (e.g. one class only): stays NaN
                values[done + b] = _as_float_array(value).reshape(point.shape)
        done += len(counts)
        bar.update(len(counts))
    bar.close()

    n_valid = np.isfinite(values).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices → NaN, as documented
        low = np.nanquantile(values, alpha / 2, axis=0)
        high = np.nanquantile(values, 1 - alpha / 2, axis=0)
    if point.ndim == 0:
        return {"point": float(point), "low": float(low), "high": float(high),
                "n_boot": n_boot, "n_valid": int(n_valid)}
    return {"point": point, "low": np.asarray(low), "high": np.asarray(high), "n_boot": n_boot,
            "n_valid": np.asarray(n_valid)}
