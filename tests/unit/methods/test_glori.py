"""GLoRI (CheXFound): tokens of the last blocks, frozen class queries, the decoder layer (the
official post-norm order rebuilt from torch.nn, and the pre-norm option), its attention, the group
linear classifier, the linear probe on 4 blocks' or the last CLS, the ASL loss by hand, and
checkpoint rebuilds."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cxrstudy.models import create_model
from cxrstudy.methods.glori.model import (GLoRI, ClassQueryDecoderLayer, CrossAttention, GroupLinear,
                                   LinearProbe, read_tokens)
from cxrstudy.train import TrainConfig, Trainer, make_loss, seed_everything
from cxrstudy.train.imbalance_losses import masked_asl
from _fakes import labelled_batches

CLASSES = ["Atelectasis", "Effusion", "Nodule"]
VIT = dict(backbone="deit_tiny", patch_size=4, embed_dim=16, depth=4, num_heads=2)
HEAD = dict(decoder_dim=32, decoder_heads=4, decoder_ffn_dim=48)


def _glori(**extra) -> GLoRI:
    return create_model("glori", len(CLASSES), image_size=32, **dict(VIT, **HEAD, **extra))


def _batches(n: int, size: int, seed: int = 0, batch: int = 4) -> list[dict]:
    return labelled_batches(n, size, len(CLASSES), seed, batch)


# ---- shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cls", [True, False])
def test_vit_shapes_and_attention_grid(use_cls):
    seed_everything(0)
    model = _glori(use_cls=use_cls)
    logits = model(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 3)
    assert model.last_grid == (8, 8) and model.last_attention.shape == (2, 3, 64)
    assert model.attention_maps().shape == (2, 3, 8, 8)
    # 4 blocks × 16 channels of tokens; CLS of the 4 blocks appended when use_cls
    assert model.input_proj[0].in_features == 64
    assert model.classifier.weight.shape == (3, 32 + (64 if use_cls else 0))


def test_cnn_shapes_use_the_last_map():
    seed_everything(0)
    model = create_model("glori", 3, image_size=64, backbone="resnet18", **HEAD)
    x = torch.rand(2, 1, 64, 64)
    assert model(x).shape == (2, 3)
    assert model.last_grid == (2, 2) and model.last_attention.shape == (2, 3, 4)
    found = read_tokens(model.backbone, x)
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)
    assert torch.allclose(found.tokens, fmap.flatten(2).transpose(1, 2))
    assert torch.allclose(found.global_, fmap.mean(dim=(2, 3)))


def test_vit_tokens_are_the_normed_last_blocks_without_prefix():
    seed_everything(0)
    model = _glori(n_blocks=2).eval()
    vit = model.backbone
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        found = read_tokens(vit, x, n_blocks=2)
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        outputs = []
        for block in vit.blocks:
            h = block(h)
            outputs.append(vit.norm(h))
    expected_tokens = torch.cat([outputs[2][:, 1:], outputs[3][:, 1:]], dim=-1)
    expected_cls = torch.cat([outputs[2][:, 0], outputs[3][:, 0]], dim=-1)
    assert found.tokens.shape == (2, 64, 32)
    assert torch.allclose(found.tokens, expected_tokens, atol=1e-5)
    assert torch.allclose(found.global_, expected_cls, atol=1e-5)
    with pytest.raises(ValueError, match="n_blocks"):
        read_tokens(vit, x, n_blocks=5)


# ---- the head's pieces ------------------------------------------------------------------------
def test_group_linear_equals_one_linear_per_class():
    torch.manual_seed(0)
    group = GroupLinear(4, 6)
    nn.init.normal_(group.bias)
    x = torch.randn(5, 4, 6)
    expected = torch.stack([nn.functional.linear(x[:, c], group.weight[c:c + 1],
                                                 group.bias[c:c + 1]).squeeze(-1)
                            for c in range(4)], dim=1)
    assert torch.allclose(group(x), expected, atol=1e-6)


def test_group_linear_starts_xavier_normal_as_the_official_code():
    torch.manual_seed(0)
    group = GroupLinear(14, 2034)  # the official std √(2 / (F + C)) = 0.03125
    assert group.weight.std().item() == pytest.approx(0.03125, rel=0.03)
    assert torch.equal(group.bias, torch.zeros(14))


def _official_layer_by_hand(ours: ClassQueryDecoderLayer) -> nn.ModuleDict:
    """The official layer's parts as torch.nn primitives, carrying the weights of ``ours``."""
    dim, ffn_dim = ours.norm_query.normalized_shape[0], ours.ffn[0].out_features
    parts = nn.ModuleDict({
        "norm1": nn.LayerNorm(dim), "norm2": nn.LayerNorm(dim), "norm3": nn.LayerNorm(dim),
        "attn": nn.MultiheadAttention(dim, ours.cross_attention.num_heads),  # [L, B, d] layout
        "linear1": nn.Linear(dim, ffn_dim), "linear2": nn.Linear(ffn_dim, dim)})
    attn = ours.cross_attention
    with torch.no_grad():
        for mine, theirs in [(ours.norm_query, "norm1"), (ours.norm_ffn, "norm2"),
                             (ours.norm_out, "norm3"), (ours.ffn[0], "linear1"),
                             (ours.ffn[3], "linear2"), (attn.proj, None)]:
            target = parts["attn"].out_proj if theirs is None else parts[theirs]
            target.weight.copy_(mine.weight)
            target.bias.copy_(mine.bias)
        parts["attn"].in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight,
                                                      attn.v.weight]))
        parts["attn"].in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
    return parts.eval()


