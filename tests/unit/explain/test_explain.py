"""cxrstudy.explain: a CAM target for every model the library builds, grad-cam maps of the right
shape, and localization numbers checked against maps and boxes worked out by hand."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrstudy.explain import (TokenReshape, box_mask, cam_target, class_maps, find_trained_models,
                              localize, register_target, select_items, summarize)
from cxrstudy.explain.evidence import box_maps
from cxrstudy.explain.target_layers import CAMTarget
from cxrstudy.models import create_model, list_models
from cxrstudy.models.registry import registered_builder

SIZE = 32  # the smallest size every registered model is built at here (ViTs with 8-px patches)


def small_kwargs(name: str) -> dict:
    if name == "multitask":
        return {"backbone": "resnet18"}
    if name == "sigmoid_output":
        return {"backbone": "efficientvit_m0"}
    if name == "glori":
        return {"backbone": "deit_tiny", "patch_size": 8, "decoder_dim": 32,
                "decoder_ffn_dim": 64, "n_blocks": 2}
    if name == "linear_probe":
        return {"backbone": "deit_tiny", "patch_size": 8}
    if name in ("can", "logit_ensemble"):
        return {"backbones": ("resnet18", "efficientvit_m0")}
    if "deit" in name or "vit_small" in name:
        return {"patch_size": 8}
    return {}


def library_models() -> list[str]:
    """Every name the library itself can create: timm architectures and cxrstudy's builders,
    not the throw-away models other test files register in the same session."""
    def ours(name):
        builder = registered_builder(name)
        return builder is None or builder.__module__.startswith("cxrstudy.")
    return [name for name in list_models() if ours(name)]


@pytest.mark.parametrize("name", library_models())
def test_every_registered_model_has_a_cam_target_and_gives_image_sized_maps(name):
    torch.manual_seed(0)
    model = create_model(name, 3, in_chans=1, image_size=SIZE, **small_kwargs(name)).eval()
    target = cam_target(model)
    own = {id(m) for m in model.modules()}
    assert target.layers and all(id(layer) in own for layer in target.layers)
    maps = class_maps(model, torch.rand(2, 1, SIZE, SIZE), [0, 2], "gradcam", target)
    assert maps.shape == (2, SIZE, SIZE)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6


def test_distilled_wrapper_uses_its_backbones_layer():
    model = create_model("efficientvit_m0_mxa", 3, image_size=SIZE, distilled=True).eval()
    target = cam_target(model)
    assert any(target.layers[0] is stage for stage in model.backbone.stages)
    assert target.description.startswith("distilled: backbone.stages")


def test_a_stage_that_is_one_position_is_not_the_target():
    torch.manual_seed(0)
    model = create_model("efficientvit_m0", 3, image_size=64).eval()   # stages: 4×4, 2×2, 1×1
    target = cam_target(model)
    assert target.layers[0] is model.stages[1]
    assert cam_target(model, image_size=224).layers[0] is model.stages[-1]   # 4×4 there
    maps = class_maps(model, torch.rand(2, 1, 64, 64), [0, 1], "gradcam", target)
    assert maps.max() > 0.5  # a 1×1 map would min–max scale to zeros


def test_all_four_methods_on_one_cnn():
    torch.manual_seed(0)
    model = create_model("resnet18", 2, image_size=64).eval()
    images = torch.rand(2, 1, 64, 64)
    for method in ("gradcam", "gradcam++", "eigencam", "scorecam"):
        maps = class_maps(model, images, [0, 1], method, score_cam_batch_size=128)
        assert maps.shape == (2, 64, 64), method
    with pytest.raises(ValueError, match="unknown CAM method"):
        class_maps(model, images, [0, 1], "lime")


def test_unknown_architecture_is_named():
    class Mystery(nn.Module):
        def forward(self, x):
            return x

    model = Mystery()
    model.cxr_config = {"name": "mystery_net"}
    with pytest.raises(TypeError, match="mystery_net"):
        cam_target(model)


def test_token_reshape_drops_the_prefix_tokens():
    tokens = torch.arange(2 * (2 + 12) * 5, dtype=torch.float32).reshape(2, 14, 5)
    maps = TokenReshape(prefix=2, grid=(3, 4))(tokens)
    assert maps.shape == (2, 5, 3, 4)
    assert torch.equal(maps[0, :, 0, 0], tokens[0, 2])      # first patch token, not CLS
    assert torch.equal(maps[1, :, 2, 3], tokens[1, 13])     # last patch, row-major
    assert TokenReshape(0)(torch.zeros(1, 16, 3)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        TokenReshape(1, (3, 3))(torch.zeros(1, 12, 3))


class TwoRegions(nn.Module):
    """Class 0 sums the left half of the image, class 1 the right half, through a 2-channel
    'feature map' so Grad-CAM has one channel per class."""

    def __init__(self, size):
        super().__init__()
        left = torch.zeros(size, size)
        left[:, : size // 2] = 1
        self.register_buffer("masks", torch.stack([left, 1 - left]))
        self.features = nn.Identity()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        feats = self.features(x * self.masks[None] * self.scale)   # [B, 2, S, S]
        return feats.flatten(2).sum(-1)                             # [B, 2]


register_target(TwoRegions)(lambda model, size: CAMTarget([model.features], None, "features"))


def test_grad_cam_points_at_the_region_its_class_reads():
    size = 16
    image = torch.rand(1, 1, size, size) + 0.1
    model = TwoRegions(size).eval()
    left_box = [{"label": "A", "x": 0, "y": 0, "w": size / 2, "h": size}]
    maps = class_maps(model, image.repeat(2, 1, 1, 1), [0, 1], "gradcam")
    assert maps[0][:, size // 2:].max() == 0 and maps[1][:, : size // 2].max() == 0
    assert localize(maps[0], left_box, "A")["hit"] == 1.0
    assert localize(maps[1], left_box, "A")["hit"] == 0.0


# ---- localization by hand -----------------------------------------------------------------------
BOX = {"label": "Nodule", "x": 2.0, "y": 2.0, "w": 3.0, "h": 2.0}   # centres cols 2-4, rows 2-3


def test_box_mask_takes_pixels_whose_centre_is_inside():
    mask = box_mask([BOX], (8, 8))
    assert mask.sum() == 6
    assert mask[2:4, 2:5].all()


def test_peak_inside_the_box():
    saliency = np.zeros((8, 8))
    saliency[3, 3], saliency[0, 0] = 1.0, 0.6
    found = localize(saliency, [BOX], "Nodule", threshold=0.5)
    assert found["hit"] == 1.0 and found["boxes"] == 1
    assert found["iou"] == pytest.approx(1 / 7)          # hot {(3,3), (0,0)}, box 6 px
    assert found["coverage"] == pytest.approx(1 / 6)
    assert found["mass_inside"] == pytest.approx(1.0 / 1.6)
    assert found["chance"] == pytest.approx(6 / 64)


def test_peak_outside_the_box():
    saliency = np.zeros((8, 8))
    saliency[7, 7], saliency[3, 3] = 1.0, 0.8
    found = localize(saliency, [BOX], "Nodule", threshold=0.5)
    assert found["hit"] == 0.0
    assert found["iou"] == pytest.approx(1 / 7)
    assert found["mass_inside"] == pytest.approx(0.8 / 1.8)
    assert localize(saliency, [BOX], "Nodule", threshold=0.9)["iou"] == 0.0


def test_tolerance_and_flat_maps():
    saliency = np.zeros((8, 8))
    saliency[3, 6] = 1.0                                    # centre x 6.5: 1.5 px right of the box
    assert localize(saliency, [BOX], "Nodule", tolerance=1.0)["hit"] == 0.0
    assert localize(saliency, [BOX], "Nodule", tolerance=2.0)["hit"] == 1.0
    flat = localize(np.zeros((8, 8)), [BOX], "Nodule")
    assert flat["hit"] == 0.0 and flat["iou"] == 0.0 and flat["mass_inside"] == 0.0


def test_a_class_without_a_box_has_no_numbers_and_no_summary_row():
    saliency = np.zeros((8, 8))
    saliency[3, 3] = 1.0
    found = localize(saliency, [BOX], "Mass")
    assert found["boxes"] == 0 and np.isnan(found["hit"]) and np.isnan(found["iou"])
    rows = pd.DataFrame([
        dict(model="m", method="Grad-CAM", image_id="a", **{"class": "Nodule"},
             **localize(saliency, [BOX], "Nodule")),
        dict(model="m", method="Grad-CAM", image_id="b", **{"class": "Nodule"},
             **localize(np.roll(saliency, 4, axis=1), [BOX], "Nodule")),
        dict(model="m", method="Grad-CAM", image_id="a", **{"class": "Mass"}, **found)])
    table = summarize(rows)
    assert list(table["class"]) == ["Nodule"]
    assert table.loc[0, "hits"] == 1 and table.loc[0, "hit rate"] == 0.5
    assert table.loc[0, "boxes"] == 2 and table.loc[0, "images"] == 2


def test_localize_refuses_bad_maps():
    with pytest.raises(ValueError, match="non-negative"):
        localize(-np.ones((4, 4)), [BOX])
    with pytest.raises(ValueError, match="threshold"):
        localize(np.ones((4, 4)), [BOX], threshold=0.0)


def test_box_maps_of_normalised_boxes():
    maps = box_maps(np.array([[0.25, 0.25, 0.75, 0.75]]), 4)
    assert maps.shape == (1, 4, 4) and maps.sum() == 4 and maps[0, 1:3, 1:3].all()


# ---- which models, which images -----------------------------------------------------------------
def test_find_trained_models_reads_run_folders(tmp_path):
    for notebook, tag, name in [("01_baseline", "densenet121", "best.pt"),
                                ("01_baseline", "efficientvit_m0", "last.pt"),
                                ("05_glori", "glori", "best.pt"),
                                ("05_glori", "glori_0.25", "best.pt")]:
        folder = tmp_path / notebook / "checkpoints" / tag
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"")
    (tmp_path / "05_glori" / "checkpoints" / "empty").mkdir()
    found = find_trained_models(tmp_path, ["01_baseline", "05_glori"], exclude=["05_glori/*_0.*"])
    assert [m.key for m in found] == ["01_baseline/densenet121", "01_baseline/efficientvit_m0",
                                      "05_glori/glori"]
    assert found[1].checkpoint.name == "last.pt"
    with pytest.raises(FileNotFoundError, match="06_cross_attention"):
        find_trained_models(tmp_path, ["06_cross_attention"])


def test_select_items_keeps_unseen_boxed_images(nih_sample_root, tmp_path):
    from cxrstudy.data import load_dataset

    data = load_dataset("nih-sample", nih_sample_root, split="all", image_size=64)
    boxed = list(dict.fromkeys(data.boxes["image_id"].astype(str)))
    assert len(data.boxes) == 12                      # the sample's 12 boxes
    (tmp_path / "01_baseline").mkdir()
    pd.DataFrame({"image_id": boxed[:2], "patient_id": ["p0", "p1"], "split": ["train", "test"]}
                 ).to_csv(tmp_path / "01_baseline" / "splits.csv", index=False)
    test_only = select_items(data, tmp_path, ["01_baseline"], ["test"])
    assert boxed[0] not in set(test_only["image_id"])          # trained on: left out
    assert set(test_only["image_id"]) == set(boxed[1:])        # test, or never loaded
    assert (test_only["seen_by"] == "").all()
    everything = select_items(data, tmp_path, ["01_baseline"], ["train", "val", "test"])
    assert int(everything["boxes"].sum()) == 12
    assert everything.loc[everything["image_id"] == boxed[0], "seen_by"].iloc[0] == "01_baseline"
    with pytest.raises(ValueError, match="splits"):
        select_items(data, tmp_path, ["01_baseline"], ["holdout"])


def test_can_with_its_attention_off_has_no_map_of_its_own():
    """07 draws CAN's cross-attention only where it acts: can_no_attention's maps are held flat."""
    from cxrstudy.explain.evidence import evidence_kind

    kwargs = dict(image_size=32, backbones=["resnet18", "resnet18"])
    assert evidence_kind(create_model("can", 3, **kwargs)) == "can"
    assert evidence_kind(create_model("can", 3, cross_attention=False, **kwargs)) is None
