"""Device workers: ``--devices 0,1,cpu`` as one worker per entry, each running its notebook in a
process of its own.

Why a process per notebook: a kernel inherits the environment (and working directory) of the
process that starts it, and a thread cannot give two kernels two different environments. A
child process gets ``CUDA_VISIBLE_DEVICES=<id>`` (or ``""`` for ``cpu``) and its share of CPU
threads, runs papermill exactly as a sequential run does, and reports its outcome in a small
JSON file; its output comes back line by line, prefixed with the notebook's name.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import NotebookSpec
from ..outputs import Outputs

CUDA_ENV = "CUDA_VISIBLE_DEVICES"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Seconds a notebook's process gets, after Ctrl-C, to stop its kernel and save the notebook.
INTERRUPT_GRACE = 30.0


@dataclass(frozen=True)
class Worker:
    """One device slot: ``device`` is ``cpu`` or ``cuda:<n>`` (n as given on the command line);
    ``env`` is what its notebooks' processes (and their kernels) get on top of ours."""

    device: str
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        return {"device": self.device, **self.env}

    @property
    def label(self) -> str:
        threads = self.env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        return self.device + (f" ({threads} thread{'' if threads == '1' else 's'})"
                              if threads else "")


def parse_devices(text: str) -> list[str]:
    """``"0,1,cpu"`` → ``["cuda:0", "cuda:1", "cpu"]``; ``cuda:2`` is accepted too."""
    entries = [t.strip().lower() for t in str(text).split(",")]
    if not text or not all(entries):
        raise ValueError(f"--devices {text!r}: give a comma-separated list of GPU numbers or "
                         f"cpu, e.g. 0,1,2,3 or cpu,cpu")
    devices = []
    for entry in entries:
        number = entry[len("cuda:"):] if entry.startswith("cuda:") else entry
        if entry == "cpu":
            devices.append("cpu")
        elif number.isdigit():
            devices.append(f"cuda:{int(number)}")
        else:
            raise ValueError(f"--devices {text!r}: {entry!r} is neither a GPU number nor cpu")
    return devices


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_gpu_count() -> int:
    """GPUs this process may use (after its own ``CUDA_VISIBLE_DEVICES``)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_workers(devices: list[str], environ: dict[str, str] | None = None,
                 cores: int | None = None, gpu_count: Callable[[], int] = visible_gpu_count,
                 ) -> list[Worker]:
    """One :class:`Worker` per device entry.

    A GPU number counts within our own ``CUDA_VISIBLE_DEVICES`` when that is set (``--devices
    0`` under ``CUDA_VISIBLE_DEVICES=2,3`` is GPU 2), and must exist: a kernel shown no GPU
    would quietly train on the CPU. ``cpu`` hides every GPU. Without ``--threads`` (no
    ``OMP_NUM_THREADS``), the cores are shared out: cores // workers threads per kernel.
    """
    environ = os.environ if environ is None else environ
    gpus = sorted({int(d.split(":")[1]) for d in devices if d.startswith("cuda:")})
    visible = [v.strip() for v in environ.get(CUDA_ENV, "").split(",") if v.strip()]
    if gpus:
        count = len(visible) if environ.get(CUDA_ENV) else gpu_count()
        if gpus[-1] >= count:
            seen = (f"{CUDA_ENV}={environ[CUDA_ENV]}" if environ.get(CUDA_ENV)
                    else "what torch sees")
            raise ValueError(f"--devices: GPU {gpus[-1]} asked for, but only {count} GPU(s) are "
                             f"visible ({seen}); number them from 0, or use cpu")
    threads = {}
    if not environ.get("OMP_NUM_THREADS"):
        share = str(max(1, (cores or available_cores()) // len(devices)))
        threads = {variable: share for variable in THREAD_VARIABLES}
    workers = []
    for device in devices:
        if device == "cpu":
            gpu = ""
        else:
            number = int(device.split(":")[1])
            gpu = visible[number] if visible else str(number)
        workers.append(Worker(device, {CUDA_ENV: gpu, **threads}))
    return workers


class NotebookProcessError(RuntimeError):
    """A notebook that failed in its own process, with the notebook's exception (``ename``,
    ``evalue``, ``exec_count``: what the runner names on the terminal)."""

    def __init__(self, message: str, ename: str | None = None, evalue: str | None = None,
                 exec_count: int | None = None):
        super().__init__(message)
        self.ename, self.evalue, self.exec_count = ename, evalue, exec_count


def _relay(stream, name: str, log: Callable[[str], None]) -> None:
    """The process's output, one log line per line or progress update, named."""
    buffer = b""
    for chunk in iter(lambda: stream.read1(4096), b""):
        buffer += chunk
        *lines, buffer = buffer.replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            if line.strip():
                log(f"    {name} | {line.decode(errors='replace').rstrip()}")
    if buffer.strip():
        log(f"    {name} | {buffer.decode(errors='replace').rstrip()}")


