"""create_model: registry before timm, shapes at small sizes, rebuild config, pretrained weights."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from cxrstudy.models import (PretrainedWeightsUnavailable, count_parameters, create_model,
                             list_models, register_model, unregister_model)


@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    """No weights anywhere: empty HF and torch hub caches, hub offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.mark.parametrize("name,size,extra", [
    ("efficientvit_m0", 32, {}),
    ("efficientvit_m0", 64, {}),
    ("efficientvit_m0", 224, {}),
    ("resnet18", 32, {}),
    ("resnet18", 64, {}),
    ("deit_tiny", 32, {"patch_size": 4}),
    ("deit_tiny", 64, {}),
])
def test_one_channel_models_give_logits_per_class(name, size, extra):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=1, image_size=size, **extra).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, size, size))
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_vit_patch_size_sets_the_token_grid():
    model = create_model("deit_tiny", num_classes=3, image_size=32, patch_size=4)
    assert model.patch_embed.grid_size == (8, 8)
    assert model.patch_embed.proj.in_channels == 1


def test_efficientvit_attention_window_follows_the_image_size():
    small = create_model("efficientvit_m0", num_classes=3, image_size=64)
    large = create_model("efficientvit_m0", num_classes=3, image_size=224)
    # 64 px → 4×4 tokens in stage 1, so the 7×7 window shrinks to 4×4 (16 bias offsets)
    assert small.stages[0].blocks[0].mixer.m.attn.attention_biases.shape[1] == 16
    assert large.stages[0].blocks[0].mixer.m.attn.attention_biases.shape[1] == 49


def test_efficientvit_m5_size_matches_the_mxa_authors_log():
    # the authors' baseline log records n_parameters 12 094 162: the 14-class M5 at 224 px with
    # a three-channel stem; with one channel it is 432 fewer (24 filters × 2 channels × 3 × 3)
    rgb = create_model("efficientvit_m5", num_classes=14, in_chans=3, image_size=224)
    gray = create_model("efficientvit_m5", num_classes=14, in_chans=1, image_size=224)
    assert count_parameters(rgb) == 12094162
    assert count_parameters(gray) == 12093730


def test_cxr_config_rebuilds_the_same_architecture():
    model = create_model("deit_tiny", num_classes=4, in_chans=1, image_size=32, patch_size=4)
    config = model.cxr_config
    assert config == {"name": "deit_tiny", "num_classes": 4, "in_chans": 1, "image_size": 32,
                      "kwargs": {"patch_size": 4}, "pretrained": False, "input_norm": "none"}
    rebuilt = create_model(config["name"], config["num_classes"], in_chans=config["in_chans"],
                           image_size=config["image_size"], **config["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_aliases_name_timm_architectures():
    assert create_model("deit_small", num_classes=2, image_size=32).embed_dim == 384
    assert {"deit_tiny", "deit_small", "vit_small", "efficientvit_m5", "resnet18",
            "densenet121"} <= set(list_models())
    assert list_models("efficientvit_m?") == [f"efficientvit_m{i}" for i in range(6)]


class _TwoConv(nn.Module):
    def __init__(self, num_classes, in_chans):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def test_registered_builders_come_before_timm_and_get_every_argument():
    calls = []

    @register_model("resnet18", overwrite=True)
    def fake_resnet18(num_classes, in_chans, image_size, pretrained=False, **kwargs):
        calls.append((num_classes, in_chans, image_size, pretrained, kwargs))
        return _TwoConv(num_classes, in_chans)

    try:
        model = create_model("resnet18", num_classes=3, image_size=40, width=2)
    finally:
        unregister_model("resnet18")
    assert isinstance(model, _TwoConv)
    assert calls == [(3, 1, 40, False, {"width": 2})]
    assert model.cxr_config["name"] == "resnet18"
    assert type(create_model("resnet18", num_classes=3, image_size=32)).__name__ == "ResNet"


def test_registering_a_taken_name_needs_overwrite():
    @register_model
    def test_models_two_conv(num_classes, in_chans, image_size, pretrained=False, **kwargs):
        return _TwoConv(num_classes, in_chans)

    try:
        assert "test_models_two_conv" in list_models()
        with pytest.raises(ValueError, match="already registered"):
            register_model("test_models_two_conv")(lambda **kw: None)
        with pytest.raises(ValueError, match="alias"):
            register_model("deit_tiny")(lambda **kw: None)
    finally:
        unregister_model("test_models_two_conv")


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="efficientvit_m5"):
        create_model("efficientvit_m55", num_classes=2)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="image_size"):
        create_model("resnet18", num_classes=2, image_size=4)


