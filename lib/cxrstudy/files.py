"""Writing a file so that a crash never leaves half of it.

Everything the study writes and later reads back — checkpoints, metrics, provenance, splits,
cache sidecars, evaluation results — goes through a temporary file in the same folder that is
then moved over the target with ``os.replace`` (atomic on one file system): a reader sees the old
file or the new one, never a torn one, and a failed write leaves the old file as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, *, sync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``
    (``sync``: flushed to disk first, for large files worth surviving a power cut); when the
    block raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        if sync:
            with open(temp, "rb") as stream:
                os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 2, sort_keys: bool = False,
                      allow_nan: bool = True) -> Path:
    """``data`` as JSON at ``path``, written atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as temp:
        with open(temp, "w") as stream:
            json.dump(data, stream, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)
            stream.write("\n")
    return path


def move_aside(paths: Iterable[str | Path], archive: str | Path) -> Path | None:
    """Move ``paths`` into the new folder ``archive`` (``archive-1``, ``-2``, … when that name is
    taken, so two runs in the same second never mix), before a rerun writes its own: nothing
    earlier is overwritten. Returns the folder; None (and nothing made) when ``paths`` is empty."""
    import shutil

    paths = [Path(p) for p in paths]
    if not paths:
        return None
    archive = target = Path(archive)
    suffix = 1
    while target.exists():
        target = archive.with_name(f"{archive.name}-{suffix}")
        suffix += 1
    target.mkdir(parents=True)
    for path in paths:
        shutil.move(str(path), str(target / path.name))
    return target


__all__ = ["atomic_path", "move_aside", "write_json_atomic"]
