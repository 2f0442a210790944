"""Preprocessing cache: decode and resize every image once into a uint8 memmap [N, S, S].

Why: decoding a 1024-px PNG costs milliseconds, far more than a small model's step at 64 px.
After one pass, epochs read the resized pixels straight from a memory-mapped file (the OS page
cache keeps them in RAM), so training speed no longer depends on the image format.

A cache is keyed by ``(dataset.cache_key(), ordered image ids, S)``. Its files live in
``cache_dir`` (default :func:`cxrstudy.paths.cache_dir`):

- ``<name>-<S>px-<hash12>.u8``: the raw pixels, row ``k`` = image ``ids[k]``;
- ``<name>-<S>px-<hash12>.json``: the sidecar (ids, size, shape, failed ids with reasons, each
  row's source file signature and a ``complete`` flag). A cache counts as built only when the
  sidecar says ``complete``.

Nothing stale: every row remembers its file's (modification time, size) when it was read. When a
cache is opened again, a row whose file changed since (overwritten, repaired, deleted, or
appeared) is decoded again in place and its failure record updated, so an edited image never
keeps serving its old pixels and a repaired one is no longer dropped. Datasets whose pixels do
not come from one file per row (arrays, procedural phantoms) are keyed by their ids alone.

Builds stream in chunks through a small thread pool (PIL releases the GIL while decoding) into a
temporary file that is renamed into place at the end, so an interrupted build never looks
finished and memory stays bounded by one chunk however many images there are.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import paths
from ..files import write_json_atomic
from .base import CorruptImageError, CXRDataset, resize_uint8

SIDECAR_VERSION = 2           # 2: per-row file signatures (older caches are rebuilt)
DEFAULT_CHUNK = 256          # images decoded per chunk: bounds memory to chunk × S² bytes
MAX_LISTED = 20              # failures named in a warning (the sidecar keeps all of them)


class ImageFailuresError(RuntimeError):
    """Some images could not be read and the dataset is strict (the message names them)."""


def _dataset_ids(dataset: CXRDataset) -> list[str]:
    return dataset.records["image_id"].astype(str).tolist()


def cache_stem(dataset: CXRDataset, size: int | None = None) -> str:
    """``<name>-<S>px-<hash12>``: the hash covers the cache key, the ordered ids and the size."""
    size = int(size or dataset.image_size)
    payload = json.dumps({"key": dataset.cache_key(), "size": size, "ids": _dataset_ids(dataset)})
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(dataset.name)) or "dataset"
    return f"{name}-{size}px-{digest}"


def file_signatures(dataset: CXRDataset) -> list[list[int] | None]:
    """Per row, ``[mtime_ns, bytes]`` of its source file (``records["path"]``); None where the
    row has no file or the file is not there. All None for datasets without a path column."""
    if "path" not in dataset.records.columns:
        return [None] * len(dataset)
    signatures = []
    for path in dataset.records["path"]:
        try:
            stat = os.stat(path) if isinstance(path, str) else None
        except OSError:
            stat = None
        signatures.append(None if stat is None else [stat.st_mtime_ns, stat.st_size])
    return signatures


def cache_paths(dataset: CXRDataset, cache_dir=None, size: int | None = None) -> tuple[Path, Path]:
    """(pixel file, sidecar) a cache of ``dataset`` at ``size`` px has in ``cache_dir``."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir()
    stem = cache_stem(dataset, size)
    return folder / f"{stem}.u8", folder / f"{stem}.json"



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(data_path: Path) -> None:
    """Delete temp files of earlier builds of this cache whose process is gone (interrupted)."""
    for tmp in data_path.parent.glob(f"{data_path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            tmp.unlink(missing_ok=True)


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"missing file: {exc.filename}" if exc.filename else f"missing file: {exc}"
    return str(exc) or exc.__class__.__name__


class ImageCache:
    """A built cache: ``get(image_id)`` for one image, ``read_rows(rows)`` for a batch.

    Open one with :meth:`build` (builds when needed) or :meth:`open` (an existing pixel file).
    The memmap is opened lazily per process, so a cache pickles cheaply to DataLoader workers.
    """

    def __init__(self, data_path: Path, sidecar: dict):
        self.path = Path(data_path)
        self.sidecar_path = self.path.with_suffix(".json")
        self.ids: list[str] = list(sidecar["ids"])
        self.size = int(sidecar["size"])
        self.name = sidecar.get("name", "")
        self.failures: dict[str, str] = {f["image_id"]: f["reason"] for f in sidecar["failures"]}
        rows = pd.Series(np.arange(len(self.ids), dtype=np.int64), index=self.ids)
        self._rows = rows[~rows.index.duplicated()]
        self._array: np.memmap | None = None

    # ---- opening and building ---------------------------------------------------------------
    @classmethod
    def open(cls, data_path) -> "ImageCache":
        """Open a complete cache from its pixel file; raise naming the file if it is not one."""
        data_path = Path(data_path)
        sidecar = cls._read_complete_sidecar(data_path)
        if sidecar is None:
            raise FileNotFoundError(f"no complete image cache at {data_path} (missing/incomplete "
                                    f"sidecar {data_path.with_suffix('.json')}, or wrong size)")
        return cls(data_path, sidecar)

    @staticmethod
    def _read_complete_sidecar(data_path: Path, ids: list[str] | None = None,
                               size: int | None = None) -> dict | None:
        """The sidecar if it describes a finished build matching ``ids``/``size``, else None."""
        sidecar_path = data_path.with_suffix(".json")
        if not (data_path.is_file() and sidecar_path.is_file()):
            return None
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, ValueError):
            return None
        if not sidecar.get("complete") or sidecar.get("version") != SIDECAR_VERSION:
            return None
        n, s = len(sidecar["ids"]), int(sidecar["size"])
        if data_path.stat().st_size != n * s * s:
            return None
        if ids is not None and sidecar["ids"] != ids:
            return None
        if size is not None and s != int(size):
            return None
        return sidecar

    @classmethod
    def build(cls, dataset: CXRDataset, cache_dir=None, progress: bool = True,
              workers: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> "ImageCache":
        """Open the cache of ``dataset`` at ``dataset.image_size``, building it if needed.

        A finished cache with the same key is reused without reading any image. Images that
        are missing or cannot be decoded are recorded in the sidecar with the reason and left
        as zeros; deciding what to do about them is :func:`attach_cache`'s job.
        """
        size = dataset.image_size
        ids = _dataset_ids(dataset)
        if not ids:
            raise ValueError(f"{dataset.name}: cannot cache an empty dataset")
        data_path, sidecar_path = cache_paths(dataset, cache_dir)
        sidecar = cls._read_complete_sidecar(data_path, ids, size)
        signatures = file_signatures(dataset)
        if sidecar is not None:
            changed = [row for row, (then, now) in enumerate(zip(sidecar["files"], signatures))
                       if then != now]
            if changed:
                sidecar = cls._refresh_rows(dataset, data_path, sidecar, changed, signatures)
            return cls(data_path, sidecar)

        data_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(data_path)
        sidecar = {
            "version": SIDECAR_VERSION, "name": dataset.name, "cache_key": dataset.cache_key(),
            "size": size, "shape": [len(ids), size, size], "dtype": "uint8",
            "ids": ids, "files": signatures, "failures": [], "complete": False,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(sidecar_path, sidecar, indent=1)
        tmp = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}")
        try:
            failures = cls._stream_pixels(dataset, tmp, size, progress, workers, chunk_size)
            os.replace(tmp, data_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sidecar["failures"] = [{"image_id": ids[row], "reason": reason}
                               for row, reason in sorted(failures.items())]
        sidecar["complete"] = True
        sidecar["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(sidecar_path, sidecar, indent=1)
        return cls(data_path, sidecar)

    @staticmethod
    def _refresh_rows(dataset: CXRDataset, data_path: Path, sidecar: dict, rows: list[int],
                      signatures: list) -> dict:
        """Decode ``rows`` again into the pixel file (their files changed since they were cached)
        and update their failure records and signatures; returns the new sidecar."""
        size = int(sidecar["size"])
        failures = {f["image_id"]: f["reason"] for f in sidecar["failures"]}
        warnings.warn(f"{dataset.name}: {len(rows)} of {len(signatures)} images changed on disk "
                      f"since they were cached; reading them again ({data_path.name})",
                      stacklevel=3)
        pixels = np.memmap(data_path, dtype=np.uint8, mode="r+",
                           shape=(len(sidecar["ids"]), size, size))
        try:
            for row in rows:
                image_id = sidecar["ids"][row]
                try:
                    pixels[row] = resize_uint8(dataset.read_image(row), size)
                    failures.pop(image_id, None)
                except (OSError, CorruptImageError) as exc:
                    pixels[row] = 0
                    failures[image_id] = _failure_reason(exc)
            pixels.flush()
        finally:
            del pixels
        order = {image_id: k for k, image_id in enumerate(sidecar["ids"])}
        sidecar = dict(sidecar, files=signatures,
                       failures=[{"image_id": i, "reason": failures[i]}
                                 for i in sorted(failures, key=order.__getitem__)],
                       refreshed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json_atomic(data_path.with_suffix(".json"), sidecar, indent=1)
        return sidecar

    @staticmethod
    def _stream_pixels(dataset: CXRDataset, tmp: Path, size: int, progress: bool,
                       workers: int | None, chunk_size: int) -> dict[int, str]:
        """Decode, resize and append every image to ``tmp``; return {row: failure reason}."""
        n = len(dataset)
        workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        failures: dict[int, str] = {}

        def load(i: int):
            try:
                return resize_uint8(dataset.read_image(i), size), None
            except (OSError, CorruptImageError) as exc:  # FileNotFoundError is an OSError
                return None, _failure_reason(exc)

        pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        bar = tqdm(total=n, desc=f"caching {dataset.name} at {size}px", unit="img",
                   disable=not progress, leave=False)
        try:
            with open(tmp, "wb") as out:
                for start in range(0, n, chunk_size):
                    stop = min(n, start + chunk_size)
                    block = np.zeros((stop - start, size, size), dtype=np.uint8)
                    rows = range(start, stop)
                    results = pool.map(load, rows) if pool is not None else map(load, rows)
                    for offset, (image, reason) in enumerate(results):
                        if reason is None:
                            block[offset] = image
                        else:
                            failures[start + offset] = reason
                    out.write(block.tobytes())
                    bar.update(stop - start)
                out.flush()
                os.fsync(out.fileno())
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return failures

    # ---- reading ----------------------------------------------------------------------------
    @property
    def array(self) -> np.memmap:
        """The read-only memmap [N, S, S] (opened on first use in each process)."""
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r",
                                    shape=(len(self.ids), self.size, self.size))
        return self._array

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"] = None  # never pickle the pixels; workers reopen the file
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, image_id: str) -> int:
        try:
            return int(self._rows[str(image_id)])
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the cache {self.path}") from None

    def get(self, image_id: str) -> np.ndarray:
        """Image ``image_id`` as a writable uint8 [S, S] copy."""
        return np.array(self.array[self.row_of(image_id)])

    def rows_for(self, dataset: CXRDataset) -> np.ndarray:
        """Memmap row (int64) of each row of ``dataset``; raises naming ids the cache lacks."""
        ids = dataset.records["image_id"].astype(str).to_numpy()
        positions = self._rows.index.get_indexer(ids)
        absent = ids[positions < 0]
        if len(absent):
            raise KeyError(f"{len(absent)} images of {dataset.name} are not in the cache "
                           f"{self.path}, e.g. {', '.join(absent[:5])}")
        return self._rows.to_numpy()[positions]

    def read_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Images at memmap ``rows`` as uint8 [B, S, S], in the order given.

        The rows are read sorted and de-duplicated in one fancy-index (sequential disk access),
        then put back in the requested order.
        """
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self.array[unique]
        if len(unique) == len(rows) and np.array_equal(unique, rows):
            return np.asarray(block)
        return np.asarray(block[inverse])

    def __repr__(self) -> str:
        return (f"ImageCache({self.path.name}, images={len(self)}, size={self.size}, "
                f"failures={len(self.failures)})")


def _list_failures(ids: Sequence[str], failures: dict[str, str], limit: int) -> str:
    lines = [f"  {image_id}: {failures[image_id]}" for image_id in ids[:limit]]
    if len(ids) > limit:
        lines.append(f"  ... and {len(ids) - limit} more")
    return "\n".join(lines)


def attach_cache(dataset: CXRDataset, cache_dir=None, progress: bool = True) -> CXRDataset:
    """Build or open the cache of ``dataset``, attach it, and deal with unreadable images.

    Returns the dataset to use: the same one when every image was read; otherwise, unless
    ``dataset.strict``, a subset without the failed rows (with a warning that counts and names
    them). A strict dataset raises :class:`ImageFailuresError` naming the files instead.
    The returned dataset's ``dropped_images`` maps each dropped image id to its reason.
    """
    cache = ImageCache.build(dataset, cache_dir=cache_dir, progress=progress)
    dataset.cache = cache
    dataset.dropped_images = {}
    if not cache.failures:
        return dataset
    ids = dataset.records["image_id"].astype(str).to_numpy()
    failed_mask = np.isin(ids, list(cache.failures))
    failed = ids[failed_mask].tolist()
    if not failed:
        return dataset
    where = f"(all failures are listed in {cache.sidecar_path})"
    if dataset.strict:
        raise ImageFailuresError(
            f"{dataset.name}: {len(failed)} of {len(ids)} images could not be read {where}:\n"
            + _list_failures(failed, cache.failures, 50))
    if failed_mask.all():
        raise ImageFailuresError(
            f"{dataset.name}: none of the {len(ids)} images could be read {where}:\n"
            + _list_failures(failed, cache.failures, MAX_LISTED))
    warnings.warn(
        f"{dataset.name}: dropping {len(failed)} of {len(ids)} images that could not be read "
        f"{where}:\n" + _list_failures(failed, cache.failures, MAX_LISTED),
        stacklevel=2,
    )
    kept = dataset.subset(np.flatnonzero(~failed_mask), split_name=dataset.split_name)
    kept.dropped_images = {image_id: cache.failures[image_id] for image_id in failed}
    return kept


__all__ = ["ImageCache", "ImageFailuresError", "attach_cache", "cache_paths", "cache_stem",
           "file_signatures"]
