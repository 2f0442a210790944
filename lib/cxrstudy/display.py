"""How a number and its 95% CI are shown to a reader.

Tables, CSVs and ``metrics.json`` keep a CI as two numbers: the interval of a value column
``"<name> AUC"`` is the pair ``"<name> low"``, ``"<name> high"`` (:func:`ci_columns`). Only what
a person reads — a Markdown table, the report, a printed sentence — joins them, here, into
``0.650 (0.610–0.700)``.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd


def ci_columns(value: str) -> tuple[str, str]:
    """The columns holding the 95% CI of ``value``: ``"macro AUC"`` → ``("macro low",
    "macro high")``, ``"densenet121 AUC"`` → ``("densenet121 low", "densenet121 high")``."""
    stem = value[: -len(" AUC")] if value.endswith(" AUC") else value
    return f"{stem} low", f"{stem} high"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


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


__all__ = ["ci_columns", "fold_ci", "format_ci"]
