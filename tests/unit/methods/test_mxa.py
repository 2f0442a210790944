"""MXA block in EfficientViT-M: the batched crop against per-sample slicing, fallbacks, gradients
per crop mode, the sum/gated equations, both placements (ours and the authors' wiring), shapes at
64–224 px, the authors' logged parameter counts rebuilt exactly, timm weights."""
from __future__ import annotations

import math

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cxrstudy.models import count_parameters, create_model
from cxrstudy.methods.mxa.model import (MXAAtBlockInput, MXABlock, MXAMixer, add_mxa, crop_to_boxes,
                                 last_boxes, mxa_blocks, pixel_bounds)
from _fakes import save_best_checkpoint


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _force_box(block: MXABlock, box, weight_scale: float = 0.0) -> None:
    """Make the ROI head predict ≈ ``box`` (exactly, with ``weight_scale=0``)."""
    with torch.no_grad():
        block.roi.box.weight.mul_(weight_scale)
        block.roi.box.bias.copy_(torch.tensor([_logit(p) for p in box]))


def _slicing_reference(x, boxes):
    """The authors' loop: integer bounds, slice, bilinear resize; whole map when empty."""
    height, width = x.shape[-2:]
    out = []
    for i in range(x.shape[0]):
        x1, y1, x2, y2 = (int(v) for v in (boxes[i] * torch.tensor(
            [width, height, width, height])).tolist())
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        sample = x[i:i + 1, :, y1:y2, x1:x2] if (x2 > x1 and y2 > y1) else x[i:i + 1]
        out.append(F.interpolate(sample, size=(height, width), mode="bilinear",
                                 align_corners=False))
    return torch.cat(out)


# ---- the crop --------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(7, 5), (14, 14), (4, 4), (2, 2), (1, 1)])
def test_batched_faithful_crop_equals_per_sample_slicing(height, width):
    generator = torch.Generator().manual_seed(height * 100 + width)
    random_boxes = torch.rand(24, 4, generator=generator)  # about half of them inverted
    special = torch.tensor([[0.0, 0.0, 1.0, 1.0],      # whole map
                            [0.5, 0.5, 0.5, 0.5],      # empty
                            [0.9, 0.1, 0.95, 0.2],     # thin: often empty after flooring
                            [0.0, 0.0, 0.99, 0.01],    # zero height in pixels
                            [0.8, 0.7, 0.2, 0.3],      # inverted
                            [0.25, 0.0, 0.75, 0.999]])
    boxes = torch.cat([random_boxes, special])
    x = torch.randn(len(boxes), 3, height, width, generator=generator)
    cropped, used = crop_to_boxes(x, boxes, "faithful")
    assert cropped.shape == x.shape
    torch.testing.assert_close(cropped, _slicing_reference(x, boxes), atol=1e-5, rtol=1e-5)
    assert used.min() >= 0 and used.max() <= 1
    empty = len(random_boxes) + 1
    assert torch.equal(used[empty], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # fell back


def test_faithful_crop_of_a_ramp_matches_hand_computed_bilinear_values():
    # columns 2..5 of an 8-wide ramp (box x 0.25–0.75), stretched back to 8 columns:
    # source s = (i + ½)·4/8 − ½ clamped to [0, 3], value = 2 + s
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    cropped, used = crop_to_boxes(ramp, torch.tensor([[0.25, 0.0, 0.75, 1.0]]), "faithful")
    expected = torch.tensor([2.0, 2.25, 2.75, 3.25, 3.75, 4.25, 4.75, 5.0])
    torch.testing.assert_close(cropped[0, 0, 0], expected)
    torch.testing.assert_close(cropped[0, 0, 5], expected)  # rows: whole height, unchanged
    assert torch.equal(used, torch.tensor([[0.25, 0.0, 0.75, 1.0]]))


def test_differentiable_crop_samples_roi_align_centres_and_passes_gradients():
    # left half of an 8-wide ramp: centres (i + ½)·4/8 − ½ → -0.25 (clamped to 0), 0.25, … 3.25
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    box = torch.tensor([[0.0, 0.0, 0.5, 1.0]], requires_grad=True)
    cropped, _ = crop_to_boxes(ramp, box, "differentiable")
    torch.testing.assert_close(cropped[0, 0, 0],
                               torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25]))
    cropped.sum().backward()
    assert box.grad[0, 2] > 0  # widening the box reaches further up the ramp
    boxes = torch.tensor([[0.13, 0.21, 0.71, 0.83], [0.32, 0.05, 0.93, 0.61]],
                         dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda b: crop_to_boxes(x, b, "differentiable")[0], (boxes,))


