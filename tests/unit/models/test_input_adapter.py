"""The input adapter: a pretrained backbone sees (x − mean) / std per channel of its own
pretrained_cfg, a model trained from scratch sees x; every entry point and a checkpoint agree."""
import timm
import torch
from _fakes import save_best_checkpoint
from safetensors.torch import save_file

import pytest
from cxrstudy.models import create_model
from cxrstudy.models.input_adapter import InputAdapter, input_adapters
from cxrstudy.train.checkpoint import load_model_from_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stem_inputs(model, stem_name: str, images: torch.Tensor, call="forward"):
    """What the stem convolution receives (a pre-hook registered after the adapter's)."""
    seen = []
    stem = model.get_submodule(stem_name)
    hook = stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            getattr(model, call)(images)
    finally:
        hook.remove()
    return seen[0]


def _by_hand(images: torch.Tensor, mean, std) -> torch.Tensor:
    channels = [(images[:, 0] - m) / s for m, s in zip(mean, std)]
    return torch.stack(channels, dim=1)


@pytest.fixture
def imagenet_resnet18_file(tmp_path):
    """A stand-in for ImageNet weights: timm's resnet18 shapes (3 channels, 1000 classes)."""
    torch.manual_seed(0)
    path = tmp_path / "resnet18_imagenet.safetensors"
    save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), path)
    return path


def test_a_pretrained_stand_in_sees_its_pretrained_cfg_normalisation(imagenet_resnet18_file):
    model = create_model("resnet18", num_classes=3, image_size=32,
                         pretrained=imagenet_resnet18_file).eval()
    assert tuple(model.pretrained_cfg["mean"]) == IMAGENET_MEAN
    images = torch.rand(2, 1, 32, 32)
    seen = _stem_inputs(model, "conv1", images)
    assert seen.shape == (2, 3, 32, 32)
    assert torch.allclose(seen, _by_hand(images, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    # forward_features (what CAN, GLoRI and the heads call) goes through the same adapter
    assert torch.allclose(_stem_inputs(model, "conv1", images, "forward_features"), seen)
    assert model.cxr_config["input_norm"] == "pretrained"


def test_a_model_trained_from_scratch_sees_the_image_unchanged():
    model = create_model("resnet18", num_classes=3, image_size=32).eval()
    images = torch.rand(2, 1, 32, 32)
    assert torch.equal(_stem_inputs(model, "conv1", images), images)
    assert input_adapters(model) == []
    assert model.cxr_config["input_norm"] == "none"


def test_each_backbone_gets_its_own_statistics():
    """timm's ViT-S (augreg) was trained on 0.5 / 0.5, DeiT on ImageNet's mean and std."""
    vit = create_model("vit_small", 3, image_size=32, patch_size=8, input_norm="pretrained")
    deit = create_model("deit_tiny", 3, image_size=32, patch_size=8, input_norm="pretrained")
    images = torch.rand(1, 1, 32, 32)
    assert torch.allclose(_stem_inputs(vit, "patch_embed.proj", images), (images - 0.5) / 0.5)
    assert torch.allclose(_stem_inputs(deit, "patch_embed.proj", images),
                          _by_hand(images, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)


def test_a_two_network_model_adapts_each_backbone():
    can = create_model("can", 3, image_size=64, backbones=["resnet18", "efficientvit_m0"],
                       input_norm="pretrained")
    assert len(input_adapters(can)) == 2
    assert can(torch.rand(2, 1, 64, 64)).shape == (2, 3)


def test_a_checkpoint_rebuilds_the_adapter_and_the_outputs(imagenet_resnet18_file, tmp_path):
    model = create_model("resnet18", num_classes=2, image_size=32,
                         pretrained=imagenet_resnet18_file).eval()
    path = save_best_checkpoint(tmp_path / "best.pt", model)
    rebuilt, _ = load_model_from_checkpoint(path)
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), model(images), atol=1e-6)
    assert rebuilt.cxr_config["input_norm"] == "pretrained"


def test_our_own_weights_file_keeps_its_input_convention(imagenet_resnet18_file, tmp_path):
    pretrained = create_model("resnet18", num_classes=2, image_size=32,
                              pretrained=imagenet_resnet18_file)
    scratch = create_model("resnet18", num_classes=2, image_size=32)
    for model, expected in ((pretrained, "pretrained"), (scratch, "none")):
        path = tmp_path / f"{expected}.pth"
        torch.save(model.state_dict(), path)
        again = create_model("resnet18", num_classes=2, image_size=32, pretrained=path)
        assert again.cxr_config["input_norm"] == expected
        assert torch.equal(again.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])


def test_the_adapter_refuses_what_it_cannot_mean():
    adapter = InputAdapter(IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(adapter(torch.ones(1, 3, 2, 2)),
                          _by_hand(torch.ones(1, 1, 2, 2), IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValueError, match="2 input channels"):
        adapter(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="std positive"):
        InputAdapter((0.5,), (0.0,))
    with pytest.raises(ValueError, match="input_norm must be one of"):
        create_model("resnet18", num_classes=2, input_norm="imagenet")
