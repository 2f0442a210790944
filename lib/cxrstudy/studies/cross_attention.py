"""The CAN study (Ma, Wang & Hoi, MICCAI 2019): one network against the two cross-attending
networks, and CAN's balance loss against the usual remedies for class imbalance on the same
two-network model. The mechanism is :mod:`cxrstudy.models.can`; the losses are
:mod:`cxrstudy.train.imbalance_losses`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

#: Arm → class loss. ``single`` is the first backbone alone; every ``can_*`` arm is the same CAN.
ARMS = {"single": "bce", "can_bce": "bce", "can_weighted_bce": "weighted_bce",
        "can_focal": "focal", "can_asl": "asl", "can_balance": "can_balance"}


def arm_loss(arm: str, data, max_weight: float | None = 50.0):
    """The arm's loss; class-weighted BCE takes its weights from the training prevalence."""
    from ..train import make_loss

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    name = ARMS[arm]
    if name == "weighted_bce":
        prevalence = np.nanmean(np.asarray(data.train.labels, dtype=float), axis=0)
        return make_loss(name, prevalence=prevalence, max_weight=max_weight)
    return make_loss(name)


def train_arm(arm: str, data, out, *, backbones: Sequence[str] = ("resnet18", "densenet121"),
              can_options: dict | None = None, branch_weight: float = 1.0,
              attention_weight: float = 0.1, attention_loss: str = "agree",
              max_weight: float | None = 50.0, **train_kwargs):
    """Train and test one arm with :func:`cxrstudy.experiment.train_and_evaluate`."""
    from ..experiment import train_and_evaluate
    from ..models.can import CANTrainer

    loss = arm_loss(arm, data, max_weight)
    if arm == "single":
        return train_and_evaluate(backbones[0], data, out, tag=arm, loss=loss, **train_kwargs)
    return train_and_evaluate(
        "can", data, out, tag=arm, loss=loss,
        model_kwargs=dict(can_options or {}, backbones=tuple(backbones)),
        trainer_cls=CANTrainer, trainer_kwargs=dict(branch_weight=branch_weight,
                                                    attention_weight=attention_weight,
                                                    attention_loss=attention_loss),
        **train_kwargs)


@torch.no_grad()
def cross_attention_maps(model, dataset, rows: Sequence[int]) -> dict:
    """Each network's attention a₁, a₂ on the given test rows: images (uint8), maps per network
    [N, h, w] in [0, 1] (not rescaled: the sigmoid's own scale), titles and boxes."""
    model.eval()
    device = next(model.parameters()).device
    batch = torch.stack([dataset[i]["image"] for i in rows])
    model(batch.to(device))
    maps = model.attention_maps().float().cpu().numpy()  # [N, 2, h, w]
    return {"images": [(batch[k, 0].numpy() * 255).astype(np.uint8) for k in range(len(rows))],
            "maps": {"network 1 attention": maps[:, 0], "network 2 attention": maps[:, 1]},
            "titles": [dataset.meta(i)["image_id"] for i in rows],
            "boxes": [dataset.meta(i)["boxes"] for i in rows]}


__all__ = ["ARMS", "arm_loss", "train_arm", "cross_attention_maps"]