@pytest.mark.parametrize("crop", ["faithful", "differentiable"])
def test_whole_map_box_is_the_identity(crop):
    x = torch.randn(2, 4, 5, 6)
    cropped, used = crop_to_boxes(x, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), crop)
    torch.testing.assert_close(cropped, x, atol=1e-6, rtol=0)
    assert torch.equal(used, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))


def test_pixel_bounds_floor_like_int_and_clip_like_slicing():
    bounds = pixel_bounds(torch.tensor([[0.26, 0.0, 0.74, 1.0]]), height=3, width=8)
    assert bounds.tolist() == [[2, 0, 5, 3]]


# ---- the block -------------------------------------------------------------------------------
@pytest.mark.parametrize("crop", ["faithful", "differentiable"])
def test_inverted_or_empty_box_falls_back_to_the_whole_map(crop):
    torch.manual_seed(0)
    block = MXABlock(16, crop=crop)
    x = torch.randn(3, 16, 6, 6)
    _force_box(block, (0.8, 0.7, 0.2, 0.3))  # x2 < x1, y2 < y1
    assert torch.equal(block.crop_region(x), x)
    assert torch.equal(block.last_crop_boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3))
    torch.testing.assert_close(block.last_boxes, torch.tensor([[0.8, 0.7, 0.2, 0.3]] * 3))
    if crop == "faithful":  # 6·0.5 = 3 and 6·0.6 = 3.6 give the same pixel: an empty slice
        _force_box(block, (0.5, 0.1, 0.6, 0.9))
        assert torch.equal(block.crop_region(x), x)


@pytest.mark.parametrize("crop", ["faithful", "differentiable"])
def test_one_pixel_maps_pass_through(crop):
    torch.manual_seed(0)
    block = MXABlock(32, crop=crop)
    x = torch.randn(4, 32, 1, 1)
    _force_box(block, (0.1, 0.1, 0.9, 0.9), weight_scale=1.0)
    torch.testing.assert_close(block.crop_region(x), x)
    out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_block_output_is_cbam_on_the_crop():
    torch.manual_seed(0)
    block = MXABlock(32, crop="faithful")
    _force_box(block, (0.25, 0.25, 0.75, 0.75))
    x = torch.randn(2, 32, 8, 8)
    cropped = _slicing_reference(x, torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 2))
    ca = block.channel_attention
    channel_gate = torch.sigmoid(ca.expand(torch.relu(ca.squeeze(cropped.mean((2, 3),
                                                                              keepdim=True)))))
    refined = cropped * channel_gate
    pooled = torch.cat([refined.max(1, keepdim=True).values, refined.mean(1, keepdim=True)], 1)
    expected = refined * torch.sigmoid(F.conv2d(pooled, block.spatial_attention.conv.weight,
                                                padding=3))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert ca.squeeze.out_channels == 2  # 32 // 16
    assert MXABlock(8).channel_attention.squeeze.out_channels == 1  # at least one channel


def test_mixer_equations_sum_and_gated():
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", num_classes=3, image_size=64, mxa_mode="gated")
    mixer = model.stages[0].blocks[0].mixer
    assert isinstance(mixer, MXAMixer) and mixer.alpha.item() == 0.0  # g = ½ at the start
    x = torch.randn(2, 64, 4, 4)
    mixer.eval()
    with torch.no_grad():
        attended, focused = mixer.m(x), mixer.mxa(x)
        torch.testing.assert_close(mixer(x), x + 0.5 * attended + 0.5 * focused)
        mixer.alpha.fill_(2.0)
        gate = 1 / (1 + math.exp(-2.0))
        torch.testing.assert_close(mixer(x), x + gate * attended + (1 - gate) * focused)
        mixer.mode = "sum"
        torch.testing.assert_close(mixer(x), x + attended + focused)


# ---- the authors' placement --------------------------------------------------------------------
def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere: timm starts the BatchNorm scales that close the residual
    branches at 0 (LWA, dw, FFN add nothing at first), which would hide a wrong wiring."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


