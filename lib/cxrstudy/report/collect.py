"""Gather what the notebooks of one profile left in ``results/<profile>/``.

Generic on purpose: every ``NN_name/`` folder is read the same way (``metrics.json``,
``provenance.json``, ``figures/``, ``tables/``, the executed notebook), so a new notebook shows up
in the report without a change here. A study notebook without a folder is *missing*, not an error.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_NOTEBOOK = "08_report"
NOTEBOOK_FOLDER = re.compile(r"^\d\d_[A-Za-z0-9_]+$")


@dataclass
class TableFile:
    name: str
    csv: Path
    markdown: Path | None
    caption: str | None


@dataclass
class NotebookResults:
    """One notebook's outputs; ``status`` is the runner's (ok | failed), ``missing`` (no folder)
    or ``incomplete`` (a folder without metrics or provenance: running, or interrupted)."""

    name: str
    folder: Path
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    tables: list[TableFile] = field(default_factory=list)
    executed: Path | None = None

    @property
    def params(self) -> dict[str, Any]:
        return self.provenance.get("params") or {}

    def setting(self, key: str, default: Any = None) -> Any:
        """A run setting as the notebook recorded it (metrics.json first, then its parameters)."""
        if key in self.metrics:
            return self.metrics[key]
        return self.params.get(key, default)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def markdown_caption(path: Path) -> str | None:
    """The caption ``Outputs.save_table`` wrote above the table (text before the first ``|``)."""
    if not path.is_file():
        return None
    head = path.read_text().split("\n|", 1)[0].strip()
    return None if not head or head.startswith("|") else head


def read_notebook(folder: Path, name: str | None = None) -> NotebookResults:
    name = name or folder.name
    if not folder.is_dir():
        return NotebookResults(name, folder, "missing")
    provenance = _read_json(folder / "provenance.json")
    metrics = _read_json(folder / "metrics.json")
    # no provenance: run by hand (metrics, no runner record) or still running / interrupted
    status = provenance.get("status") or ("ok" if metrics else "incomplete")
    figures = sorted(folder.glob("figures/*.png"))
    tables = [TableFile(csv.stem, csv, csv.with_suffix(".md") if csv.with_suffix(".md").is_file() else None,
                        markdown_caption(csv.with_suffix(".md")))
              for csv in sorted(folder.glob("tables/*.csv"))]
    executed = folder / f"{name}.ipynb"
    return NotebookResults(name, folder, status, metrics, provenance, figures, tables,
                           executed if executed.is_file() else None)


def collect(profile_dir: Path, expected: list[str] | None = None,
            include_report: bool = False) -> dict[str, NotebookResults]:
    """Every notebook folder under ``profile_dir`` plus every ``expected`` name (missing ones
    marked ``missing``), in notebook order. ``_previous/`` and other folders are left out."""
    profile_dir = Path(profile_dir)
    found = sorted(p.name for p in profile_dir.iterdir()
                   if p.is_dir() and NOTEBOOK_FOLDER.match(p.name)) if profile_dir.is_dir() else []
    names = sorted(set(found) | set(expected or []))
    if not include_report:
        names = [n for n in names if n != REPORT_NOTEBOOK]
    return {n: read_notebook(profile_dir / n, n) for n in names}


def study_notebooks() -> list[str]:
    """The study notebooks in ``notebooks/`` (what a complete run would have produced)."""
    from ..config import discover_notebooks

    return [n for n in discover_notebooks() if n != REPORT_NOTEBOOK]


__all__ = ["NotebookResults", "TableFile", "collect", "markdown_caption", "read_notebook",
           "study_notebooks", "REPORT_NOTEBOOK"]
