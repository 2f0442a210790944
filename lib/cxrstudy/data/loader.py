"""Batches for training and evaluation, fast when the preprocessing cache is attached.

With ``dataset.cache`` set, a batch is one fancy-index of the uint8 memmap (rows sorted for
sequential access) converted to float in torch: no per-item Python, no image files. Without a
cache it falls back to a torch ``DataLoader`` over the dataset's items.

Order is a pure function of ``(seed, epoch)``: call :meth:`BatchLoader.set_epoch` before each
epoch and a run is reproducible, and resumable from any batch (``start_batch``).
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from .base import CXRDataset, collate


def collate_without_meta(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """:func:`cxrstudy.data.collate` minus ``meta``, so both loader paths yield the same keys."""
    batch = collate(items)
    batch.pop("meta", None)
    return batch


class BatchLoader:
    """Iterable of batch dicts ``image`` float32 [B,1,S,S] in [0,1], ``target`` [B,C],
    ``mask`` [B,C] (1 = label known) and ``index`` long [B] (rows of ``dataset``).

    ``len(loader)`` is the number of batches per epoch. ``num_workers`` > 0 means, on the cached
    path, that many batches are prepared ahead in background threads; on the fallback path it
    is the DataLoader's worker processes.
    """

    def __init__(self, dataset: CXRDataset, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, num_workers: int = 0,
                 pin_memory: bool = False):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(dataset) == 0:
            name = getattr(dataset, "name", "dataset")
            raise ValueError(f"{name}: cannot batch an empty dataset")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.epoch = 0
        self.start_batch = 0
        self._rows = None
        self._targets_np = None
        self._masks_np = None

    # ---- order ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use epoch ``epoch``'s order from now on, starting at batch ``start_batch`` (resume)."""
        if not 0 <= int(start_batch) <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """Dataset rows in the order epoch ``epoch`` visits them (seeded by ``(seed, epoch)``)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        epoch = self.epoch if epoch is None else int(epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def batch_indices(self) -> list[np.ndarray]:
        """The current epoch's batches (dataset rows), from ``start_batch`` on."""
        order = self.order()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches[self.start_batch:]

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if getattr(self.dataset, "cache", None) is not None:
            return self._iter_cached()
        return self._iter_dataloader()

    def _prepare_cached(self) -> None:
        if self._rows is None:
            cache = self.dataset.cache
            if cache.size != self.dataset.image_size:
                raise ValueError(f"{self.dataset.name}: the attached cache holds {cache.size} px "
                                 f"images but the dataset's image_size is "
                                 f"{self.dataset.image_size}; attach a cache of that size")
            self._rows = cache.rows_for(self.dataset)
            self._targets_np = np.ascontiguousarray(self.dataset.targets)
            self._masks_np = np.ascontiguousarray(self.dataset.masks)

    def cached_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """One batch of dataset rows ``indices`` read from the cache in a single memmap read."""
        self._prepare_cached()
        pixels = self.dataset.cache.read_rows(self._rows[indices])
        rows = np.ascontiguousarray(indices, dtype=np.int64)
        # numpy, not torch: this runs in the prefetch threads, where a torch op large enough to
        # go parallel starts a second OpenMP pool whose spinning threads starve the training step
        # (measured: 98 vs 354 img/s, EfficientViT-M0 inference at 64 px on 2 cores). IEEE
        # division is correctly rounded, so the pixels equal torch's ``div_(255)`` bit for bit.
        image = np.true_divide(pixels[:, None], np.float32(255.0), dtype=np.float32)
        batch = {"image": torch.from_numpy(image),
                 "target": torch.from_numpy(self._targets_np[rows]),
                 "mask": torch.from_numpy(self._masks_np[rows]),
                 "index": torch.from_numpy(rows)}
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def _iter_cached(self) -> Iterator[dict[str, torch.Tensor]]:
        self._prepare_cached()
        batches = self.batch_indices()
        if self.num_workers <= 0:
            for indices in batches:
                yield self.cached_batch(indices)
            return
        # Prepare up to ``num_workers`` batches ahead while the caller works on the current one.
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            pending: deque = deque()
            upcoming = iter(batches)
            try:
                for indices in upcoming:
                    pending.append(pool.submit(self.cached_batch, indices))
                    if len(pending) >= self.num_workers:
                        break
                while pending:
                    batch = pending.popleft().result()
                    following = next(upcoming, None)
                    if following is not None:
                        pending.append(pool.submit(self.cached_batch, following))
                    yield batch
            finally:
                for future in pending:
                    future.cancel()

    def _iter_dataloader(self) -> Iterator[dict[str, torch.Tensor]]:
        order = np.concatenate(self.batch_indices() or [np.zeros(0, dtype=np.int64)])
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order.tolist(), drop_last=False,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            collate_fn=collate_without_meta, persistent_workers=False,
        )
        return iter(loader)

    def __repr__(self) -> str:
        path = "cached" if getattr(self.dataset, "cache", None) is not None else "dataloader"
        return (f"BatchLoader({self.dataset!r}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch}, {path})")


__all__ = ["BatchLoader", "collate_without_meta"]