class _AuthorsBlock(nn.Module):
    """Their ``EfficientViTBlock.forward``, written out on an untouched timm block:
    ``x = mixer(x) + mxa(x)`` (both ``Residual``s), then ``ffn1(dw1(mixer(ffn0(dw0(x)))))``."""

    def __init__(self, block: nn.Module, mxa: nn.Module, gate: torch.Tensor | None = None):
        super().__init__()
        self.block, self.mxa, self.gate = block, mxa, gate

    def forward(self, x):
        mixed, focused = self.block.mixer(x), x + self.mxa(x)
        if self.gate is None:
            x = mixed + focused
        else:
            x = self.gate * mixed + (1 - self.gate) * focused
        return self.block(x)


@pytest.mark.parametrize("mode", ["sum", "gated"])
def test_block_input_placement_computes_the_authors_ordering_by_hand(mode):
    torch.manual_seed(0)
    model = _randomise(create_model("efficientvit_m0_mxa", num_classes=3, image_size=64,
                                    mxa_mode=mode, mxa_placement="block_input"))
    block = model.stages[0].blocks[0]
    assert isinstance(block, MXAAtBlockInput) and isinstance(block.mixer, MXAMixer)
    lwa, mxa = block.mixer.m, block.mixer.mxa
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        left, right = x + lwa(x), x + mxa(x)
        if mode == "gated":
            gate = torch.sigmoid(block.mixer.alpha)
            y = gate * left + (1 - gate) * right
        else:
            y = left + right  # = 2x + LWA(x) + MXA(x)
        y = y + block.dw0.m(y)
        y = y + block.ffn0.m(y)
        y = y + lwa(y)  # the same window attention a second time
        y = y + block.dw1.m(y)
        y = y + block.ffn1.m(y)
        torch.testing.assert_close(block(x), y)


@pytest.mark.parametrize("mode", ["sum", "gated"])
def test_block_input_model_equals_the_authors_forward_on_a_timm_model(mode):
    torch.manual_seed(0)
    ours = _randomise(create_model("efficientvit_m0_mxa", num_classes=3, image_size=64,
                                   mxa_mode=mode, mxa_placement="block_input"))
    plain = create_model("efficientvit_m0", num_classes=3, image_size=64)
    timm_keys = set(plain.state_dict())
    assert timm_keys <= set(ours.state_dict())  # timm's weights keep their names
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if k in timm_keys})
    authors = copy.deepcopy(plain).eval()
    for s, stage in enumerate(authors.stages):
        for b, block in enumerate(stage.blocks):
            mixer = ours.stages[s].blocks[b].mixer
            gate = torch.sigmoid(mixer.alpha).detach() if mode == "gated" else None
            stage.blocks[b] = _AuthorsBlock(block, mixer.mxa, gate)
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), authors(images))
        assert not torch.allclose(ours(images), plain.eval()(images))


def test_both_placements_hold_the_same_parameters_under_the_same_names():
    torch.manual_seed(0)
    mixer = create_model("efficientvit_m0_mxa", num_classes=3, image_size=64, mxa_mode="gated")
    block_input = create_model("efficientvit_m0_mxa", num_classes=3, image_size=64,
                               mxa_mode="gated", mxa_placement="block_input")
    shapes = {k: v.shape for k, v in mixer.state_dict().items()}
    assert shapes == {k: v.shape for k, v in block_input.state_dict().items()}
    assert count_parameters(mixer) == count_parameters(block_input)
    _randomise(mixer)
    block_input.load_state_dict(mixer.state_dict())
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # same weights, other wiring: other logits
        assert not torch.allclose(mixer(images), block_input.eval()(images), atol=1e-3)
    # the block_input model trains: MXA and both uses of the window attention get gradients
    block_input.train()
    block_input(images).sum().backward()
    block = block_input.stages[0].blocks[0]
    assert block.mixer.mxa.spatial_attention.conv.weight.grad.abs().sum() > 0
    assert block.mixer.m.attn.qkvs[0].conv.weight.grad.abs().sum() > 0
    assert block.mixer.alpha.grad is not None


def test_block_input_checkpoint_rebuilds_with_its_placement(tmp_path):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint

    model = _randomise(create_model("efficientvit_m0_mxa", num_classes=2, image_size=64,
                                    mxa_placement="block_input"))
    save_best_checkpoint(tmp_path / "best.pt", model)
    rebuilt, _ = load_model_from_checkpoint(tmp_path / "best.pt")
    assert rebuilt.mxa_config["placement"] == "block_input"
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


