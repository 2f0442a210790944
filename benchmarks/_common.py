"""What every benchmark script shares: where results go and what is recorded about the machine.

Results of an earlier run are moved to ``<out>/_previous/<timestamp>/`` before a new run writes
its files, so a benchmark never overwrites a measurement somebody may still want to compare.
"""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence


def move_previous(out: Path, names: Sequence[str]) -> Path | None:
    """Move an earlier run's ``names`` in ``out`` to ``out/_previous/<timestamp>/``; that folder."""
    from cxrstudy.files import move_aside

    existing = [out / name for name in names if (out / name).exists()]
    return move_aside(existing, out / "_previous" / datetime.now().strftime("%Y%m%dT%H%M%S"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_metadata(script: str, argv: list[str], seconds: float) -> dict[str, Any]:
    """Date, CPU, torch/package versions, git state and the command line of a benchmark run."""
    import torch

    from cxrstudy.pipeline.provenance import git_state, package_versions

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git": git_state(),
        "command": [script, *argv],
        "wall_seconds": seconds,
    }


def write_result_files(out: Path, data: dict[str, Any], text: dict[str, str]) -> Path | None:
    """Write ``{name: data}`` as JSON and ``{name: text}`` under ``out``, each atomically, after
    moving an earlier run's files aside; returns where they went (None: nothing was there)."""
    from cxrstudy.files import write_json_atomic
    from cxrstudy.outputs import plain_json

    out.mkdir(parents=True, exist_ok=True)
    moved = move_previous(out, [*data, *text])
    for name, value in data.items():
        write_json_atomic(out / name, plain_json(value), sort_keys=True)
    for name, value in text.items():
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(value)
        os.replace(tmp, out / name)
    return moved
