"""Multi-label losses over *known* labels only, and a registry so the loss is a parameter.

Unknown labels (uncertain, or not annotated by a release) carry ``mask = 0``; reading them as
negatives would teach the model that an unlabelled finding is absent. Every loss here is the
mean over the known entries:

    L = Σ_{n,c} m_{nc} · ℓ(z_{nc}, y_{nc}) / Σ_{n,c} m_{nc}

with logits z, targets y, mask m, and the binary cross-entropy with optional positive weight p_c

    ℓ(z, y) = −[ p_c · y · log σ(z) + (1 − y) · log(1 − σ(z)) ].

A batch without any known label gives a loss of 0 that still back-propagates (zero gradient).
Later work adds focal, asymmetric and distillation losses with :func:`register_loss`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, Callable[..., LossFn]] = {}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 (with a graph) when nothing is known."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def checked_inputs(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits, target and mask (all ones when None), refused unless of one shape."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if mask is None:
        mask = torch.ones_like(target)
    elif mask.shape != target.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and target {tuple(target.shape)} differ")
    return logits.float(), target.float(), mask.float()


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits averaged over known labels (see module docstring).

    Computed in float32 whatever the autocast dtype, so bf16 logits do not lose the loss.
    """
    logits, target, mask = checked_inputs(logits, target, mask)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per_entry = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                                   pos_weight=pos_weight)
    return masked_mean(per_entry, mask)


def register_loss(name: str, *, overwrite: bool = False):
    """Register a loss factory: ``factory(**options) -> loss_fn(logits, target, mask)``."""
    def decorate(factory):
        if name in LOSSES and LOSSES[name] is not factory and not overwrite:
            raise ValueError(f"loss {name!r} is already registered; pass overwrite=True")
        LOSSES[name] = factory
        return factory
    return decorate


@register_loss("bce")
def _make_bce(pos_weight=None) -> LossFn:
    """Masked BCE; ``pos_weight`` (one value per class) up-weights positives of rare findings."""
    weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)

    def loss(logits, target, mask=None):
        return masked_bce(logits, target, mask, pos_weight=weight)

    loss.__name__ = "masked_bce"
    return loss


def make_loss(name: str, **options) -> LossFn:
    """The loss registered as ``name`` configured with ``options``."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**options)


def list_losses() -> list[str]:
    return sorted(LOSSES)


__all__ = ["masked_bce", "masked_mean", "checked_inputs", "register_loss", "make_loss",
           "list_losses", "LOSSES"]
