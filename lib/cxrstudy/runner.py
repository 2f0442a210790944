"""Execute study notebooks with papermill into ``results/<profile>/<notebook>/``.

Up-to-date outputs (same fingerprint, last run succeeded) are skipped unless ``force``; a
failing notebook keeps its partial executed copy, independent notebooks still run, notebooks
that depend on a failed one are not started, and the caller gets the list of failures.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import NotebookSpec, discover_notebooks, resolve_parameters
from .outputs import write_json_atomic
from .paths import DATA_ROOT_ENV, repo_root
from .provenance import fingerprint, provenance_record

PROVENANCE = "provenance.json"


@dataclass
class NotebookResult:
    name: str
    status: str  # ok | skipped | failed | blocked
    seconds: float
    output_dir: Path
    error: str | None = None


def absolute_data_root() -> None:
    """Kernels run in ``notebooks/``: make a relative ``CXRSTUDY_DATA_ROOT`` absolute first."""
    value = os.environ.get(DATA_ROOT_ENV)
    if value and not os.path.isabs(value):
        os.environ[DATA_ROOT_ENV] = os.path.abspath(value)


def preflight_data(params: list[dict], log: Callable[[str], None]) -> None:
    """Every dataset the chosen notebooks name must be there (ChestMNIST is fetched) before
    any kernel starts; raises :class:`~cxrstudy.data.availability.DataUnavailableError`."""
    from .data.availability import ensure_available

    needed = {(p["dataset"], p.get("data_root"), int(p.get("image_size", 224)))
              for p in params if p.get("dataset")}
    for dataset, root, size in sorted(needed, key=str):
        ensure_available(dataset, root, size, log=log)


def select(names: list[str] | str, notebooks: dict[str, NotebookSpec]) -> list[str]:
    """Resolve ``all``, stems (``01_baseline``), prefixes (``01``) or paths to notebook stems."""
    if names == "all" or names == ["all"]:
        return list(notebooks)
    chosen = []
    for name in [names] if isinstance(names, str) else names:
        stem = Path(name).stem
        matches = [n for n in notebooks if n == stem or n.split("_", 1)[0] == stem]
        if len(matches) != 1:
            raise ValueError(f"no single notebook matches {name!r}; known: {', '.join(notebooks)}")
        chosen.append(matches[0])
    return chosen


def previous_fingerprint(output_dir: Path) -> str | None:
    path = output_dir / PROVENANCE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record.get("fingerprint") if record.get("status") == "ok" else None


def previous_record(output_dir: Path) -> dict | None:
    path = output_dir / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


def archive_previous(output_dir: Path, fp: str, log: Callable[[str], None]) -> Path | None:
    """Move earlier outputs aside before a rerun, so nothing is silently overwritten.

    A failed run with the same fingerprint stays in place: its checkpoints let training resume.
    """
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return None
    record = previous_record(output_dir)
    if record is not None and record.get("status") == "failed" and record.get("fingerprint") == fp:
        log(f"    resuming in place: the last run of these parameters failed ({output_dir})")
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir.parent / "_previous" / f"{output_dir.name}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    output_dir.rename(target)
    log(f"    earlier outputs moved to {target}")
    return target


def execute_notebook(spec: NotebookSpec, params: dict, output_dir: Path,
                     kernel_name: str = "python3", progress: bool = True) -> None:
    import papermill

    output_dir.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(spec.path), str(output_dir / spec.path.name), parameters=params,
        kernel_name=kernel_name, cwd=str(spec.path.parent), progress_bar=progress,
        request_save_on_cell_execute=True,
    )


def run_notebooks(
    names: list[str] | str,
    profile: str,
    overrides: list[str] | None = None,
    force: bool = False,
    results_dir: Path | None = None,
    notebooks_dir: Path | None = None,
    params_dir: Path | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
    log: Callable[[str], None] = print,
    executor: Callable[..., None] = execute_notebook,
    check_data: bool = True,
) -> list[NotebookResult]:
    """Run the chosen notebooks of ``profile``; see the module docstring for the rules."""
    notebooks = discover_notebooks(notebooks_dir)
    all_params = resolve_parameters(profile, overrides, notebooks, params_dir)  # fails before work
    absolute_data_root()
    chosen = select(names, notebooks)
    if check_data:
        preflight_data([all_params[n] for n in chosen], log)
    results_dir = Path(results_dir) if results_dir else repo_root() / "results"
    fingerprints: dict[str, str] = {}
    failed: set[str] = set()
    results: list[NotebookResult] = []

    for position, name in enumerate(chosen, 1):
        spec = notebooks[name]
        output_dir = (results_dir / profile / name).resolve()
        params = dict(all_params[name], output_dir=str(output_dir))
        # a failed upstream counts as different from its later success (a report on it reruns)
        upstream = [(fingerprints.get(d) or previous_fingerprint(results_dir / profile / d) or "missing")
                    + (":failed" if d in failed else "") for d in spec.depends_on]
        fp = fingerprint(params, spec.path, upstream)
        fingerprints[name] = fp
        prefix = f"[{position}/{len(chosen)}] {name}"
        blocked = [d for d in spec.depends_on if d in failed]
        if blocked and not spec.runs_after_failed_upstream:
            log(f"{prefix}: not run, it depends on failed {', '.join(blocked)}")
            failed.add(name)
            results.append(NotebookResult(name, "blocked", 0.0, output_dir, f"depends on {blocked}"))
            continue
        if not force and previous_fingerprint(output_dir) == fp:
            log(f"{prefix}: up to date, skipped (use --force to rerun)")
            results.append(NotebookResult(name, "skipped", 0.0, output_dir))
            continue
        log(f"{prefix}: running (profile {profile}) → {output_dir}")
        archive_previous(output_dir, fp, log)
        start = time.perf_counter()
        error = None
        try:
            executor(spec, params, output_dir, kernel_name=kernel_name, progress=progress)
            status = "ok"
        except Exception as exc:  # papermill raises PapermillExecutionError and others
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            failed.add(name)
        seconds = time.perf_counter() - start
        write_json_atomic(output_dir / PROVENANCE,
                          provenance_record(params, fp, status, seconds, error))
        log(f"{prefix}: {status} in {seconds:.1f} s" + (f" — {error.splitlines()[0]}" if error else ""))
        results.append(NotebookResult(name, status, seconds, output_dir, error))

    total = sum(r.seconds for r in results)
    log("time per notebook: " + ", ".join(f"{r.name} {r.seconds:.1f} s ({r.status})" for r in results)
        + f"; total {total:.1f} s")
    return results
