"""Where a notebook writes its figures, tables and metrics, in one layout every notebook shares.

``results/<profile>/<notebook>/``: ``figures/`` (PNG + SVG), ``tables/`` (CSV + Markdown),
``metrics.json`` (merged key by key, so several cells can each add their part).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import files


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to None, DataFrames to records."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return _jsonable(value.to_dict(orient="records"))
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` (numpy values made plain, non-finite floats as null) as sorted JSON, written
    atomically: a crash never leaves half a metrics or provenance file."""
    files.write_json_atomic(path, _jsonable(data), sort_keys=True)


def dropped_summary(dropped: dict[str, str], shown: int = 3) -> str:
    """``"2 (a.png, b.png)"`` for the images a run left out as unreadable; "" when none."""
    if not dropped:
        return ""
    names = ", ".join(list(dropped)[:shown]) + (", ..." if len(dropped) > shown else "")
    return f"{len(dropped)} ({names})"


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); pipes in cells are escaped."""
    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "\\|")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


class Outputs:
    """A notebook's output folder. ``Outputs(output_dir)`` creates it on first write."""

    def __init__(self, output_dir: str | os.PathLike, synthetic: bool = False):
        self.root = Path(output_dir)
        self.figures = self.root / "figures"
        self.tables = self.root / "tables"
        self.synthetic = synthetic  # every artefact made from synthetic data says so

    def _caption(self, caption: str | None) -> str | None:
        if self.synthetic:
            note = "SYNTHETIC DATA (procedural phantom, not radiographs)"
            return f"{caption} — {note}" if caption else note
        return caption

    def save_figure(self, fig, name: str, caption: str | None = None) -> Path:
        """Save ``fig`` as ``figures/<name>.png`` and ``.svg``; returns the PNG path."""
        self.figures.mkdir(parents=True, exist_ok=True)
        caption = self._caption(caption)
        if caption and self.synthetic:
            fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, color="crimson")
        png = self.figures / f"{name}.png"
        fig.savefig(png, dpi=120, bbox_inches="tight")
        fig.savefig(self.figures / f"{name}.svg", bbox_inches="tight")
        return png

    def save_table(self, table: pd.DataFrame, name: str, caption: str | None = None,
                   float_format: str = "{:.3f}") -> Path:
        """Save ``tables/<name>.csv`` (full precision) and ``.md`` (rounded, with caption)."""
        self.tables.mkdir(parents=True, exist_ok=True)
        csv = self.tables / f"{name}.csv"
        table.to_csv(csv, index=False)
        shown = table.copy()
        for col in shown.columns:
            if pd.api.types.is_float_dtype(shown[col]):
                shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else float_format.format(v))
        caption = self._caption(caption)
        text = (f"{caption}\n\n" if caption else "") + markdown_table(shown) + "\n"
        (self.tables / f"{name}.md").write_text(text)
        return csv

    def save_metrics(self, **entries: Any) -> Path:
        """Merge ``entries`` into ``metrics.json`` (keys already there are replaced, others kept)."""
        path = self.root / "metrics.json"
        current = json.loads(path.read_text()) if path.is_file() else {}
        current.update(_jsonable(entries))
        if self.synthetic:
            current["synthetic_data"] = True
        write_json_atomic(path, current)
        return path

    def load_metrics(self) -> dict:
        path = self.root / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}