def execute_in_process(spec, params: dict, output_dir: Path, kernel_name: str = "python3",
                       progress: bool = True, worker: Worker | None = None,
                       cancel: threading.Event | None = None,
                       log: Callable[[str], None] = print) -> None:
    """Run one notebook with papermill in a child process with ``worker``'s environment.

    Raises :class:`NotebookProcessError` when the notebook failed and ``KeyboardInterrupt``
    when it was interrupted; setting ``cancel`` interrupts it (SIGINT, then after
    :data:`INTERRUPT_GRACE` seconds SIGKILL).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(worker.env if worker else {}))
    handle, result_path = tempfile.mkstemp(prefix=f"cxrstudy-{spec.name}-", suffix=".json")
    os.close(handle)
    job = {"name": spec.name, "path": str(spec.path), "params": params,
           "output_dir": str(output_dir), "kernel_name": kernel_name, "progress": progress,
           "result": result_path}
    try:
        # its own session: Ctrl-C reaches the runner only, which interrupts each child once
        process = subprocess.Popen([sys.executable, "-m", "cxrstudy.pipeline.workers"], env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        process.stdin.write(json.dumps(job, default=str).encode())
        process.stdin.close()
        relay = threading.Thread(target=_relay, args=(process.stdout, spec.name, log), daemon=True)
        relay.start()
        interrupted_at = None
        while process.poll() is None:
            if cancel is not None and cancel.is_set() and interrupted_at is None:
                process.send_signal(signal.SIGINT)
                interrupted_at = time.monotonic()
            elif interrupted_at is not None and time.monotonic() - interrupted_at > INTERRUPT_GRACE:
                os.killpg(process.pid, signal.SIGKILL)
            try:
                process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        relay.join(timeout=5)
        text = Path(result_path).read_text()
        outcome = json.loads(text) if text.strip() else {}
    finally:
        Path(result_path).unlink(missing_ok=True)
    status = outcome.get("status")
    if status == "interrupted" or interrupted_at is not None:
        raise KeyboardInterrupt
    if status == "failed":
        raise NotebookProcessError(outcome.get("message", ""), outcome.get("ename"),
                                   outcome.get("evalue"), outcome.get("exec_count"))
    if status != "ok":
        raise NotebookProcessError(f"the process running {spec.name} ended with code "
                                   f"{process.returncode} and no result")


class _GroupedScheduleNotes(logging.Filter):
    """Drops papermill's notes on the training schedule's grouped lines (``epochs = 4;
    batch_size = 128; ...``): its parameter reader takes one ``name = value`` a line, so it says
    "Unable to parse line" of those lines and "Passed unknown parameter" of their fields. Our
    own reader (``ast``) sees every field, and refuses any key a notebook does not declare before
    a kernel starts, so both notes are noise here."""

    NOTES = ("Passed unknown parameter", "Unable to parse line")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTES)


def quiet_grouped_schedule_notes() -> None:
    """Install :class:`_GroupedScheduleNotes` on the two papermill loggers that write them
    (once)."""
    for name in ("papermill", "papermill.translators"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _GroupedScheduleNotes) for f in logger.filters):
            logger.addFilter(_GroupedScheduleNotes())


def execute_notebook(spec: NotebookSpec, params: dict, output_dir: Path,
                     kernel_name: str = "python3", progress: bool = True) -> None:
    """One notebook through papermill in this process: what a sequential run does for each
    notebook and what a worker's child process does for its one."""
    import papermill

    output_dir.mkdir(parents=True, exist_ok=True)
    quiet_grouped_schedule_notes()
    papermill.execute_notebook(
        str(spec.path), str(Outputs(output_dir).executed_notebook), parameters=params,
        kernel_name=kernel_name, cwd=str(spec.path.parent), progress_bar=progress,
        request_save_on_cell_execute=True,
    )


def _child_main() -> int:
    """The child side of :func:`execute_in_process`: one notebook, outcome to the result file."""
    # started in the background (nohup, &), we may inherit an ignored SIGINT: the runner's
    # interrupt must still stop the notebook
    signal.signal(signal.SIGINT, signal.default_int_handler)
    job = json.loads(sys.stdin.read())
    result = Path(job["result"])
    try:
        progress = ({"desc": "cells", "ascii": True, "mininterval": 30.0}
                    if job["progress"] else False)
        execute_notebook(NotebookSpec(job["name"], Path(job["path"]), {}), job["params"],
                         Path(job["output_dir"]), kernel_name=job["kernel_name"],
                         progress=progress)
        outcome = {"status": "ok"}
    except KeyboardInterrupt:
        outcome = {"status": "interrupted"}
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the runner
        outcome = {"status": "failed", "message": f"{type(exc).__name__}: {exc}",
                   "ename": getattr(exc, "ename", None) or type(exc).__name__,
                   "evalue": getattr(exc, "evalue", None) if getattr(exc, "ename", None)
                   else str(exc),
                   "exec_count": getattr(exc, "exec_count", None)}
    result.write_text(json.dumps(outcome))
    return {"ok": 0, "interrupted": 130}.get(outcome["status"], 1)


if __name__ == "__main__":
    sys.exit(_child_main())
