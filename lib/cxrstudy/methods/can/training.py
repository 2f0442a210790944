"""Training a CAN (:mod:`cxrstudy.methods.can.model`): the class loss on the mean logits and on each
branch, plus a term on the two attention maps (Ma, Wang & Hoi, MICCAI 2019; the exact formulas
are not public, so this is our reading, each weight a parameter).

    L = ℓ(z) + λ_b · ½ (ℓ(z₁) + ℓ(z₂)) + λ_a · L_att

ℓ the trainer's class loss (e.g. ``make_loss("can_balance")``, CAN's multi-label balance loss
in :mod:`cxrstudy.train.imbalance_losses`); λ_b (``branch_weight``) keeps each network a
classifier in its own right (the two are "trained together", each with its loss). The attention
loss (``attention_loss``):

    "agree":    L_att = mean (a₁ − a₂)²   the two networks' attention should point at the same
                                         regions (needs separate attention convs)
    "sparsity": L_att = ½ (mean a₁ + mean a₂)   L1 on the maps (a ≥ 0): attend to few places
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .model import CrossAttentionNetwork, LogitEnsemble
from ...train.trainer import TrainConfig, Trainer

ATTENTION_LOSSES = ("agree", "sparsity")


def check_attention_loss(kind: str) -> str:
    if kind not in ATTENTION_LOSSES:
        raise ValueError(f"attention_loss must be one of {ATTENTION_LOSSES}, got {kind!r}")
    return kind


def attention_loss(attention: Sequence[torch.Tensor], kind: str = "agree") -> torch.Tensor:
    """L_att of the module docstring, in float32."""
    check_attention_loss(kind)
    first, second = (a.float() for a in attention)
    if kind == "agree":
        return (first - second).pow(2).mean()
    return (first.mean() + second.mean()) / 2


class CANTrainer(Trainer):
    """Trains a :class:`CrossAttentionNetwork` on ``ℓ(z) + λ_b·½Σℓ(z_i) + λ_a·L_att``, or its
    controls, :class:`LogitEnsemble` and CAN with ``cross_attention=False``, on the same loss
    without the attention term (no attention acts in them: their output has no maps).

    ``branch_weight`` λ_b, ``attention_weight`` λ_a, ``attention_loss`` "agree"/"sparsity"
    (module docstring). These settings go into the checkpoints' ``train_config["can"]`` and a
    resumed run must share them. ``last_terms`` holds the last step's terms (detached).
    Validation and prediction use ``model(images)``, the mean logits.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *,
                 branch_weight: float = 1.0, attention_weight: float = 0.1,
                 attention_loss: str = "agree", **trainer_kwargs):
        inner = getattr(model, "module", model)
        if not isinstance(inner, (CrossAttentionNetwork, LogitEnsemble)):
            raise TypeError(f"CANTrainer trains a CrossAttentionNetwork or a LogitEnsemble, got "
                            f"{type(inner).__name__}")
        check_attention_loss(attention_loss)
        if float(branch_weight) < 0 or float(attention_weight) < 0:
            raise ValueError("branch_weight and attention_weight must not be negative")
        if attention_loss == "agree" and attention_weight > 0 and \
                getattr(inner, "shared_attention", False):
            raise ValueError("attention_loss='agree' compares two attention maps, but the model "
                             "shares one (shared_attention=True): use 'sparsity' or weight 0")
        self.branch_weight, self.attention_weight = float(branch_weight), float(attention_weight)
        self.attention_loss = attention_loss
        self.last_terms: dict[str, torch.Tensor] = {}
        super().__init__(model, config, **trainer_kwargs)

    def can_settings(self) -> dict:
        return {"branch_weight": self.branch_weight, "attention_weight": self.attention_weight,
                "attention_loss": self.attention_loss}

    def method_settings(self) -> dict[str, dict]:
        return {"can": self.can_settings()}

    def training_step(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        if self.augment is not None:
            images = self.augment(images)
        model = self.unwrapped_model
        model.output_branches = True  # through self.model, so DDP and autocast see the call
        try:
            out = self.model(images)
        finally:
            model.output_branches = False
        target, mask = batch["target"], batch["mask"]
        mean_term = self.loss_fn(out.logits, target, mask)
        branch_term = sum(self.loss_fn(z, target, mask) for z in out.branch_logits) / 2
        attention_term = (mean_term.new_zeros(()) if out.attention is None
                          else attention_loss(out.attention, self.attention_loss))
        total = mean_term + self.branch_weight * branch_term + \
            self.attention_weight * attention_term
        self.last_terms = {"mean": mean_term.detach(), "branches": branch_term.detach(),
                           "attention": attention_term.detach(), "total": total.detach()}
        return total


__all__ = ["ATTENTION_LOSSES", "attention_loss", "check_attention_loss", "CANTrainer"]