# ---- the model -------------------------------------------------------------------------------
@pytest.mark.parametrize("size,crop,mode,placement", [
    (64, "faithful", "sum", "mixer"), (64, "faithful", "gated", "mixer"),
    (64, "differentiable", "sum", "mixer"), (64, "differentiable", "gated", "mixer"),
    (128, "faithful", "sum", "mixer"), (128, "differentiable", "gated", "mixer"),
    (224, "faithful", "gated", "mixer"), (224, "differentiable", "sum", "mixer"),
    (64, "faithful", "sum", "block_input"), (128, "differentiable", "gated", "block_input"),
    (224, "faithful", "sum", "block_input"),
])
def test_logits_and_boxes_at_every_size(size, crop, mode, placement):
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", num_classes=14, in_chans=1, image_size=size,
                         mxa_mode=mode, crop=crop, mxa_placement=placement).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, size, size))
    assert logits.shape == (2, 14) and torch.isfinite(logits).all()
    blocks = mxa_blocks(model)
    assert len(blocks) == 1 + 2 + 3  # every attention block of M0 (depths 1, 2, 3)
    assert all(block.crop == crop for _, block in blocks)
    boxes = last_boxes(model)
    assert list(boxes) == [name for name, _ in blocks]
    for name, box in boxes.items():
        assert box.shape == (2, 4) and not box.requires_grad, name
        assert box.min() >= 0 and box.max() <= 1, name
    assert model.cxr_config["kwargs"] == {"mxa_mode": mode, "crop": crop,
                                          "mxa_placement": placement}
    assert model.mxa_config == {"mxa_mode": mode, "crop": crop, "roi_init": "default",
                                "placement": placement}
    wired = {type(block).__name__ for stage in model.stages for block in stage.blocks}
    assert wired == {"MXAAtBlockInput" if placement == "block_input" else "EfficientVitBlock"}


def test_differentiable_mode_trains_the_roi_branch():
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", num_classes=4, in_chans=1, image_size=128,
                         crop="differentiable")
    blocks = [block for _, block in mxa_blocks(model)]
    for block in blocks:  # a proper box, so no sample falls back to the whole map
        _force_box(block, (0.1, 0.15, 0.8, 0.9), weight_scale=0.1)
    model(torch.rand(2, 1, 128, 128)).sum().backward()
    for block in blocks:  # maps of 8², 4², 2²: every ROI branch gets a gradient
        for param in block.roi.parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0


def test_faithful_mode_leaves_the_roi_branch_untrained():
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", num_classes=4, in_chans=1, image_size=128,
                         crop="faithful")
    blocks = [block for _, block in mxa_blocks(model)]
    for block in blocks:
        _force_box(block, (0.1, 0.15, 0.8, 0.9), weight_scale=0.1)
    model(torch.rand(2, 1, 128, 128)).sum().backward()
    for block in blocks:  # frozen, so DDP does not wait for gradients that never come
        assert not any(p.requires_grad for p in block.roi.parameters())
        assert all(p.grad is None or not p.grad.any() for p in block.roi.parameters())
        for conv in (block.channel_attention.squeeze, block.channel_attention.expand,
                     block.spatial_attention.conv):
            assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # switching the mode switches the ROI branch's gradients on
    blocks[0].crop = "differentiable"
    assert all(p.requires_grad for p in blocks[0].roi.parameters())


def test_whole_map_start_crops_from_the_first_step():
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", num_classes=4, in_chans=1, image_size=128,
                         crop="differentiable", roi_init="whole")
    model(torch.rand(3, 1, 128, 128)).sum().backward()
    for name, block in mxa_blocks(model):
        torch.testing.assert_close(block.last_boxes, torch.tensor([[0.05, 0.05, 0.95, 0.95]] * 3),
                                   atol=0.02, rtol=0)
        torch.testing.assert_close(block.last_crop_boxes, block.last_boxes)  # no fallback
        assert block.roi.conv.weight.grad.abs().sum() > 0, name


