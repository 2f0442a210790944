"""Losses against class imbalance, masked over unknown labels, registered by name.

Every loss is the mean over known entries, as in :mod:`cxrstudy.train.losses`:

    L = Σ_{n,c} m_nc · ℓ_nc / Σ_{n,c} m_nc,     p = σ(z),  p_t = y·p + (1 − y)·(1 − p)

(mask m: 1 = known). Registered names (``make_loss(name, **options)``):

``focal``        ℓ = −α_t · (1 − p_t)^γ · log p_t                       (Lin et al., 2017)
                 α_t = y·α + (1 − y)·(1 − α); ``alpha=None`` leaves α_t = 1.
``weighted_bce`` ℓ = −[w_c · y · log p + (1 − y) · log(1 − p)]             (BCE, pos_weight)
                 w_c given (``pos_weight``) or from the prevalence π_c: w_c = (1 − π_c)/π_c,
                 optionally capped at ``max_weight``. Computed by the existing
                 :func:`~cxrstudy.train.losses.masked_bce`; ``bce`` with ``pos_weight`` is the
                 same loss when the weights are already known.
``asl``          ℓ = −y · (1 − p)^{γ+} · log p − (1 − y) · p_m^{γ−} · log(1 − p_m),
                 p_m = max(p − m, 0)                                      (Ridnik et al., 2021)
                 defaults γ− = 4, γ+ = 1, clip m = 0.05 (CheXFound's GLoRI setting). The paper
                 sums over entries; here it is the masked mean, so the scale (and hence the
                 learning rate that suits it) differs by the number of known labels. The
                 focusing weights keep their gradient (the equation as written).
``can_balance``  ℓ = −(1 − p_t)^γ · [w⁺_c · y · log p + w⁻_c · (1 − y) · log(1 − p)]
                 CAN's multi-label balance loss (Ma, Wang & Hoi, MICCAI 2019), read as
                 within-class positive/negative balancing times a focal easy-sample term.
                 With P_c, N_c the known positives and negatives of class c (``weights="batch"``,
                 counted in each batch) and T_c = P_c + N_c:
                     w⁺_c = T_c / (2 P_c),   w⁻_c = T_c / (2 N_c)
                 so both sides of a class carry half its weight and Σ weights = T_c, as without
                 re-weighting. A class with no positives (or no negatives) among its known
                 labels cannot be balanced: its weights stay 1. ``weights="prevalence"``
                 uses a fixed prevalence π_c instead: w⁺_c = 1/(2π_c), w⁻_c = 1/(2(1 − π_c)).

Soft targets work (y ∈ [0, 1]); every loss is computed in float32 whatever the autocast dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .losses import LossFn, checked_inputs, masked_bce, masked_mean, register_loss

BALANCE_MODES = ("batch", "prevalence")


def _per_class(values, num_classes: int | None, device, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if num_classes is not None and tensor.numel() != num_classes:
        raise ValueError(f"{name} has {tensor.numel()} values, the logits {num_classes} classes")
    return tensor


def _check_prevalence(prevalence) -> torch.Tensor:
    values = torch.as_tensor(prevalence, dtype=torch.float32).flatten()
    if not ((values > 0) & (values < 1)).all():
        raise ValueError(f"prevalence must lie strictly between 0 and 1, got {values.tolist()}")
    return values


# ---- focal ------------------------------------------------------------------------------------
def masked_focal(logits, target, mask=None, gamma: float = 2.0, alpha: float | None = None
                 ) -> torch.Tensor:
    """Focal BCE ``−α_t (1 − p_t)^γ log p_t`` over known labels (module docstring)."""
    z, y, m = checked_inputs(logits, target, mask)
    nll = F.binary_cross_entropy_with_logits(z, y, reduction="none")      # −log p_t
    p = torch.sigmoid(z)
    p_t = y * p + (1 - y) * (1 - p)
    per_entry = (1 - p_t).pow(float(gamma)) * nll
    if alpha is not None:
        per_entry = (y * float(alpha) + (1 - y) * (1 - float(alpha))) * per_entry
    return masked_mean(per_entry, m)


@register_loss("focal")
def make_focal(gamma: float = 2.0, alpha: float | None = None) -> LossFn:
    """Masked focal BCE; γ down-weights easy entries, α (None: off) weighs positives."""
    if float(gamma) < 0:
        raise ValueError(f"gamma must not be negative, got {gamma}")
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] or be None, got {alpha}")

    def loss(logits, target, mask=None):
        return masked_focal(logits, target, mask, gamma=gamma, alpha=alpha)

    loss.__name__ = "masked_focal"
    return loss


# ---- weighted BCE -----------------------------------------------------------------------------
def prevalence_pos_weight(prevalence: Sequence[float] | torch.Tensor,
                          max_weight: float | None = None) -> torch.Tensor:
    """w_c = (1 − π_c) / π_c: positives then weigh as much as negatives in expectation."""
    values = _check_prevalence(prevalence)
    weights = (1 - values) / values
    return weights if max_weight is None else weights.clamp(max=float(max_weight))


@register_loss("weighted_bce")
def make_weighted_bce(pos_weight=None, prevalence=None, max_weight: float | None = None
                      ) -> LossFn:
    """Masked BCE with per-class positive weights, given or derived from ``prevalence``
    (e.g. the training split's positive fraction per class, ``labels.nanmean(0)``)."""
    if (pos_weight is None) == (prevalence is None):
        raise ValueError("weighted_bce needs exactly one of pos_weight and prevalence")
    if pos_weight is not None:
        weights = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
        if max_weight is not None:
            weights = weights.clamp(max=float(max_weight))
    else:
        weights = prevalence_pos_weight(prevalence, max_weight)

    def loss(logits, target, mask=None):
        return masked_bce(logits, target, mask, pos_weight=_per_class(
            weights, logits.shape[-1], logits.device, "pos_weight"))

    loss.__name__ = "masked_weighted_bce"
    loss.pos_weight = weights
    return loss


# ---- asymmetric loss --------------------------------------------------------------------------
def masked_asl(logits, target, mask=None, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
               clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss over known labels (module docstring); ``clip`` m shifts negatives'
    probabilities so easy negatives (p ≤ m) give exactly zero loss."""
    z, y, m = checked_inputs(logits, target, mask)
    p = torch.sigmoid(z)
    log_p = F.logsigmoid(z)
    if clip > 0:
        p_neg = (p - float(clip)).clamp_min(0)
        log_not_p_neg = torch.log((1 - p_neg).clamp_min(eps))
    else:
        p_neg, log_not_p_neg = p, F.logsigmoid(-z)
    positive = (1 - p).pow(float(gamma_pos)) * log_p
    negative = p_neg.pow(float(gamma_neg)) * log_not_p_neg
    return masked_mean(-(y * positive + (1 - y) * negative), m)


@register_loss("asl")
def make_asl(gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05) -> LossFn:
    """Masked asymmetric loss (ASL) with CheXFound's defaults γ− = 4, γ+ = 1, m = 0.05."""
    if float(gamma_neg) < 0 or float(gamma_pos) < 0:
        raise ValueError("gamma_neg and gamma_pos must not be negative")
    if not 0.0 <= float(clip) < 1.0:
        raise ValueError(f"clip must lie in [0, 1), got {clip}")

    def loss(logits, target, mask=None):
        return masked_asl(logits, target, mask, gamma_neg, gamma_pos, clip)

    loss.__name__ = "masked_asl"
    return loss


# ---- CAN balance loss -------------------------------------------------------------------------
def balance_weights(target: torch.Tensor, mask: torch.Tensor, prevalence=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w⁺, w⁻), one value per class, without gradient (module docstring, ``can_balance``).

    From the batch's known labels when ``prevalence`` is None, else from ``prevalence``.
    """
    y, m = target.detach().float(), mask.detach().float()
    if prevalence is not None:
        pi = _per_class(_check_prevalence(prevalence), y.shape[-1], y.device, "prevalence")
        return 1 / (2 * pi), 1 / (2 * (1 - pi))
    flat_y, flat_m = y.reshape(-1, y.shape[-1]), m.reshape(-1, m.shape[-1])
    positives = (flat_m * flat_y).sum(0)
    negatives = (flat_m * (1 - flat_y)).sum(0)
    total = positives + negatives
    both = (positives > 0) & (negatives > 0)
    one = torch.ones_like(total)
    w_pos = torch.where(both, total / (2 * positives.clamp_min(1e-12)), one)
    w_neg = torch.where(both, total / (2 * negatives.clamp_min(1e-12)), one)
    return w_pos, w_neg


def masked_can_balance(logits, target, mask=None, gamma: float = 2.0, prevalence=None
                       ) -> torch.Tensor:
    """CAN's balance loss ``−(1 − p_t)^γ [w⁺ y log p + w⁻ (1 − y) log(1 − p)]`` over known
    labels (module docstring)."""
    z, y, m = checked_inputs(logits, target, mask)
    w_pos, w_neg = balance_weights(y, m, prevalence)
    p = torch.sigmoid(z)
    p_t = y * p + (1 - y) * (1 - p)
    weighted_nll = -(w_pos * y * F.logsigmoid(z) + w_neg * (1 - y) * F.logsigmoid(-z))
    return masked_mean((1 - p_t).pow(float(gamma)) * weighted_nll, m)


@register_loss("can_balance")
def make_can_balance(gamma: float = 2.0, weights: str = "batch", prevalence=None) -> LossFn:
    """CAN's multi-label balance loss; ``weights`` "batch" (counts per batch) or "prevalence"
    (fixed ``prevalence`` per class, e.g. the training split's)."""
    if weights not in BALANCE_MODES:
        raise ValueError(f"weights must be one of {BALANCE_MODES}, got {weights!r}")
    if (weights == "prevalence") != (prevalence is not None):
        raise ValueError("weights='prevalence' needs prevalence, and prevalence needs "
                         "weights='prevalence'")
    if float(gamma) < 0:
        raise ValueError(f"gamma must not be negative, got {gamma}")
    fixed = None if prevalence is None else _check_prevalence(prevalence)

    def loss(logits, target, mask=None):
        return masked_can_balance(logits, target, mask, gamma=gamma, prevalence=fixed)

    loss.__name__ = "masked_can_balance"
    return loss


__all__ = ["masked_focal", "masked_asl", "masked_can_balance", "balance_weights",
           "prevalence_pos_weight", "make_focal", "make_weighted_bce", "make_asl",
           "make_can_balance", "BALANCE_MODES"]
