"""Execute study notebooks with papermill into ``results/<profile>/<notebook>/``.

Up-to-date outputs (same fingerprint, last run succeeded) are skipped unless ``force``; a
failing notebook keeps its partial executed copy, independent notebooks still run, notebooks
that depend on a failed one are not started, and the caller gets the list of failures.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import NotebookSpec, discover_notebooks, notebook_dependencies, resolve_parameters
from ..files import move_aside, write_json_atomic
from ..outputs import Outputs, dropped_summary, plain_json, profile_dir
from ..paths import DATA_ROOT_ENV, repo_root
from .provenance import fingerprint, provenance_record
from .order import RunProgress, dependency_order
from .workers import (THREAD_VARIABLES, Worker, execute_in_process, execute_notebook,
                      make_workers, parse_devices)

#: A run that stopped before it finished (killed, Ctrl-C, a failure) with the same fingerprint
#: continues in place: its ``last.pt`` checkpoints resume training instead of starting over.
RESUMABLE = ("failed", "running", "interrupted")


class RunLockedError(RuntimeError):
    """Another live process is running the same notebook into the same results folder."""


class RunLock:
    """One run per notebook folder: ``<profile>/.<notebook>.lock`` holds the owner's pid, host
    and start time. A lock left by a process that is gone (same host, pid not alive) is taken
    over; a live one is refused, naming who holds it."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = Outputs.read_only(output_dir).lock_file
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another machine's process: we cannot tell, so respect it
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, TypeError, ValueError):
            return True
        return True

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.holder() or {}
                if holder and self._alive(holder):
                    raise RunLockedError(
                        f"{self.output_dir} is being written by process "
                        f"{holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}); "
                        f"wait for it to finish, or delete {self.path} if that process is gone")
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.owner, handle)
            return self
        raise RunLockedError(f"could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        if (self.holder() or {}).get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)


def dropped_note(dropped: dict[str, str]) -> str:
    """`` — images dropped as unreadable: 2 (a.png, b.png) …``, or "" when none was."""
    if not dropped:
        return ""
    return (f" — images dropped as unreadable: {dropped_summary(dropped)} (all in metrics.json; "
            f"CXRSTUDY_STRICT_IMAGES=1 makes this an error)")


def describe_failure(exc: BaseException) -> str:
    """The notebook's own exception (type and message) for the terminal, not papermill's
    wrapper: ``CorruptImageError: cannot decode …`` rather than a blank cause."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (cell [{cell}])" if cell is not None else "")
    return f"{type(exc).__name__}: {exc}"


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


def fork_safe_cuda_checks() -> None:
    """Kernels ask ``torch.cuda.is_available()`` (pinned memory, a teacher's predictions) before
    a data-parallel arm forks its processes; through NVML that question leaves CUDA untouched,
    so the forked processes can still use the GPUs (PyTorch's documented switch)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")




def set_threads(threads: int) -> None:
    """CPU threads for every kernel started after this: torch sizes its pool from
    ``OMP_NUM_THREADS`` at import. On a busy machine the default (all cores) collapses
    throughput, so a shared machine wants fewer."""
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)


def preflight_data(params: list[dict], log: Callable[[str], None]) -> None:
    """Every dataset the chosen notebooks name must be there (ChestMNIST is fetched) before
    any kernel starts; raises :class:`~cxrstudy.data.availability.DataUnavailableError`."""
    from ..data.availability import ensure_available

    from ..data import list_datasets
    from ..data.availability import DataUnavailableError

    needed = {(p["dataset"], p.get("data_root"), int(p.get("image_size", 224)))
              for p in params if p.get("dataset")}
    known = list_datasets()
    for dataset in sorted({name for name, _, _ in needed} - set(known)):
        raise DataUnavailableError(f"unknown dataset {dataset!r}; known datasets: {', '.join(known)}")
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


def default_results_dir(log: Callable[[str], None] = print) -> Path:
    """``results/`` of the study this package belongs to, said out loud when the working
    directory is another cxrstudy checkout (an editable install of one clone used from a
    second clone runs the first clone's notebooks and writes into its results)."""
    root = repo_root()
    here = Path.cwd().resolve()
    if (here / "lib" / "cxrstudy").is_dir() and here != root.resolve():
        log(f"note: the cxrstudy package in use is installed from {root}, not from the "
            f"checkout in {here}; its notebooks, params and results/ are used (pass --results "
            f"to write elsewhere, or `pip install -e .` here)")
    return root / "results"


def previous_fingerprint(outputs: Outputs) -> str | None:
    """The fingerprint of the run recorded in ``outputs``, when that run succeeded."""
    record = outputs.load_provenance()
    return record.get("fingerprint") if record.get("status") == "ok" else None


def archive_previous(output_dir: Path, fp: str, log: Callable[[str], None],
                     force: bool = False) -> Path | None:
    """Move earlier outputs aside before a rerun, so nothing is silently overwritten.

    A run of the same fingerprint that did not finish (failed, interrupted by Ctrl-C, or killed
    while ``running``) stays in place: its ``last.pt`` checkpoints let training resume. With
    ``force`` (``--force``) everything is moved aside and the run starts afresh.
    """
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return None
    outputs = Outputs.read_only(output_dir)
    record = outputs.load_provenance()
    if not force and record.get("status") in RESUMABLE and record.get("fingerprint") == fp:
        log(f"    resuming in place: the last run of these parameters was {record['status']} "
            f"({output_dir})")
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = move_aside(sorted(output_dir.iterdir()), outputs.archive_dir(stamp))
    log(f"    earlier outputs moved to {target}")
    return target


@dataclass
class _Job:
    """A notebook that is to run: what :meth:`_StudyRun.execute` needs."""

    name: str
    prefix: str
    params: dict
    fp: str
    output_dir: Path


class _StudyRun:
    """The bookkeeping of one ``run_notebooks`` call: fingerprints and failures so far, and
    the per-notebook steps shared by the sequential and the device-parallel runs."""

    def __init__(self, notebooks, all_params, dependencies, profile, results_dir, force,
                 kernel_name, progress, log, executor, total):
        self.notebooks, self.all_params, self.dependencies = notebooks, all_params, dependencies
        self.profile, self.results_dir, self.force = profile, results_dir, force
        self.kernel_name, self.progress, self.log, self.executor = kernel_name, progress, log, executor
        self.total = total
        self.fingerprints: dict[str, str] = {}
        self.failed: set[str] = set()

    def prepare(self, name: str, position: int, blocked: list[str]) -> NotebookResult | _Job:
        """Blocked (by the failed upstream ``blocked``), up to date (a result), or a job to run;
        its upstream have all finished."""
        spec = self.notebooks[name]
        outputs = Outputs.of_notebook(profile_dir(self.results_dir, self.profile).resolve(), name)
        output_dir = outputs.root
        params = dict(self.all_params[name], output_dir=str(output_dir))
        depends_on = self.dependencies[name]
        # a failed upstream counts as different from its later success (a report on it reruns)
        upstream = [(self.fingerprints.get(d) or previous_fingerprint(outputs.sibling(d))
                     or "missing") + (":failed" if d in self.failed else "") for d in depends_on]
        fp = fingerprint(params, spec.path, upstream)
        self.fingerprints[name] = fp
        prefix = f"[{position}/{self.total}] {name}"
        if blocked:
            self.log(f"{prefix}: not run, it depends on failed {', '.join(blocked)}")
            return NotebookResult(name, "blocked", 0.0, output_dir, f"depends on {blocked}")
        if not self.force and previous_fingerprint(outputs) == fp:
            self.log(f"{prefix}: up to date, skipped (use --force to rerun)")
            return NotebookResult(name, "skipped", 0.0, output_dir)
        return _Job(name, prefix, params, fp, output_dir)

    def execute(self, job: _Job, worker: Worker | None = None,
                cancel: threading.Event | None = None) -> NotebookResult:
        """Lock, archive, run and record one notebook; a worker runs it on its device."""
        spec, params, fp, output_dir, prefix = (self.notebooks[job.name], job.params, job.fp,
                                                job.output_dir, job.prefix)
        log = self.log if worker is None else (lambda m: self.log(f"    {job.name}: {m.strip()}"))
        outputs = Outputs.read_only(output_dir)  # the notebook writes there; the runner reads

        def record(status: str, seconds: float, error: str | None) -> None:
            entry = provenance_record(params, fp, status, seconds, error)
            if worker is not None:
                entry["worker"] = worker.describe()
            dropped = outputs.dropped_images()
            if dropped:
                entry["dropped_images"] = dropped
            write_json_atomic(outputs.provenance_file, plain_json(entry), sort_keys=True)

        where = f"(profile {self.profile})" if worker is None else \
            f"on {worker.label}, profile {self.profile}"
        self.log(f"{prefix}: running {where} → {output_dir}")
        with RunLock(output_dir):
            archive_previous(output_dir, fp, log, force=self.force)
            output_dir.mkdir(parents=True, exist_ok=True)
            # written first, so a run killed mid-way is recognised (and resumed) next time
            record("running", 0.0, None)
            start = time.perf_counter()
            error = None
            extra = {} if worker is None else {"worker": worker, "cancel": cancel, "log": self.log}
            try:
                self.executor(spec, params, output_dir, kernel_name=self.kernel_name,
                              progress=self.progress, **extra)
                status = "ok"
            except KeyboardInterrupt:
                record("interrupted", time.perf_counter() - start, "KeyboardInterrupt")
                raise
            except Exception as exc:  # papermill raises PapermillExecutionError and others
                status, error = "failed", describe_failure(exc)
            seconds = time.perf_counter() - start
            record(status, seconds, error)
        self.log(f"{prefix}: {status} in {seconds:.1f} s" + (f" — {error}" if error else "")
                 + dropped_note(outputs.dropped_images()))
        return NotebookResult(job.name, status, seconds, output_dir, error)

    def note(self, result: NotebookResult) -> NotebookResult:
        if result.status in ("failed", "blocked"):
            self.failed.add(result.name)
        return result


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
    executor: Callable[..., None] | None = None,
    check_data: bool = True,
    devices: str | None = None,
) -> list[NotebookResult]:
    """Run the chosen notebooks of ``profile``; see the module docstring for the rules.

    ``devices`` (``"0,1,2,3"``, ``"cpu,cpu"``) runs notebooks that do not depend on each other
    at the same time, one per device, each in a process of its own (:mod:`cxrstudy.pipeline.workers`);
    without it they run one after another in this process.
    """
    notebooks = discover_notebooks(notebooks_dir)
    all_params = resolve_parameters(profile, overrides, notebooks, params_dir)  # fails before work
    dependencies = notebook_dependencies(notebooks, all_params)
    absolute_data_root()
    fork_safe_cuda_checks()
    chosen = dependency_order(select(names, notebooks), dependencies)
    workers = make_workers(parse_devices(devices)) if devices is not None else None
    if check_data:
        preflight_data([all_params[n] for n in chosen], log)
    results_dir = Path(results_dir) if results_dir else default_results_dir(log)
    log(f"results: {profile_dir(results_dir, profile).resolve()}"
        + (f"; threads per kernel: {os.environ['OMP_NUM_THREADS']} (OMP_NUM_THREADS)"
           if os.environ.get("OMP_NUM_THREADS") else ""))
    if executor is None:
        executor = execute_notebook if workers is None else execute_in_process
    run = _StudyRun(notebooks, all_params, dependencies, profile, results_dir, force,
                    kernel_name, progress, log, executor, len(chosen))
    progress = RunProgress(chosen, dependencies,
                        [n for n in chosen if notebooks[n].runs_after_failed_upstream])

    if workers is None:
        results = []
        for position, name in enumerate(progress.order, 1):
            progress.start(name)  # always ready: upstream notebooks come first
            outcome = run.prepare(name, position, progress.blocked_by(name))
            if isinstance(outcome, _Job):
                outcome = run.execute(outcome)
            results.append(run.note(outcome))
            progress.finish(name, outcome.status in ("ok", "skipped"))
        wall = None
    else:
        start = time.perf_counter()
        with _terminate_as_interrupt():
            results = _run_on_workers(run, progress, workers)
        wall = time.perf_counter() - start

    total = sum(r.seconds for r in results)
    log("time per notebook: " + ", ".join(f"{r.name} {r.seconds:.1f} s ({r.status})" for r in results)
        + f"; total {total:.1f} s"
        + (f"; wall clock {wall:.1f} s on {len(workers)} workers" if wall is not None else ""))
    return results


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``) stops a run on workers as Ctrl-C does: the notebooks in flight, in
    processes of their own, are interrupted and recorded rather than left running."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_on_workers(run: _StudyRun, progress: RunProgress,
                    workers: list[Worker]) -> list[NotebookResult]:
    """Start every ready notebook on a free worker, in dependency order, until all are done.

    The first exception (Ctrl-C included) interrupts the notebooks in flight, waits until each
    has recorded ``interrupted`` and released its lock, and is raised again.
    """
    say, lock = run.log, threading.Lock()

    def log(message: str) -> None:
        with lock:
            say(message)

    run.log = log
    log("workers: " + ", ".join(w.label for w in workers))
    position = {name: index for index, name in enumerate(progress.order, 1)}
    cancel = threading.Event()
    free, waiting = list(workers), []
    in_flight: dict[Future, tuple[str, Worker]] = {}
    results: dict[str, NotebookResult] = {}
    problem: BaseException | None = None

    def finish(result: NotebookResult) -> None:
        results[result.name] = run.note(result)
        progress.finish(result.name, result.status in ("ok", "skipped"))

    with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="cxrstudy") as pool:
        while in_flight or (problem is None and not progress.done):
            try:
                if problem is None:
                    for name in progress.ready():
                        progress.start(name)
                        outcome = run.prepare(name, position[name], progress.blocked_by(name))
                        if isinstance(outcome, _Job):
                            waiting.append(outcome)
                        else:
                            finish(outcome)
                    waiting.sort(key=lambda job: position[job.name])  # study order first
                    while waiting and free:
                        job, worker = waiting.pop(0), free.pop(0)
                        in_flight[pool.submit(run.execute, job, worker, cancel)] = (job.name, worker)
                    if progress.ready():
                        continue  # skipped or blocked ones made others ready
                finished, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    name, worker = in_flight.pop(future)
                    free.append(worker)
                    try:
                        finish(future.result())
                    except BaseException as exc:  # noqa: BLE001 - stop the others, raise it below
                        progress.finish(name, False)
                        if problem is None:
                            problem = exc
                            cancel.set()
            except KeyboardInterrupt as exc:  # Ctrl-C here, in the runner itself
                if problem is None:
                    problem = exc
                    cancel.set()
                log(f"interrupted: waiting for {len(in_flight)} notebook(s) to stop and save")
    if problem is not None:
        raise problem
    return [results[name] for name in progress.order if name in results]
