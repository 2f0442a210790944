"""Build the report of one profile from the notebooks' outputs: tables and ``index.html``.

What it writes, and what it may replace: its own tables in ``results/<profile>/08_report/tables/``
(CSV, Markdown, LaTeX), ``08_report/metrics.json`` and ``results/<profile>/index.html``. Those are
regenerated from the notebooks' outputs every time — that is the point of ``cxrstudy report`` — and
are replaced only by a report of the *same* profile: an ``index.html`` this module did not write,
or a report of another profile, is refused. Notebook outputs are only read, never changed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..outputs import Outputs
from .collect import REPORT_NOTEBOOK, NotebookResults, collect, study_notebooks
from .index import is_report_page, render_index
from ..reference import load_reference
from .tables import ReportTable, status_table, study_tables
from .writers import write_table

INDEX = "index.html"


class ReportError(RuntimeError):
    """The report would replace something that is not an earlier report of this profile."""


@dataclass
class Report:
    profile: str
    index: Path
    tables: list[ReportTable]
    table_files: dict[str, dict[str, Path]]
    results: dict[str, NotebookResults]

    @property
    def missing(self) -> list[str]:
        return [n for n, r in self.results.items() if r.status == "missing"]

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.results.items() if r.status not in ("ok", "missing")]


def _check_replaceable(profile_dir: Path, profile: str) -> None:
    index = profile_dir / INDEX
    if index.exists() and not is_report_page(index, profile):
        kind = "a report of another profile" if is_report_page(index) else "not written by cxrstudy.report"
        raise ReportError(f"{index} exists and is {kind}; move it away first (nothing was written)")
    earlier = Outputs.of_notebook(profile_dir, REPORT_NOTEBOOK).load_metrics()
    if earlier.get("profile") not in (None, profile):
        raise ReportError(f"{profile_dir / REPORT_NOTEBOOK} holds a report of profile "
                          f"{earlier['profile']!r}, not {profile!r}; nothing was written")


def build_report(profile_dir: str | Path, profile: str | None = None, note: str = "",
                 digits: int = 3, expected: list[str] | None = None, require_all: bool = False,
                 generated_by: str = "cxrstudy.report", params_dir: Path | None = None,
                 runner_provenance: bool = False) -> Report:
    """Collect ``profile_dir`` (``results/<profile>``), write the tables and the index.

    ``expected``: the study notebooks (default: those in ``notebooks/``); one without results is
    listed as missing, and with ``require_all`` the build fails naming it instead.
    ``runner_provenance``: link ``08_report/provenance.json`` although it is not there yet (notebook
    08 under the runner, which writes it as soon as the notebook ends).
    """
    profile_dir = Path(profile_dir).resolve()
    profile = profile or profile_dir.name
    if not profile_dir.is_dir():
        raise FileNotFoundError(f"no results folder {profile_dir}: run `cxrstudy run all --profile "
                                f"{profile}` first")
    _check_replaceable(profile_dir, profile)
    results = collect(profile_dir, study_notebooks() if expected is None else expected)
    missing = [n for n, r in results.items() if r.status == "missing"]
    if require_all and missing:
        raise ReportError(f"no results for {', '.join(missing)} in {profile_dir}")
    tables = study_tables(load_reference(params_dir), results, note)
    out = Outputs(profile_dir / REPORT_NOTEBOOK)
    table_files = {t.name: write_table(t, out.tables, digits) for t in tables}
    statuses = status_table(results)
    statuses.to_csv(out.tables / "runs.csv", index=False)
    index = profile_dir / INDEX
    metrics = out.save_metrics(profile=profile, generated_by=generated_by,
                               generated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               notebooks={n: r.status for n, r in results.items()}, missing=missing,
                               tables=[t.name for t in tables], index=str(index))
    own = {"executed notebook": out.executed_notebook, "metrics.json": metrics,
           "provenance.json": out.provenance_file, "runs.csv": out.tables / "runs.csv"}
    own = {k: v for k, v in own.items() if v.is_file() or (k == "provenance.json" and runner_provenance)}
    index.write_text(render_index(profile, index, tables, table_files, results, note, digits,
                                  report_files=own))
    return Report(profile, index, tables, table_files, results)


__all__ = ["INDEX", "Report", "ReportError", "build_report"]