def test_one_channel_m0_mxa_trains_at_64_px():
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", num_classes=14, in_chans=1, image_size=64)
    images, targets = torch.rand(4, 1, 64, 64), torch.randint(0, 2, (4, 14)).float()
    loss = F.binary_cross_entropy_with_logits(model(images), targets)
    loss.backward()
    assert model.patch_embed.conv1.conv.weight.grad.shape == (8, 1, 3, 3)
    assert model.patch_embed.conv1.conv.weight.grad.abs().sum() > 0
    assert model.stages[2].blocks[2].mixer.mxa.spatial_attention.conv.weight.grad.abs().sum() > 0


def test_timm_weights_fit_the_backbone(tmp_path):
    torch.manual_seed(0)
    plain = create_model("efficientvit_m0", num_classes=14, in_chans=1, image_size=64)
    with_mxa = create_model("efficientvit_m0_mxa", num_classes=14, in_chans=1, image_size=64,
                            mxa_mode="gated")
    plain_shapes = {k: v.shape for k, v in plain.state_dict().items()}
    mxa_shapes = {k: v.shape for k, v in with_mxa.state_dict().items()}
    assert plain_shapes.items() <= mxa_shapes.items()
    assert all(".mixer.mxa." in k or k.endswith(".mixer.alpha")
               for k in mxa_shapes.keys() - plain_shapes.keys())
    # an ImageNet-shaped (RGB, 1000 classes, 224 px) file goes through timm's adaptation
    imagenet = timm.create_model("efficientvit_m0", num_classes=1000, in_chans=3)
    path = tmp_path / "efficientvit_m0.pth"
    torch.save(imagenet.state_dict(), path)
    loaded = create_model("efficientvit_m0_mxa", num_classes=14, in_chans=1, image_size=64,
                          pretrained=str(path))
    key = "stages.1.blocks.0.mixer.m.attn.qkvs.0.conv.weight"
    assert torch.equal(loaded.state_dict()[key], imagenet.state_dict()[key])
    first = "patch_embed.conv1.conv.weight"  # the RGB stem kept, an input adapter before it
    assert torch.equal(loaded.state_dict()[first], imagenet.state_dict()[first])
    assert loaded.cxr_config["input_norm"] == "pretrained"
    # our own MXA checkpoint comes back exactly
    ours = tmp_path / "mxa.pth"
    torch.save(loaded.state_dict(), ours)
    again = create_model("efficientvit_m0_mxa", num_classes=14, in_chans=1, image_size=64,
                         pretrained=str(ours))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="do not fit.*head"):  # MXA weights, other class count
        create_model("efficientvit_m0_mxa", num_classes=3, in_chans=1, image_size=64,
                     pretrained=str(ours))


def test_the_authors_logged_parameter_counts_are_rebuilt_exactly():
    from cxrstudy.methods.mxa import study

    table = study.authors_parameter_counts()
    assert list(table["run"]) == ["baseline", "mxa", "mxa_kd"]
    assert list(table["authors' n_parameters"]) == [12094162, 16149010, 16155168]  # their logs
    assert list(table["ours"]) == [12094162, 16149010, 16155168]
    assert (table["ours − authors'"] == 0).all()
    assert table["configuration"][0] == "create_model('efficientvit_m5', 14, in_chans=3, image_size=224)"
    # the same counts on real (initialised) models, and the differences by hand
    baseline = create_model("efficientvit_m5", num_classes=14, in_chans=3, image_size=224)
    plain = create_model("efficientvit_m5", num_classes=14, in_chans=1, image_size=224)
    with_mxa = create_model("efficientvit_m5_mxa", num_classes=14, in_chans=1, image_size=224)
    distilled = create_model("efficientvit_m5_mxa", num_classes=14, in_chans=1, image_size=224,
                             distilled=True)
    assert count_parameters(baseline) == 12094162 and count_parameters(distilled) == 16155168
    assert count_parameters(baseline) - count_parameters(plain) == 24 * 2 * 3 * 3  # RGB stem
    assert count_parameters(distilled) - count_parameters(with_mxa) == 2 * 384 + 14 * 385  # head
    # MXA adds Σ 4.5C² + C²/8 + 2C + 4 + 98 over the blocks: C = 192, 3×288, 4×384
    added = sum(4.5 * c * c + c * c / 8 + 2 * c + 4 + 98 for c in [192] + [288] * 3 + [384] * 4)
    assert count_parameters(with_mxa) - count_parameters(plain) == added
    with torch.no_grad():
        logits = with_mxa.eval()(torch.rand(1, 1, 64, 64))
    assert logits.shape == (1, 14) and torch.isfinite(logits).all()