def test_offline_without_cached_weights_fails_at_once_and_says_why(empty_weight_caches):
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_model("resnet18", num_classes=14, pretrained=True)
    message = str(info.value)
    assert "'resnet18'" in message and "timm/resnet18.a1_in1k" in message
    assert str(empty_weight_caches / "hf" / "hub") in message  # where it looked
    assert "HF_HUB_OFFLINE=0" in message  # how to get them


def test_online_but_unreachable_hub_fails_at_once(empty_weight_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot be reached"):
        create_model("efficientvit_m5", num_classes=14, pretrained=True)


def _fake_hub_snapshot(hf_home, repo: str, state_dict: dict) -> None:
    """The Hugging Face cache layout: refs/main names the snapshot holding the file."""
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / "model.safetensors")


def test_cached_imagenet_weights_are_used_offline_with_their_own_input(empty_weight_caches):
    torch.manual_seed(0)
    imagenet = timm.create_model("resnet18", num_classes=1000, in_chans=3).state_dict()
    _fake_hub_snapshot(empty_weight_caches / "hf", "timm/resnet18.a1_in1k", imagenet)

    model = create_model("resnet18", num_classes=14, in_chans=1, image_size=32, pretrained=True)
    own = model.state_dict()
    # the RGB stem is kept as trained; the grey image is repeated and normalised before it
    assert torch.equal(own["conv1.weight"], imagenet["conv1.weight"])
    assert torch.equal(own["layer3.1.conv2.weight"], imagenet["layer3.1.conv2.weight"])
    assert own["fc.weight"].shape == (14, 512)  # the 1000-class head is not carried over
    assert model.cxr_config["pretrained"] is True
    assert model.cxr_config["input_norm"] == "pretrained"
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 14)


def test_input_norm_none_sums_the_rgb_kernels_for_a_grey_input(empty_weight_caches):
    torch.manual_seed(0)
    imagenet = timm.create_model("resnet18", num_classes=1000, in_chans=3).state_dict()
    _fake_hub_snapshot(empty_weight_caches / "hf", "timm/resnet18.a1_in1k", imagenet)

    model = create_model("resnet18", num_classes=14, in_chans=1, image_size=32, pretrained=True,
                         input_norm="none")
    assert torch.allclose(model.state_dict()["conv1.weight"],
                          imagenet["conv1.weight"].sum(1, keepdim=True))
    assert model.cxr_config["input_norm"] == "none"
    assert not any("input_adapter" in key for key in model.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_weight_file_loads_into_a_fresh_model(tmp_path, suffix):
    torch.manual_seed(1)
    trained = create_model("resnet18", num_classes=3, image_size=32)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(trained.state_dict(), path)
    else:
        torch.save(trained.state_dict(), path)
    torch.manual_seed(2)
    fresh = create_model("resnet18", num_classes=3, image_size=32, pretrained=path)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.cxr_config["pretrained"] == str(path)


def test_weights_from_another_resolution_are_adapted_by_timm(tmp_path):
    torch.manual_seed(3)
    at_224 = create_model("efficientvit_m0", num_classes=3, image_size=224)
    path = tmp_path / "m0_224.pth"
    torch.save(at_224.state_dict(), path)
    at_64 = create_model("efficientvit_m0", num_classes=3, image_size=64, pretrained=path)
    bias_key = "stages.0.blocks.0.mixer.m.attn.attention_biases"
    assert at_64.state_dict()[bias_key].shape[1] == 16  # 7×7 table resized to the 4×4 window
    # the same-sized head and the convolutions come over unchanged
    for key in ("head.linear.weight", "patch_embed.conv1.conv.weight"):
        assert torch.equal(at_64.state_dict()[key], at_224.state_dict()[key])


def test_a_missing_weight_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_model("resnet18", num_classes=2, pretrained=tmp_path / "nowhere.pth")