def _randomise(module: nn.Module) -> None:
    """Every parameter random (LayerNorm weights and biases included) so no part is trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))


def test_post_norm_layer_is_the_official_order_built_from_torch_nn():
    torch.manual_seed(0)
    ours = ClassQueryDecoderLayer(16, num_heads=4, ffn_dim=24)  # norm="post" is the default
    _randomise(ours)
    ours.eval()
    hand = _official_layer_by_hand(ours)
    queries, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 16)  # [B, C, d], [B, T, d]
    out, attention = ours(queries, memory)
    with torch.no_grad():
        # the official forward: [C, B, d] sequences, each sub-layer's residual then its norm
        tgt, mem = queries.transpose(0, 1), memory.transpose(0, 1)
        tgt = hand["norm1"](tgt + tgt)  # tgt + dropout1(tgt), dropout off in eval
        attended, weights = hand["attn"](tgt, mem, mem)
        tgt = hand["norm2"](tgt + attended)
        tgt = hand["norm3"](tgt + hand["linear2"](torch.relu(hand["linear1"](tgt))))
    assert torch.allclose(out, tgt.transpose(0, 1), atol=1e-5)
    assert torch.allclose(attention, weights, atol=1e-6)  # head-averaged, [B, C, T]


def test_pre_norm_option_follows_its_own_formula_and_differs_from_post():
    torch.manual_seed(0)
    pre = ClassQueryDecoderLayer(16, num_heads=4, ffn_dim=24, norm="pre")
    _randomise(pre)
    pre.eval()
    post = ClassQueryDecoderLayer(16, num_heads=4, ffn_dim=24).eval()
    post.load_state_dict(pre.state_dict())  # one set of parameters for both orders
    hand = _official_layer_by_hand(pre)
    queries, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    with torch.no_grad():
        tgt, mem = queries.transpose(0, 1), memory.transpose(0, 1)
        normed = hand["norm1"](tgt)
        hidden = tgt + hand["attn"](normed, mem, mem)[0]
        hidden = hidden + hand["linear2"](torch.relu(hand["linear1"](hand["norm2"](hidden))))
        expected = hand["norm3"](hidden).transpose(0, 1)
        out_pre, out_post = pre(queries, memory)[0], post(queries, memory)[0]
    assert torch.allclose(out_pre, expected, atol=1e-5)
    assert not torch.allclose(out_pre, out_post, atol=1e-2)
    with pytest.raises(ValueError, match="norm"):
        ClassQueryDecoderLayer(16, num_heads=4, norm="sandwich")


def test_post_norm_adds_a_dropped_copy_of_the_queries_to_themselves():
    torch.manual_seed(0)
    layer = ClassQueryDecoderLayer(8, num_heads=2, ffn_dim=8, dropout=0.5)
    queries, memory = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    seen = []
    layer.norm_query.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        layer.eval()(queries, memory)
        layer.train()(queries, memory)
    assert torch.allclose(seen[0], 2 * queries)  # eval: Q + Q
    ratio = seen[1] / queries  # training: Q + Drop(Q), each entry Q or Q + Q / (1 − 0.5)
    assert torch.allclose(ratio, torch.where(ratio > 2, 3.0, 1.0), atol=1e-5)
    assert (ratio > 2).any() and (ratio < 2).any()


def test_glori_passes_decoder_norm_to_its_layer():
    assert _glori().decoder.norm == "post"
    assert _glori(decoder_norm="pre").decoder.norm == "pre"
    with pytest.raises(ValueError, match="norm"):
        _glori(decoder_norm="middle")


def test_cross_attention_probabilities_sum_to_one_and_match_the_formula():
    torch.manual_seed(0)
    attn = CrossAttention(8, num_heads=1, dropout=0.5).train()  # dropout does not touch the map
    queries, tokens = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    _, probs = attn(queries, tokens)
    assert probs.shape == (2, 3, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3), atol=1e-6)
    scores = attn.q(queries) @ attn.k(tokens).transpose(1, 2) / math.sqrt(8)
    assert torch.allclose(probs, scores.softmax(-1), atol=1e-6)


def test_model_attention_sums_to_one_over_tokens_in_training_mode():
    seed_everything(0)
    model = _glori().train()
    model(torch.rand(3, 1, 32, 32))
    assert torch.allclose(model.last_attention.sum(-1), torch.ones(3, 3), atol=1e-5)
    assert (model.last_attention >= 0).all()


# ---- frozen parts -----------------------------------------------------------------------------
def test_class_queries_and_frozen_backbone_stay_fixed_through_an_optimizer_step():
    seed_everything(0)
    model = _glori()
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "class_queries" in model.state_dict() and "class_queries" not in names
    assert not any(name.startswith("backbone.") for name in names)
    trainer = Trainer(model, TrainConfig(epochs=1, lr=1e-2, cpu=True, progress=False),
                      loss_fn="asl")
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(model.class_queries) not in optimised
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.backbone.training  # frozen backbone stays in eval mode
    loss = trainer.training_step(_batches(1, 32)[0])
    loss.backward()
    trainer.optimizer.step()
    after = model.state_dict()
    assert torch.equal(before["class_queries"], after["class_queries"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(before["input_proj.0.weight"], after["input_proj.0.weight"])


def test_full_fine_tuning_trains_the_backbone_but_not_the_queries():
    seed_everything(0)
    model = _glori(freeze_backbone=False).train()
    assert model.backbone.training
    batch = _batches(1, 32)[0]
    make_loss("asl")(model(batch["image"]), batch["target"], batch["mask"]).backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None
    assert model.class_queries.grad is None and not model.class_queries.requires_grad


def test_linear_probe_trains_only_its_linear_head_and_keeps_batchnorm_statistics():
    seed_everything(0)
    probe = create_model("linear_probe", 3, image_size=64, backbone="resnet18")
    assert isinstance(probe, LinearProbe)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight",
                                                                          "head.bias"]
    stats = probe.backbone.bn1.running_mean.clone()
    probe.train()
    out = probe(torch.rand(4, 1, 64, 64))
    assert out.shape == (4, 3)
    assert torch.equal(stats, probe.backbone.bn1.running_mean)


@pytest.mark.parametrize("n_blocks", [4, 2, 1])
def test_linear_probe_reads_the_cls_tokens_glori_appends(n_blocks):
    seed_everything(0)
    probe = create_model("linear_probe", 3, image_size=32, n_blocks=n_blocks, **VIT).eval()
    glori = _glori(n_blocks=n_blocks).eval()
    glori.backbone.load_state_dict(probe.backbone.state_dict())
    x = torch.rand(2, 1, 32, 32)
    assert probe.head.in_features == 16 * n_blocks  # D = 16 per block
    with torch.no_grad():
        features = probe.features(x)
        assert torch.allclose(features, glori.tokens(x).global_, atol=1e-6)
        assert torch.allclose(probe(x), probe.head(features), atol=1e-6)
        if n_blocks == 1:  # one block: timm's own pooled CLS (the ``linear_probe_last`` arm)
            last = create_model("linear_probe", 3, image_size=32, n_blocks=None, **VIT).eval()
            last.load_state_dict(probe.state_dict())
            assert torch.allclose(last(x), probe(x), atol=1e-5)


def test_probe_on_the_last_cls_is_smaller_by_the_extra_blocks():
    seed_everything(0)
    four = create_model("linear_probe", 3, image_size=32, **VIT)  # n_blocks=4 by default
    last = create_model("linear_probe", 3, image_size=32, n_blocks=None, **VIT)
    assert four.n_blocks == 4 and last.n_blocks is None
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(four) - count(last) == 3 * 16 * 3  # three more blocks × D × classes


# ---- the loss ---------------------------------------------------------------------------------
def _asl_by_hand(z, y, m, gamma_neg=4.0, gamma_pos=1.0, clip=0.05):
    total, count = 0.0, 0.0
    for zi, yi, mi in zip(z, y, m):
        if not mi:
            continue
        p = 1 / (1 + math.exp(-zi))
        if yi == 1:
            value = -((1 - p) ** gamma_pos) * math.log(p)
        else:
            pm = max(p - clip, 0.0)
            value = -(pm ** gamma_neg) * math.log(1 - pm)
        total, count = total + value, count + 1
    return total / max(count, 1)


def test_asl_matches_a_hand_computation_with_masks_and_an_all_negative_class():
    z = torch.tensor([[2.0, -1.0, 0.5], [-0.3, -3.0, 1.5], [0.04, -2.0, -0.2]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # class 1 all negative
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # one masked entry
    loss = make_loss("asl")(z, y, m)
    expected = _asl_by_hand(z.flatten().tolist(), y.flatten().tolist(), m.flatten().tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the masked entry plays no part; an easy negative (p ≤ clip) costs exactly nothing
    z2 = z.clone()
    z2[0, 2] = 50.0
    assert make_loss("asl")(z2, y, m).item() == pytest.approx(loss.item(), rel=1e-6)
    easy = masked_asl(torch.tensor([[-4.0]]), torch.tensor([[0.0]]))
    assert easy.item() == 0.0
    # clip 0, gammas 0: plain BCE
    bce = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    assert masked_asl(z, y, m, 0.0, 0.0, 0.0).item() == pytest.approx(
        (bce * m).sum().item() / m.sum().item(), rel=1e-5)
    # nothing known: zero loss that still back-propagates
    z3 = z.clone().requires_grad_()
    empty = make_loss("asl")(z3, y, torch.zeros_like(m))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(z3.grad, torch.zeros_like(z3))


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, size, kwargs", [
    ("glori", 32, dict(VIT, **HEAD)),
    ("glori", 32, dict(VIT, **HEAD, decoder_norm="pre")),
    ("linear_probe", 32, dict(VIT)),
    ("linear_probe", 32, dict(VIT, n_blocks=None)),
])
def test_checkpoint_rebuilds_through_load_model_from_checkpoint(tmp_path, name, size, kwargs):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint

    seed_everything(0)
    model = create_model(name, len(CLASSES), image_size=size, **kwargs)
    config = TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, cpu=True, progress=False,
                         checkpoint_dir=str(tmp_path / "run"))
    trainer = Trainer(model, config, loss_fn="asl", class_names=CLASSES)
    history = trainer.fit(_batches(1, size), _batches(1, size, seed=1))
    assert history["train_loss"].notna().all()
    seed_everything(123)  # a rebuild draws other random queries: the checkpoint must restore them
    # last.pt, or best.pt where a completed run keeps only that (one epoch: the same weights)
    saved = next(p for p in (tmp_path / "run" / "last.pt", tmp_path / "run" / "best.pt")
                 if p.is_file())
    rebuilt, meta = load_model_from_checkpoint(saved)
    assert meta["model_config"]["name"] == name
    assert type(rebuilt) is type(model)
    if name == "glori":
        assert torch.equal(rebuilt.class_queries, model.class_queries)
        assert rebuilt.decoder.norm == kwargs.get("decoder_norm", "post")
    else:
        assert rebuilt.n_blocks == kwargs.get("n_blocks", 4)
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-6)


# ---- the mechanism on one image (notebook 05's first cell) -------------------------------------
def test_attention_by_hand_on_identity_projections():
    from cxrstudy.methods.glori.study import attention_by_hand

    attention = CrossAttention(2, num_heads=1, dropout=0.0)
    with torch.no_grad():
        for layer in (attention.q, attention.k):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    queries = torch.tensor([[1.0, 0.0]])
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # scores q·k/√2 = (1/√2, 0, 0): softmax e^{1/√2} / (e^{1/√2} + 2), then 1 / (e^{1/√2} + 2) twice
    e = math.exp(1 / math.sqrt(2))
    expected = torch.tensor([[e / (e + 2), 1 / (e + 2), 1 / (e + 2)]], dtype=torch.float64)
    assert torch.allclose(attention_by_hand(attention, queries, tokens), expected, atol=1e-12)
    _, probs = attention(queries[None], tokens[None])
    assert torch.allclose(probs[0].double(), expected, atol=1e-6)


def test_one_image_attention_reads_the_decoder_inputs_and_agrees_by_hand():
    from cxrstudy.methods.glori.study import one_image_attention

    seed_everything(0)
    model = _glori()
    found = one_image_attention(model, torch.rand(1, 32, 32), CLASSES)
    # 32 px, patch 4: an 8×8 grid of N = 64 tokens; d = decoder_dim = 32; C = 3 classes
    assert found["queries"].shape == (3, 32) and found["tokens"].shape == (64, 32)
    assert found["attention"].shape == (3, 64) and found["grid"] == (8, 8)
    assert found["maps"].shape == (3, 8, 8) and found["maps"].max() == pytest.approx(1.0)
    table = found["table"]
    assert list(table["class"]) == CLASSES and set(table["N"]) == {64} and set(table["d"]) == {32}
    assert table["Σ_n A_cn"].to_numpy() == pytest.approx([1.0] * 3, abs=1e-6)
    assert (table["max |hand − module|"] < 1e-6).all()
    peak = int(found["attention"][0].argmax())
    assert table.loc[0, "most attended patch"] == f"({peak // 8}, {peak % 8})"
    assert not model.decoder.cross_attention._forward_hooks  # the hook is gone
    # the queries read are X₀ = LN₁(2Q) (eval: Drop(Q) = Q), what enters the attention
    expected = model.decoder.norm_query(2 * model.class_queries)
    assert torch.allclose(found["queries"], expected.detach(), atol=1e-5)