def test_the_authors_logs_are_in_the_reference_with_their_files():
    from cxrstudy import reference

    for run, folder in (("baseline", "augs:u1"), ("mxa", "augs:u1+MXA"),
                        ("mxa_kd", "augs:u1+MXA+KD")):
        for key in ("log_n_parameters", "log_micro_auc", "log_per_class_auc"):
            source = reference.number("mxa", f"{key}.{run}")["source"]
            assert f"Results/ablation_study/{folder}/log.txt" in source["where"], (key, run)
            assert source["url"].endswith(f"/{folder}/log.txt"), (key, run)
    assert reference.values_by_prefix("mxa", "log_micro_auc") == {
        "baseline": 0.6708, "mxa": 0.8251, "mxa_kd": 0.8244}
    baseline = reference.number("mxa", "log_per_class_auc.baseline")["value"]
    assert len(baseline) == 13 and "Fracture" not in baseline  # NaN in their log
    assert sum(v == 0.5 for v in baseline.values()) == 9  # constant scores
    assert reference.number("mxa", "log_per_class_auc.mxa")["value"]["Lung Lesion"] == 0.0944
    # a per-class value maps class names to numbers, nothing else
    data = {"papers": {"mxa": copy.deepcopy(reference.paper("mxa"))}}
    entry = next(n for n in data["papers"]["mxa"]["numbers"]
                 if n["key"] == "log_per_class_auc.mxa")
    reference.check_reference(data)
    entry["value"] = {"No Finding": "high"}
    with pytest.raises(reference.ReferenceError, match="mapping of class names"):
        reference.check_reference(data)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="crop must be one of"):
        create_model("efficientvit_m0_mxa", num_classes=2, image_size=64, crop="soft")
    with pytest.raises(ValueError, match="roi_init must be one of"):
        create_model("efficientvit_m0_mxa", num_classes=2, image_size=64, roi_init="centre")
    with pytest.raises(ValueError, match="mxa_mode must be one of"):
        create_model("efficientvit_m0_mxa", num_classes=2, image_size=64, mxa_mode="mean")
    with pytest.raises(ValueError, match="mxa_placement must be one of"):
        create_model("efficientvit_m0_mxa", num_classes=2, image_size=64, mxa_placement="after")
    with pytest.raises(ValueError, match="no EfficientVitBlock"):
        add_mxa(create_model("resnet18", num_classes=2, image_size=32))
    for placement in ("mixer", "block_input"):
        with pytest.raises(ValueError, match="already has MXA"):
            add_mxa(create_model("efficientvit_m0_mxa", num_classes=2, image_size=64,
                                 mxa_placement=placement))


def test_distilled_mxa_student_wraps_the_mxa_model_and_rebuilds_from_its_checkpoint(tmp_path):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint
    from cxrstudy.models import DistilledClassifier

    model = create_model("efficientvit_m0_mxa", num_classes=2, image_size=64, distilled=True)
    assert isinstance(model, DistilledClassifier)
    assert len(mxa_blocks(model.backbone)) == 6  # the head goes onto the model with MXA in place
    assert model.cxr_config["kwargs"]["distilled"] is True
    save_best_checkpoint(tmp_path / "best.pt", model)
    rebuilt, _ = load_model_from_checkpoint(tmp_path / "best.pt")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-6)


def test_block_labels_count_stages_and_blocks_from_one():
    from cxrstudy.methods.mxa.model import block_label, mxa_blocks

    assert block_label("stages.1.blocks.0.mixer.mxa") == "MXA, stage 2 block 1"
    assert block_label("blocks.3.mxa") == "MXA, block 4"
    assert block_label("mxa") == "mxa"
    model = create_model("efficientvit_m0_mxa", num_classes=3, in_chans=1, image_size=64)
    labels = [block_label(name) for name, _ in mxa_blocks(model)]
    assert labels and all(label.startswith("MXA, stage ") for label in labels)


# ---- one batch through the block: the equations beside the modules (notebook 02) -------------
def _trace_steps(trace):
    return trace.set_index("step")


