"""The MXA study glue: arms map to the right models, counts and shapes match the block."""
import pytest
import torch

from cxrstudy.models import DistilledClassifier, count_parameters, create_model
from cxrstudy.models.mxa import mxa_blocks
from cxrstudy.studies import mxa as study


@pytest.mark.parametrize("arm, name, kwargs", [
    ("baseline", "efficientvit_m0", {}),
    ("kd", "efficientvit_m0", {"distilled": True}),
    ("mxa", "efficientvit_m0_mxa", {"mxa_mode": "sum", "crop": "faithful", "roi_init": "default"}),
    ("mxa_kd_differentiable", "efficientvit_m0_mxa",
     {"mxa_mode": "sum", "crop": "differentiable", "roi_init": "whole", "distilled": True}),
    ("mxa_kd_gated", "efficientvit_m0_mxa",
     {"mxa_mode": "gated", "crop": "faithful", "roi_init": "default", "distilled": True}),
])
def test_arms_name_the_model_and_its_options(arm, name, kwargs):
    assert study.arm_model(arm, "efficientvit_m0") == (name, kwargs)


def test_unknown_arm_names_the_choices():
    with pytest.raises(ValueError, match="mxa_kd_gated"):
        study.arm_model("mxa+kd", "efficientvit_m0")


def test_parameter_counts_match_the_paper_for_m5_within_one_percent():
    table = study.parameter_counts(["efficientvit_m5"]).iloc[0]
    assert abs(table["without MXA (M)"] / 12.09 - 1) < 0.01
    assert abs(table["with MXA (M)"] / 16.16 - 1) < 0.01
    # faithful crop: the ROI heads (3.95 M) are frozen, the rest is trained
    assert table["trained with faithful crop (M)"] == pytest.approx(12.203954, abs=1e-6)


def test_block_shapes_follow_the_stages():
    shapes = study.block_shapes("efficientvit_m0", image_size=64)
    # M0: embed 64/128/192, depth 1/2/3; 64 px → 4×4, 2×2, 1×1 maps after the 16× stem
    assert list(shapes["C"]) == [64, 128, 128, 192, 192, 192]
    assert list(shapes["H"]) == [4, 2, 2, 1, 1, 1]
    model = create_model("efficientvit_m0_mxa", 14, image_size=64)
    assert shapes["MXA params"].sum() == sum(count_parameters(b) for _, b in mxa_blocks(model))


def test_roi_boxes_and_statistics_on_a_distilled_student():
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", 3, image_size=64, distilled=True)
    assert isinstance(model, DistilledClassifier)
    images = torch.rand(5, 1, 64, 64)
    boxes = study.roi_boxes(model, images)
    assert len(boxes) == 6 and all(b.shape == (5, 4) for b in boxes.values())
    assert all(((b >= 0) & (b <= 1)).all() for b in boxes.values())
    batches = [{"image": images[:3]}, {"image": images[3:]}]
    stats = study.box_statistics(model, batches)
    assert list(stats["images"]) == [5] * 6
    # default initialisation: boxes near (½, ½, ½, ½) are empty → the whole map is used
    assert (stats["whole-map fallback"] == 1.0).all()
    assert (stats["mean cropped area"] == 1.0).all()
    assert len(study.box_statistics(model, batches, max_batches=1)) == 6


def test_kd_arm_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        study.train_arm("kd", data=None, out=None, backbone="efficientvit_m0")


def test_a_sibling_run_is_reused_only_if_it_never_saw_our_test_images(tmp_path):
    import pandas as pd
    from types import SimpleNamespace

    out = SimpleNamespace(root=tmp_path / "03_knowledge_distillation")
    data = SimpleNamespace(test=SimpleNamespace(records=pd.DataFrame({"image_id": ["c", "d"]})))
    with pytest.raises(ValueError, match="run:<notebook>/<model tag>"):
        study.sibling_run("run:01_baseline", out, data)
    with pytest.raises(FileNotFoundError, match="run 01_baseline with this profile first"):
        study.sibling_run("run:01_baseline/densenet121", out, data)
    folder = tmp_path / "01_baseline/checkpoints/densenet121"
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="splits.csv"):
        study.sibling_run("run:01_baseline/densenet121", out, data)
    splits = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": ["1", "2", "3", "4"],
                           "split": ["train", "val", "test", "test"]})
    splits.to_csv(tmp_path / "01_baseline/splits.csv", index=False)
    assert study.sibling_run("run:01_baseline/densenet121", out, data) == folder
    splits.assign(split=["train", "val", "train", "test"]).to_csv(
        tmp_path / "01_baseline/splits.csv", index=False)
    with pytest.raises(ValueError, match="trained on 1 of our test images"):
        study.sibling_run("run:01_baseline/densenet121", out, data)
