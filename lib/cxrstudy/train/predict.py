"""The one inference loop: a model's probabilities on every batch of a loader, in its order.

:meth:`cxrstudy.train.Trainer.predict` runs it under the trainer's device, mixed precision and
processes (``gather`` collects every process's rows); :func:`cxrstudy.evaluate.predict_probabilities`
runs it on one device for a checkpoint or a teacher. Probabilities are σ(z) of the float32 logits.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn


@dataclass
class Predictions:
    """Model outputs on a loader, in the loader's order: arrays [N, C] and ``indices`` [N]."""

    probs: np.ndarray
    targets: np.ndarray
    masks: np.ndarray
    indices: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)


@torch.no_grad()
def predict_batches(model: nn.Module, batches: Iterable[dict], *,
                    to_device: Callable[[dict], dict],
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    gather: Callable[[tuple], tuple] = lambda tensors: tensors) -> Predictions:
    """``model``'s outputs on ``batches`` (dicts with image, target, mask, index) in evaluation
    mode; the model's own mode is restored afterwards."""
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"logits": [], "target": [], "mask": [], "index": []}
    try:
        for batch in batches:
            batch = to_device(batch)
            with autocast():
                logits = model(batch["image"])
            gathered = gather((logits.float(), batch["target"].float(), batch["mask"].float(),
                               torch.as_tensor(batch["index"]).long()))
            for key, value in zip(parts, gathered):
                parts[key].append(value.cpu())
    finally:
        model.train(was_training)
    if not parts["logits"]:
        raise ValueError("the loader yielded no batches")
    logits = torch.cat(parts["logits"]).numpy()
    return Predictions(probs=1.0 / (1.0 + np.exp(-logits)),
                       targets=torch.cat(parts["target"]).numpy(),
                       masks=torch.cat(parts["mask"]).numpy(),
                       indices=torch.cat(parts["index"]).numpy(), logits=logits)


__all__ = ["Predictions", "predict_batches"]
