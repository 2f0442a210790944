"""CAN: cross attention from two networks' feature maps, the combined training loss, checkpoint
rebuilds, and the imbalance losses (focal, weighted BCE, CAN balance) against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cxrstudy.models import create_model
from cxrstudy.methods.can.model import CANOutput, CrossAttentionNetwork, LogitEnsemble
from cxrstudy.methods.can.training import CANTrainer, attention_loss
from cxrstudy.train import TrainConfig, Trainer, make_loss, seed_everything
from cxrstudy.train.imbalance_losses import balance_weights, prevalence_pos_weight
from _fakes import labelled_batches

CLASSES = ["Atelectasis", "Effusion", "Nodule"]
TWO_RESNETS = dict(backbones=("test_resnet", "test_resnet"))  # timm's tiny test ResNet


def _can(size: int = 64, **kwargs) -> CrossAttentionNetwork:
    return create_model("can", len(CLASSES), image_size=size, **(kwargs or TWO_RESNETS))


def _batches(n: int, size: int, seed: int = 0, batch: int = 4) -> list[dict]:
    return labelled_batches(n, size, len(CLASSES), seed, batch)


# ---- the model --------------------------------------------------------------------------------
def test_spatial_attention_shapes_range_and_the_mean_of_two_branches():
    seed_everything(0)
    model = _can().eval()
    assert isinstance(model.projections[0], torch.nn.Identity)  # 96 = 96: nothing to project
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = model.forward_branches(x)
        logits = model(x)
    assert isinstance(out, CANOutput) and logits.shape == (2, 3)
    assert all(a.shape == (2, 1, 2, 2) for a in out.attention)
    assert all(((a >= 0) & (a <= 1)).all() for a in out.attention)
    assert torch.allclose(logits, (out.branch_logits[0] + out.branch_logits[1]) / 2)
    assert model.attention_maps().shape == (2, 2, 2, 2)
    # the formula, by hand: a_i = σ(conv_i(p₁ ⊙ p₂)), g_i = p_i (1 + a_i), z_i = head_i(mean g_i)
    with torch.no_grad():
        p1, p2 = (b.forward_features(x) for b in model.backbones)
        for i, p in enumerate((p1, p2)):
            a = torch.sigmoid(model.attention_convs[i](p1 * p2))
            assert torch.allclose(a, out.attention[i], atol=1e-6)
            z = model.heads[i]((p * (1 + a)).mean(dim=(2, 3)))
            assert torch.allclose(z, out.branch_logits[i], atol=1e-5)


def test_different_architectures_channel_attention_and_no_residual():
    seed_everything(0)
    model = _can(backbones=("test_resnet", "mobilenetv3_small_050"), attention="channel",
                 residual=False, channels=64, backbone_kwargs=[{"output_stride": 16}, {}])
    x = torch.rand(2, 1, 64, 64)
    out = model.forward_branches(x)
    # test_resnet (stride 16): 96×4×4, mobilenetv3_small_050: 288×2×2 → both projected to 64,
    # the second resized to the first's 4×4 grid
    assert model.projections[1].in_channels == 288 and model.num_features == 64
    assert all(a.shape == (2, 64, 4, 4) for a in out.attention)
    assert all(((a >= 0) & (a <= 1)).all() for a in out.attention)
    p1, p2 = model.feature_maps(x)
    assert p2.shape == p1.shape == (2, 64, 4, 4)
    z0 = model.heads[0]((p1 * out.attention[0]).mean(dim=(2, 3)))
    assert torch.allclose(z0, out.branch_logits[0], atol=1e-5)


def test_shared_attention_gives_one_map_and_refuses_the_agreement_loss():
    seed_everything(0)
    model = _can(size=32, shared_attention=True, **TWO_RESNETS)
    assert len(model.attention_convs) == 1
    out = model.forward_branches(torch.rand(2, 1, 32, 32))
    assert torch.equal(out.attention[0], out.attention[1])
    config = TrainConfig(epochs=1, cpu=True, progress=False)
    with pytest.raises(ValueError, match="shared_attention"):
        CANTrainer(model, config, attention_loss="agree", attention_weight=0.1)
    with pytest.raises(TypeError, match="CrossAttentionNetwork"):
        CANTrainer(create_model("test_resnet", 3, image_size=32), config)


def test_attention_losses_by_hand():
    a1 = torch.tensor([[[[0.2, 0.8], [0.5, 0.0]]]])
    a2 = torch.tensor([[[[0.4, 0.4], [0.5, 1.0]]]])
    agree = (0.2 ** 2 + 0.4 ** 2 + 0.0 + 1.0) / 4
    assert attention_loss((a1, a2), "agree").item() == pytest.approx(agree)
    assert attention_loss((a1, a2), "sparsity").item() == pytest.approx((1.5 / 4 + 2.3 / 4) / 2)
    with pytest.raises(ValueError):
        attention_loss((a1, a2), "entropy")


def test_trainer_step_combines_the_terms_and_reaches_both_networks():
    seed_everything(0)
    model = _can(**TWO_RESNETS)
    trainer = CANTrainer(model, TrainConfig(epochs=1, cpu=True, progress=False),
                         loss_fn="can_balance", branch_weight=0.5, attention_weight=2.0)
    model.train()
    batch = _batches(1, 64)[0]
    loss = trainer.training_step(batch)
    terms = trainer.last_terms
    assert loss.item() == pytest.approx(float(terms["mean"] + 0.5 * terms["branches"]
                                              + 2.0 * terms["attention"]), rel=1e-5)
    assert not model.output_branches  # the flag is off again: evaluation sees logits
    loss.backward()
    for backbone in model.backbones:
        first = next(backbone.parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(conv.weight.grad.abs().sum() > 0 for conv in model.attention_convs)


def test_a_plain_trainer_trains_the_mean_logits():
    seed_everything(0)
    model = _can(size=32, **TWO_RESNETS)
    trainer = Trainer(model, TrainConfig(epochs=1, cpu=True, progress=False), loss_fn="focal")
    loss = trainer.training_step(_batches(1, 32)[0])
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_checkpoint_rebuilds_through_load_model_from_checkpoint(tmp_path):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint
    from cxrstudy.train import load_checkpoint

    seed_everything(0)
    model = _can(backbones=("test_resnet", "test_efficientnet"), channels=32,
                 backbone_kwargs=[{}, {"drop_rate": 0.0}])
    config = TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, cpu=True, progress=False,
                         checkpoint_dir=str(tmp_path / "run"))
    trainer = CANTrainer(model, config, loss_fn="can_balance", class_names=CLASSES,
                         attention_loss="sparsity")
    history = trainer.fit(_batches(1, 64), _batches(1, 64, seed=1))
    assert history["train_loss"].notna().all()
    payload = load_checkpoint(tmp_path / "run" / "best.pt")  # last.pt goes when a run completes
    assert payload["train_config"]["can"] == {"branch_weight": 1.0, "attention_weight": 0.1,
                                              "attention_loss": "sparsity"}
    rebuilt, meta = load_model_from_checkpoint(tmp_path / "run" / "best.pt")
    assert isinstance(rebuilt, CrossAttentionNetwork)
    assert list(meta["model_config"]["kwargs"]["backbones"]) == ["test_resnet",
                                                                 "test_efficientnet"]
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-5)


# ---- the control with the attention off: CAN's own modules, the gate passing p through --------
def _held_open(model: CrossAttentionNetwork, value: float) -> CrossAttentionNetwork:
    """``model`` with every attention conv giving σ(±40): a = ``value`` (0 or 1) to float
    precision, whatever the features: the gate replaced by the identity by hand."""
    with torch.no_grad():
        for conv in model.attention_convs:
            conv.weight.zero_()
            conv.bias.fill_(40.0 if value == 1 else -40.0)
    return model


@pytest.mark.parametrize("residual, identity_map", [(True, 0.0), (False, 1.0)])
def test_attention_off_is_the_same_can_with_the_gate_passing_the_features_through(
        residual, identity_map):
    kwargs = dict(backbones=("test_resnet", "mobilenetv3_small_050"), channels=32,
                  residual=residual)
    seed_everything(0)
    on = _can(**kwargs).eval()
    seed_everything(0)
    off = _can(cross_attention=False, **kwargs).eval()
    # the same modules, parameters and (same seed) weights: only the switch differs
    assert off.state_dict().keys() == on.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(),
                                                  on.state_dict().values()))
    count = sum(p.numel() for p in on.parameters())
    assert sum(p.numel() for p in off.parameters()) == count
    # the attention convs are built but frozen (never read: no gradient); the rest trains
    assert not any(p.requires_grad for p in off.attention_convs.parameters())
    assert all(p.requires_grad for name, p in off.named_parameters()
               if not name.startswith("attention_convs."))
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = off.forward_branches(x)
        # by hand: g_i = p_i, z_i = head_i(mean p_i), z = (z₁ + z₂)/2
        p1, p2 = off.feature_maps(x)
        z1, z2 = (off.heads[i](p.mean(dim=(2, 3))) for i, p in enumerate((p1, p2)))
        # the attention-on model with its map forced to the identity gate's value
        forced = _held_open(on, identity_map).forward_branches(x)
    assert out.attention is None  # no maps reach the trainer: no attention term
    assert torch.allclose(out.branch_logits[0], z1, atol=1e-6)
    assert torch.allclose(out.branch_logits[1], z2, atol=1e-6)
    assert torch.allclose(out.logits, (z1 + z2) / 2, atol=1e-6)
    assert torch.allclose(out.logits, forced.logits, atol=1e-5)
    assert all(torch.allclose(a, torch.full_like(a, identity_map)) for a in forced.attention)
    # the maps for drawing: the held value, flat, on the first network's grid
    maps = off.attention_maps()
    assert maps.shape == (2, 2, *p1.shape[-2:]) and torch.equal(maps,
                                                                torch.full_like(maps, identity_map))
    # and the attention does change the output when it is on
    with torch.no_grad():
        seed_everything(0)
        assert not torch.allclose(_can(**kwargs).eval()(x), out.logits, atol=1e-4)


def test_attention_off_trains_without_the_attention_term_and_rebuilds_from_its_checkpoint(
        tmp_path):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint

    seed_everything(0)
    model = _can(size=32, cross_attention=False, **TWO_RESNETS)
    assert model.cxr_config["kwargs"]["cross_attention"] is False  # the recipe carries the switch
    config = TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, cpu=True, progress=False,
                         checkpoint_dir=str(tmp_path / "run"))
    trainer = CANTrainer(model, config, loss_fn="bce", branch_weight=0.5, attention_weight=2.0,
                         class_names=CLASSES)
    model.train()
    loss = trainer.training_step(_batches(1, 32)[0])
    terms = trainer.last_terms
    assert terms["attention"].item() == 0.0
    assert loss.item() == pytest.approx(float(terms["mean"] + 0.5 * terms["branches"]), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in model.attention_convs.parameters())
    assert next(model.backbones[1].parameters()).grad.abs().sum() > 0
    attention_before = [p.detach().clone() for p in model.attention_convs.parameters()]
    trainer.fit(_batches(2, 32), _batches(1, 32, seed=1))
    # weight decay and updates skip the frozen convs: they keep their initial draws
    assert all(torch.equal(a, b) for a, b in zip(attention_before,
                                                  model.attention_convs.parameters()))
    rebuilt, meta = load_model_from_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["model_config"]["kwargs"]["cross_attention"] is False
    assert isinstance(rebuilt, CrossAttentionNetwork) and rebuilt.cross_attention is False
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-5)
        assert rebuilt.forward_branches(x).attention is None


def test_the_attention_switch_takes_only_a_bool():
    with pytest.raises(TypeError, match="cross_attention"):
        _can(size=32, cross_attention="off", **TWO_RESNETS)


# ---- the control without attention: two networks, logits averaged ----------------------------
def test_logit_ensemble_is_the_mean_of_the_two_networks_logits_by_hand():
    seed_everything(0)
    model = create_model("logit_ensemble", len(CLASSES), image_size=32,
                         backbones=("test_resnet", "test_efficientnet")).eval()
    assert isinstance(model, LogitEnsemble)
    # fixed weights: every parameter set to a known function of its position
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape) * (1 + k % 3))
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model.networks[0]
        z1 = first.fc(first.global_pool(first.forward_features(x)))  # timm's own head, by hand
        z2 = model.networks[1](x)
        logits = model(x)
        out = model.forward_branches(x)
    assert logits.shape == (2, 3) and not torch.allclose(z1, z2)
    assert torch.allclose(logits, (z1 + z2) / 2, atol=1e-6)
    assert torch.allclose(out.branch_logits[0], z1, atol=1e-6) and out.attention is None
    # exactly the two networks trained alone: nothing added between them
    alone = sum(sum(p.numel() for p in create_model(name, len(CLASSES), image_size=32).parameters())
                for name in ("test_resnet", "test_efficientnet"))
    assert sum(p.numel() for p in model.parameters()) == alone


def test_the_ensemble_trains_on_cans_loss_without_the_attention_term(tmp_path):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint

    seed_everything(0)
    model = create_model("logit_ensemble", len(CLASSES), image_size=32,
                         backbones=("test_resnet", "test_resnet"))
    config = TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, cpu=True, progress=False,
                         checkpoint_dir=str(tmp_path / "run"))
    trainer = CANTrainer(model, config, loss_fn="bce", branch_weight=0.5, attention_weight=2.0,
                         class_names=CLASSES)
    batch = _batches(1, 32)[0]
    mask = batch["mask"]

    def bce(logits):
        raw = F.binary_cross_entropy_with_logits(logits, batch["target"], reduction="none")
        return (raw * mask).sum() / mask.sum()

    model.train()  # batch statistics, as in the step (no augmentation, no dropout)
    with torch.no_grad():
        z1, z2 = (network(batch["image"]) for network in model.networks)
    by_hand = bce((z1 + z2) / 2) + 0.5 * (bce(z1) + bce(z2)) / 2
    loss = trainer.training_step(batch)
    assert trainer.last_terms["attention"].item() == 0.0
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert not model.output_branches
    history = trainer.fit(_batches(2, 32), _batches(1, 32, seed=1))
    assert history["train_loss"].notna().all()
    rebuilt, meta = load_model_from_checkpoint(tmp_path / "run" / "best.pt")
    assert isinstance(rebuilt, LogitEnsemble) and meta["model_config"]["name"] == "logit_ensemble"
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-5)


# ---- imbalance losses, by hand ------------------------------------------------------------------
Z = torch.tensor([[2.0, -1.0, 0.5], [-0.3, -3.0, 1.5], [0.7, -2.0, -0.2], [-1.2, 0.3, 0.9]])
Y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
# class 0: known rows 0-2 → 2 positives, 1 negative; class 1: all negative; class 2: row 0 masked


def _entries():
    for row in range(Z.shape[0]):
        for c in range(Z.shape[1]):
            if M[row, c]:
                z, y = float(Z[row, c]), float(Y[row, c])
                p = 1 / (1 + math.exp(-z))
                yield c, y, p


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def test_focal_by_hand():
    def focal(y, p, gamma, alpha):
        p_t = p if y == 1 else 1 - p
        a_t = 1.0 if alpha is None else (alpha if y == 1 else 1 - alpha)
        return -a_t * (1 - p_t) ** gamma * math.log(p_t)

    for gamma, alpha in [(2.0, None), (1.5, 0.25), (0.0, None)]:
        expected = _mean(focal(y, p, gamma, alpha) for _, y, p in _entries())
        loss = make_loss("focal", gamma=gamma, alpha=alpha)(Z, Y, M)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    bce = F.binary_cross_entropy_with_logits(Z, Y, reduction="none")
    assert make_loss("focal", gamma=0.0)(Z, Y, M).item() == pytest.approx(
        float((bce * M).sum() / M.sum()), rel=1e-6)


def test_weighted_bce_by_hand_from_prevalence_and_given_weights():
    prevalence = [0.5, 0.1, 0.25]
    weights = prevalence_pos_weight(prevalence)
    assert torch.allclose(weights, torch.tensor([1.0, 9.0, 3.0]))

    def weighted(c, y, p, w):
        return -(w[c] * math.log(p) if y == 1 else math.log(1 - p))

    expected = _mean(weighted(c, y, p, [1.0, 9.0, 3.0]) for c, y, p in _entries())
    assert make_loss("weighted_bce", prevalence=prevalence)(Z, Y, M).item() == pytest.approx(
        expected, rel=1e-5)
    capped = _mean(weighted(c, y, p, [1.0, 2.0, 2.0]) for c, y, p in _entries())
    assert make_loss("weighted_bce", prevalence=prevalence, max_weight=2.0)(Z, Y, M).item() \
        == pytest.approx(capped, rel=1e-5)
    assert make_loss("weighted_bce", pos_weight=[1.0, 9.0, 3.0])(Z, Y, M).item() \
        == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        make_loss("weighted_bce")
    with pytest.raises(ValueError, match="4 values"):
        make_loss("weighted_bce", pos_weight=[1.0, 2.0, 3.0, 4.0])(Z, Y, M)


def test_can_balance_by_hand_with_an_all_negative_class_and_masked_labels():
    # known counts: class 0: P=2, N=1 (T=3); class 1: P=0, N=4; class 2: P=2, N=1 (T=3)
    w_pos = [3 / 4, 1.0, 3 / 4]
    w_neg = [3 / 2, 1.0, 3 / 2]  # class 1 cannot be balanced: weights stay 1
    got_pos, got_neg = balance_weights(Y, M)
    assert torch.allclose(got_pos, torch.tensor(w_pos)) and torch.allclose(got_neg,
                                                                           torch.tensor(w_neg))

    def balanced(c, y, p, gamma, wp, wn):
        p_t = p if y == 1 else 1 - p
        weight = wp[c] if y == 1 else wn[c]
        return -(1 - p_t) ** gamma * weight * math.log(p_t)

    for gamma in (2.0, 0.0):
        expected = _mean(balanced(c, y, p, gamma, w_pos, w_neg) for c, y, p in _entries())
        loss = make_loss("can_balance", gamma=gamma)(Z, Y, M)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    # fixed prevalence: w⁺ = 1/(2π), w⁻ = 1/(2(1 − π))
    pi = [0.5, 0.2, 0.25]
    wp, wn = [1 / (2 * q) for q in pi], [1 / (2 * (1 - q)) for q in pi]
    expected = _mean(balanced(c, y, p, 2.0, wp, wn) for c, y, p in _entries())
    loss = make_loss("can_balance", weights="prevalence", prevalence=pi)(Z, Y, M)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="prevalence"):
        make_loss("can_balance", weights="prevalence")


def test_losses_ignore_masked_entries_and_survive_an_empty_mask():
    for name in ("focal", "can_balance", "asl"):
        loss_fn = make_loss(name)
        moved = Z.clone()
        moved[0, 2] = 40.0  # a masked entry
        assert loss_fn(moved, Y, M).item() == pytest.approx(loss_fn(Z, Y, M).item(), rel=1e-6)
        z = Z.clone().requires_grad_()
        empty = loss_fn(z, Y, torch.zeros_like(M))
        empty.backward()
        assert empty.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("name, misfit", [("can", {"channels": 16}),
                                           ("logit_ensemble",
                                            {"backbones": ("test_resnet", "test_efficientnet")})])
def test_weight_files_load_only_when_they_fit(tmp_path, name, misfit):
    seed_everything(0)
    model = create_model(name, len(CLASSES), image_size=32, **TWO_RESNETS).eval()
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    again = create_model(name, len(CLASSES), image_size=32, pretrained=str(path),
                         **TWO_RESNETS).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        create_model(name, len(CLASSES), image_size=32, pretrained=str(path),
                     **{**TWO_RESNETS, **misfit})


# ---- the mechanism on one batch (notebook 06's first cell) -------------------------------------
def test_balance_loss_from_its_terms_equals_the_hand_sum_above():
    from cxrstudy.methods.can.study import balance_loss_by_hand

    # the same weights as the by-hand test above: class 0 w⁺ 3/4, w⁻ 3/2; class 1 unbalanced (1)
    w_pos, w_neg = [3 / 4, 1.0, 3 / 4], [3 / 2, 1.0, 3 / 2]
    for gamma in (2.0, 0.0):
        expected = _mean(-(1 - (p if y == 1 else 1 - p)) ** gamma
                         * (w_pos[c] if y == 1 else w_neg[c])
                         * math.log(p if y == 1 else 1 - p) for c, y, p in _entries())
        assert balance_loss_by_hand(Z, Y, M, gamma) == pytest.approx(expected, rel=1e-12)


def test_attention_at_one_position_by_hand_from_set_weights():
    from cxrstudy.methods.can.study import attention_by_hand

    seed_everything(0)
    model = _can().eval()
    with torch.no_grad():
        model.attention_convs[1].weight.fill_(0.5)
        model.attention_convs[1].bias.fill_(-0.1)
        p1, p2 = model.feature_maps(torch.rand(2, 1, 64, 64))
    # a₂ at image 1, position (0, 1) = σ(0.5·Σ_k p₁p₂ − 0.1), summed here channel by channel
    s = sum(float(p1[1, k, 0, 1]) * float(p2[1, k, 0, 1]) for k in range(p1.shape[1]))
    expected = 1 / (1 + math.exp(-(0.5 * s - 0.1)))
    assert attention_by_hand(model, p1, p2, 1, 1, 0, 1) == pytest.approx(expected, rel=1e-6)


def test_one_batch_table_gives_shapes_ranges_and_the_checks_beside_the_library():
    from cxrstudy.methods.can.study import one_batch_cross_attention

    seed_everything(0)
    model = _can()
    batch = {"image": torch.rand(5, 1, 64, 64), "target": (torch.rand(5, 3) > 0.5).float(),
             "mask": torch.ones(5, 3)}
    found = one_batch_cross_attention(model, batch)
    table = found["table"].set_index("quantity")
    with torch.no_grad():
        f1 = model.backbones[0].forward_features(batch["image"])
        logits = model(batch["image"])
    b, k, h, w = f1.shape
    assert table.loc["f₁ (network 1's feature map)", "shape"] == f"{b}×{k}×{h}×{w}" and b == 5
    assert table.loc["p₁ ⊙ p₂", "shape"] == f"5×{k}×{h}×{w}"  # test_resnet: nothing projected
    for name in ("a₁ = σ(W₁ * (p₁ ⊙ p₂) + b₁)", "a₂ = σ(W₂ * (p₁ ⊙ p₂) + b₂)"):
        assert table.loc[name, "shape"] == f"5×1×{h}×{w}"
        assert 0 < table.loc[name, "min"] <= table.loc[name, "max"] < 1
    checks = table.dropna(subset=["by hand"])
    assert len(checks) == 3 and (checks["|hand − library|"] < 1e-6).all()
    balance = checks.loc["balance loss ℓ_bal(z), γ = 2", "library"]
    assert balance == pytest.approx(make_loss("can_balance")(logits, batch["target"],
                                                             batch["mask"]).item(), rel=1e-6)
    assert set(found["maps"]) == {"mean p₁", "mean p₂", "a₁", "a₂"}
    for maps in found["maps"].values():
        assert maps.shape == (5, h, w) and maps.min() >= 0 and maps.max() <= 1
    with pytest.raises(ValueError, match="attention on"):
        one_batch_cross_attention(_can(cross_attention=False, **TWO_RESNETS), batch)
