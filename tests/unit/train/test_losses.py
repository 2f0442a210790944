"""Masked BCE against a hand computation, and the loss registry."""
from __future__ import annotations

import math

import pytest
import torch

from cxrstudy.train.losses import LOSSES, make_loss, masked_bce, register_loss

LOGITS = torch.tensor([[0.0, 1.0, -1.0], [2.0, -2.0, 0.5]])
TARGET = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # (0,2) and (1,1) unknown


def bce(z: float, y: float, w_pos: float = 1.0) -> float:
    """−[w·y·log σ(z) + (1−y)·log(1−σ(z))] written out with exp/log."""
    sigma = 1.0 / (1.0 + math.exp(-z))
    return -(w_pos * y * math.log(sigma) + (1 - y) * math.log(1 - sigma))


def test_masked_bce_is_the_mean_over_known_entries():
    # the four known entries: (0,0) z=0 y=1, (0,1) z=1 y=0, (1,0) z=2 y=0, (1,2) z=0.5 y=1
    expected = (math.log(2.0) + math.log(1 + math.e) + math.log(1 + math.e ** 2)
                + bce(0.5, 1.0)) / 4
    assert masked_bce(LOGITS, TARGET, MASK).item() == pytest.approx(expected, rel=1e-6)


def test_unknown_entries_do_not_change_the_loss():
    changed = LOGITS.clone()
    changed[0, 2] = 50.0  # unknown entries may hold anything
    changed[1, 1] = -50.0
    assert masked_bce(changed, TARGET, MASK).item() == pytest.approx(
        masked_bce(LOGITS, TARGET, MASK).item(), rel=1e-7)


def test_without_mask_every_entry_counts():
    expected = sum(bce(z, y) for z, y in zip(LOGITS.flatten().tolist(),
                                            TARGET.flatten().tolist())) / 6
    assert masked_bce(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_pos_weight_scales_positive_terms_per_class():
    weight = torch.tensor([2.0, 1.0, 3.0])
    expected = (bce(0.0, 1.0, 2.0) + bce(1.0, 0.0) + bce(2.0, 0.0) + bce(0.5, 1.0, 3.0)) / 4
    assert masked_bce(LOGITS, TARGET, MASK, pos_weight=weight).item() == pytest.approx(
        expected, rel=1e-6)


def test_a_batch_without_known_labels_gives_zero_loss_and_zero_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    loss = masked_bce(logits, TARGET, torch.zeros_like(MASK))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_gradient_reaches_only_known_entries():
    logits = LOGITS.clone().requires_grad_(True)
    masked_bce(logits, TARGET, MASK).backward()
    assert logits.grad[0, 2] == 0 and logits.grad[1, 1] == 0
    # d/dz of the mean: (σ(z) − y) / 4 at a known entry
    assert logits.grad[1, 0].item() == pytest.approx((1 / (1 + math.exp(-2.0))) / 4, rel=1e-6)


def test_bf16_logits_are_scored_in_float32():
    loss = masked_bce(LOGITS.to(torch.bfloat16), TARGET, MASK)
    assert loss.dtype == torch.float32


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logits"):
        masked_bce(LOGITS, TARGET[:, :2], MASK)
    with pytest.raises(ValueError, match="mask"):
        masked_bce(LOGITS, TARGET, MASK[:1])


def test_registry_builds_configured_losses():
    plain = make_loss("bce")
    weighted = make_loss("bce", pos_weight=[2.0, 1.0, 3.0])
    assert plain(LOGITS, TARGET, MASK).item() == pytest.approx(
        masked_bce(LOGITS, TARGET, MASK).item())
    assert weighted(LOGITS, TARGET, MASK).item() > plain(LOGITS, TARGET, MASK).item()
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        make_loss("nope")


def test_register_loss_adds_a_name_and_refuses_a_silent_replacement():
    @register_loss("test_half_bce")
    def half_bce():
        return lambda logits, target, mask=None: 0.5 * masked_bce(logits, target, mask)

    try:
        assert make_loss("test_half_bce")(LOGITS, TARGET, MASK).item() == pytest.approx(
            0.5 * masked_bce(LOGITS, TARGET, MASK).item())
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_half_bce")(lambda: None)
    finally:
        LOSSES.pop("test_half_bce", None)
