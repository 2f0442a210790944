"""Gather what the notebooks of one profile left in ``results/<profile>/``.

Generic on purpose: every ``NN_name/`` folder is read the same way (``metrics.json``,
``provenance.json``, ``figures/``, ``tables/``, the executed notebook), so a new notebook shows up
in the report without a change here. A study notebook without a folder is *missing*, not an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..outputs import Outputs

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
    def outputs(self) -> Outputs:
        """The folder's layout (read-only): where its metrics, provenance and files are."""
        return Outputs.read_only(self.folder)

    @property
    def params(self) -> dict[str, Any]:
        return self.provenance.get("params") or {}

    def setting(self, key: str, default: Any = None) -> Any:
        """A run setting as the notebook recorded it (metrics.json first, then its parameters)."""
        if key in self.metrics:
            return self.metrics[key]
        return self.params.get(key, default)


def markdown_caption(path: Path) -> str | None:
    """The caption ``Outputs.save_table`` wrote above the table (text before the first ``|``)."""
    if not path.is_file():
        return None
    head = path.read_text().split("\n|", 1)[0].strip()
    return None if not head or head.startswith("|") else head


def read_notebook(folder: Path, name: str | None = None) -> NotebookResults:
    outputs = Outputs.read_only(folder)
    name = name or outputs.name
    if not outputs.root.is_dir():
        return NotebookResults(name, folder, "missing")
    provenance = outputs.load_provenance()
    metrics = outputs.load_metrics()
    # no provenance: run by hand (metrics, no runner record) or still running / interrupted
    status = provenance.get("status") or ("ok" if metrics else "incomplete")
    tables = [TableFile(csv.stem, csv, csv.with_suffix(".md") if csv.with_suffix(".md").is_file() else None,
                        markdown_caption(csv.with_suffix(".md")))
              for csv in outputs.table_files()]
    executed = outputs.executed_notebook
    return NotebookResults(name, folder, status, metrics, provenance, outputs.figure_files(), tables,
                           executed if executed.is_file() else None)


def notebook_folders(profile_dir: Path, include_report: bool = False) -> list[Outputs]:
    """The ``NN_name/`` folders under ``profile_dir``, read-only, in notebook order;
    ``_previous/`` and other folders are left out."""
    profile_dir = Path(profile_dir)
    if not profile_dir.is_dir():
        return []
    names = sorted(p.name for p in profile_dir.iterdir() if p.is_dir() and NOTEBOOK_FOLDER.match(p.name))
    return [Outputs.of_notebook(profile_dir, n) for n in names
            if include_report or n != REPORT_NOTEBOOK]


def collect(profile_dir: Path, expected: list[str] | None = None,
            include_report: bool = False) -> dict[str, NotebookResults]:
    """Every notebook folder under ``profile_dir`` plus every ``expected`` name (missing ones
    marked ``missing``), in notebook order. ``_previous/`` and other folders are left out."""
    found = [run.name for run in notebook_folders(profile_dir, include_report=True)]
    names = sorted(set(found) | set(expected or []))
    if not include_report:
        names = [n for n in names if n != REPORT_NOTEBOOK]
    return {n: read_notebook(Outputs.of_notebook(profile_dir, n).root, n) for n in names}


def study_notebooks() -> list[str]:
    """The study notebooks in ``notebooks/`` (what a complete run would have produced)."""
    from ..pipeline.config import discover_notebooks

    return [n for n in discover_notebooks() if n != REPORT_NOTEBOOK]


__all__ = ["NotebookResults", "TableFile", "collect", "markdown_caption", "notebook_folders",
           "read_notebook", "study_notebooks", "REPORT_NOTEBOOK"]
