"""How a number and its 95% CI are shown to a reader.

Tables, CSVs and ``metrics.json`` keep a CI as two numbers: the interval of a value column
``"<name> AUC"`` is the pair ``"<name> low"``, ``"<name> high"`` (:func:`ci_columns`). Only what
a person reads — a Markdown table, the report, a printed sentence — joins them, here, into
``0.650 (0.610–0.700)``. Single numbers go through :func:`format_number`, which keeps
learning rates and numbers too small for the fixed decimals readable (``1e-04``, not ``0.000``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def ci_columns(value: str) -> tuple[str, str]:
    """The columns holding the 95% CI of ``value``: ``"macro AUC"`` → ``("macro low",
    "macro high")``, ``"densenet121 AUC"`` → ``("densenet121 low", "densenet121 high")``."""
    stem = value[: -len(" AUC")] if value.endswith(" AUC") else value
    return f"{stem} low", f"{stem} high"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def is_learning_rate(name: object) -> bool:
    """True for a column or key that holds a learning rate: ``lr``, ``min_lr``, ``head_lr``,
    ``"peak lr"``, ``"learning rate"``."""
    text = str(name).strip().lower()
    return (text in ("lr", "min_lr") or "learning rate" in text or text.endswith(" lr")
            or text.endswith("_lr"))


def scientific(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits in e-notation, trailing zeros dropped:
    ``1e-04``, ``6.79e-05``, ``-2.5e-07``."""
    mantissa, exponent = f"{value:.{max(digits - 1, 0)}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def format_number(value: Any, digits: int = 3, name: object = "") -> str:
    """One number for a reader: ``digits`` decimals (``0.652``), but e-notation
    (:func:`scientific`) for a learning rate (``name``, see :func:`is_learning_rate`) and for a
    non-zero float that the decimals would show as zero (``0.00004`` → ``4e-05``). ``""`` when
    missing; integers and text as they are."""
    if _missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (float, np.floating)):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (is_learning_rate(name) or abs(value) < 0.5 * 10 ** -digits):
        return scientific(value, digits)
    return f"{value:.{digits}f}"


def format_numbers(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """For display: every float column as text through :func:`format_number` (its column name
    decides whether it is a learning rate); other columns as they are."""
    shown = frame.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = [format_number(v, digits, col) for v in shown[col]]
    return shown


def format_ci(value, low, high, digits: int = 3, label: str = "") -> str:
    """``0.650 (0.610–0.700)`` (``label`` goes inside the brackets, e.g. ``"95% CI "``); the
    value alone when the interval is missing, ``""`` when the value is."""
    if _missing(value):
        return ""
    text = f"{value:.{digits}f}"
    if _missing(low) or _missing(high):
        return text
    return f"{text} ({label}{low:.{digits}f}–{high:.{digits}f})"


def fold_ci(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """For display: each value column with both CI columns (:func:`ci_columns`) becomes one
    ``"<value> (95% CI)"`` text column in its place, and the CI columns go."""
    shown = frame.copy()
    for value in list(frame.columns):
        low, high = ci_columns(str(value))
        if low == value or low not in frame or high not in frame:
            continue
        shown[value] = [format_ci(v, lo, hi, digits)
                        for v, lo, hi in zip(frame[value], frame[low], frame[high])]
        shown = shown.drop(columns=[low, high]).rename(columns={value: f"{value} (95% CI)"})
    return shown


__all__ = ["ci_columns", "fold_ci", "format_ci", "format_number", "format_numbers", "is_learning_rate",
           "scientific"]