@pytest.mark.parametrize("crop, region_mean", [
    # box (0.25, 0.01, 0.75, 0.99) on a 6×6 map: whole pixels (1, 0, 4, 5) faithful, as is
    # differentiable
    ("faithful", (1 / 6 + 0 + 4 / 6 + 5 / 6) / 4),
    ("differentiable", (0.25 + 0.01 + 0.75 + 0.99) / 4),
])
def test_trace_block_computes_each_step_by_hand_as_the_modules_do(crop, region_mean):
    from cxrstudy.methods.mxa.model import TRACE_STEPS, trace_block

    torch.manual_seed(0)
    block = MXABlock(8, crop=crop)
    _force_box(block, (0.25, 0.01, 0.75, 0.99))
    trace = trace_block(block, torch.randn(3, 8, 6, 6))
    assert list(trace["step"]) == [step for step, _ in TRACE_STEPS]
    assert list(trace["shape"]) == ["3×8×6×6", "3×4", "3×4", "3×8×6×6", "3×8×1×1", "3×8×6×6",
                                    "3×1×6×6", "3×8×6×6"]
    assert trace["finite"].all()
    assert (trace["max |by hand − library|"] < 1e-12).all()
    steps = _trace_steps(trace)
    assert steps.loc["ROI box", "by hand (mean)"] == pytest.approx(0.5, abs=1e-12)
    assert steps.loc["region cropped", "library (mean)"] == pytest.approx(region_mean, abs=1e-12)
    assert block.crop == crop and block.last_boxes is None  # a copy ran, the block is untouched


def test_trace_block_attention_maps_are_one_half_with_zero_weights():
    """σ(0) = ½: with the last conv of each CBAM module at zero, M_c and M_s are ½ everywhere,
    so the output is a quarter of the crop; an empty box crops the whole map, unchanged."""
    from cxrstudy.methods.mxa.model import trace_block

    block = MXABlock(16)
    _force_box(block, (0.5, 0.5, 0.5, 0.5))  # empty: the whole map
    with torch.no_grad():
        block.channel_attention.expand.weight.zero_()
        block.spatial_attention.conv.weight.zero_()
    x = torch.randn(2, 16, 5, 5)
    steps = _trace_steps(trace_block(block, x))
    assert steps.loc["region cropped", "by hand (mean)"] == pytest.approx(0.5)  # (0, 0, 1, 1)
    assert steps.loc["crop", "library (mean)"] == pytest.approx(float(x.double().mean()), abs=1e-12)
    assert steps.loc["channel attention", "by hand (mean)"] == 0.5
    assert steps.loc["spatial attention", "library (mean)"] == 0.5
    assert steps.loc["output", "library (mean)"] == pytest.approx(float(x.double().mean()) / 4,
                                                                  abs=1e-12)


def test_block_input_is_the_map_each_block_sees():
    from cxrstudy.methods.mxa.model import block_input, block_shapes

    model = create_model("efficientvit_m0_mxa", num_classes=3, in_chans=1, image_size=64).train()
    shapes = block_shapes("efficientvit_m0", image_size=64, num_classes=3)
    images = torch.rand(2, 1, 64, 64)
    for k in (0, -1):
        row = shapes.iloc[k]
        assert tuple(block_input(model, images, k).shape) == (2, row["C"], row["H"], row["W"])
    assert tuple(block_input(model, images).shape) == (2, 64, 4, 4)  # M0, first stage, 64 px / 16
    assert model.training  # left as it came
    with pytest.raises(ValueError, match="6 MXA blocks"):
        block_input(model, images, 6)


def test_placement_table_runs_both_wirings_on_the_same_batch_and_weights():
    from cxrstudy.methods.mxa.model import placement_table

    table = placement_table("efficientvit_m0", torch.rand(2, 1, 64, 64), 5,
                            crop="differentiable").set_index("placement")
    assert list(table.index) == ["mixer", "block_input"]
    assert (table["shape MXA sees"] == "2×64×4×4").all()
    assert list(table["LWA passes per block"]) == [1, 2]  # the authors' wiring runs LWA twice
    assert (table["MXA blocks"] == 6).all() and (table["output"] == "2×5").all()
    plain = create_model("efficientvit_m0_mxa", num_classes=5, image_size=64)
    assert (table["parameters"] == count_parameters(plain)).all()
    assert "x + LWA(x) + MXA(x)" in table.loc["mixer", "residual"]
    assert table.loc["block_input", "where"].startswith("the authors' code")
