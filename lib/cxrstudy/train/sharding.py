"""A :class:`~cxrstudy.data.loader.BatchLoader`'s batches as a DataLoader Accelerate can split.

Data-parallel runs keep the single-process recipe: the Trainer's Accelerator splits each
*global* batch over the processes (``split_batches``), so ``batch_size``, the number of optimiser
steps and the LR schedule do not depend on the number of processes. For the processes to see the
same images as one process would, the DataLoader handed to Accelerate must yield the BatchLoader's
own batches in its own order (a function of ``(seed, epoch)``), which :func:`split_ready_loader`
builds: each process then reads only its slice of every batch.
"""
from __future__ import annotations

import copy

import numpy as np
import torch


class EpochOrderSampler(torch.utils.data.Sampler):
    """The rows of a BatchLoader in the order of its current epoch.

    Accelerate calls :meth:`set_epoch` on the sampler of the batch sampler it wraps, so the epoch
    passed to the prepared loader reaches the BatchLoader's ``(seed, epoch)`` order.
    """

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader.order().tolist())

    def __len__(self) -> int:
        return len(self.loader.dataset)


class _Rows(torch.utils.data.Dataset):
    """Row numbers only: the cached path reads a whole batch in one memmap read at collation."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> int:
        return int(row)


class _CachedCollate:
    """Rows → the BatchLoader's cached batch (pinning is left to the DataLoader)."""

    def __init__(self, loader):
        self.loader = copy.copy(loader)
        self.loader.pin_memory = False

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return self.loader.cached_batch(np.asarray(rows, dtype=np.int64))


def split_ready_loader(loader) -> torch.utils.data.DataLoader:
    """A DataLoader yielding exactly ``loader``'s batches, epoch by epoch, for Accelerate to split.

    The order is the BatchLoader's (not torch's own shuffle), so an N-process run visits the
    same global batches as a single-process run.
    """
    from cxrstudy.data.loader import collate_without_meta

    batches = torch.utils.data.BatchSampler(EpochOrderSampler(loader), loader.batch_size,
                                            drop_last=loader.drop_last)
    if getattr(loader.dataset, "cache", None) is not None:
        dataset, collate = _Rows(len(loader.dataset)), _CachedCollate(loader)
    else:
        dataset, collate = loader.dataset, collate_without_meta
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                       num_workers=loader.num_workers,
                                       pin_memory=loader.pin_memory)


__all__ = ["EpochOrderSampler", "split_ready_loader"]
