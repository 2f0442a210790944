"""The low-resolution study glue: token grids per size, one split at every size, deltas, maps."""
import gzip
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cxrstudy.models import create_model
from cxrstudy.models.attention_maps import cls_attention, minmax_per_image
from cxrstudy.studies import mlcak as study
from cxrstudy.train import Schedule


@pytest.mark.parametrize("size, grid, patch", [(224, 14, 16), (112, 14, 8), (56, 14, 4),
                                               (28, 14, 2), (64, 14, 4), (128, 14, 8),
                                               (112, 7, 16), (56, 7, 8)])
def test_patch_size_keeps_the_grid_or_the_nearest_finer_one(size, grid, patch):
    assert study.vit_kwargs(size, grid) == {"patch_size": patch}


def test_token_grid_table():
    table = study.token_grids([224, 28, 64], 14)
    assert list(table["resolution"]) == [28, 64, 224]
    assert list(table["grid"]) == ["14×14", "16×16", "14×14"]
    assert list(table["patch tokens"]) == [196, 256, 196]


def test_every_size_holds_the_same_patients_in_each_split():
    data = study.prepare_resolutions("synthetic", None, [32, 16], seed=0, max_images=60,
                                     progress=False, n_images=80, n_patients=40)
    assert sorted(data) == [16, 32]
    for split in ("train", "val", "test"):
        a, b = getattr(data[16], split), getattr(data[32], split)
        assert list(a.records["image_id"]) == list(b.records["image_id"])
        assert a[0]["image"].shape == (1, 16, 16) and b[0]["image"].shape == (1, 32, 32)


XRV_DATA = Path(importlib.util.find_spec("torchxrayvision").submodule_search_locations[0]) / "data"


def _grouped(class_names):
    groups = {}
    for name in class_names:
        groups.setdefault(study.class_group(name), set()).add(name)
    return groups


def test_class_groups_on_the_nih_sample_classes(nih_sample_root):
    from cxrstudy.data.nih import NIHDataset

    groups = _grouped(NIHDataset(root=nih_sample_root, image_size=32, labels_only=True).classes)
    assert groups["small lesion"] == {"Nodule", "Mass"}
    assert groups["large finding"] == {"Cardiomegaly", "Effusion"}
    assert "Hernia" in groups["other"] and len(groups["other"]) == 10


def test_class_groups_on_chexpert_csv_columns():
    with gzip.open(XRV_DATA / "chexpert_train.csv.gz", "rt") as handle:
        columns = handle.readline().strip().split(",")[5:]        # the 14 observations
    groups = _grouped(columns)
    assert groups["small lesion"] == {"Lung Lesion"}
    assert groups["large finding"] == {"Cardiomegaly", "Pleural Effusion"}


def test_class_groups_on_vindr_class_names():
    import pandas as pd

    # every class name the packaged VinDr annotations (torchxrayvision's copy) use
    names = set(pd.read_csv(XRV_DATA / "vinbigdata-train.csv.gz", usecols=["class_name"])
                ["class_name"]) - {"No finding"}
    assert len(names) == 14
    groups = _grouped(names)
    assert groups["small lesion"] == {"Nodule/Mass"}
    assert groups["large finding"] == {"Cardiomegaly", "Pleural effusion"}
    table = study.class_groups(sorted(names)).set_index("group")
    assert table.loc["small lesion", "classes"] == "Nodule/Mass"
    assert list(table["count"]) == [1, 2, 11]


def _run(aucs, teacher_input="high_res"):
    per_class = pd.DataFrame({"class": ["Nodule", "Cardiomegaly", "Hernia"], "auc": aucs})
    overall = {"macro_auc": float(np.mean(aucs)), "macro_auc_low": 0.1, "macro_auc_high": 0.9,
               "micro_auc": 0.6, "micro_auc_low": 0.5, "micro_auc_high": 0.7}
    return SimpleNamespace(per_class=per_class, overall=overall, n_params=1e6, train_seconds=2.0,
                           extra={"teacher_input": teacher_input, "global_label": "no_finding"},
                           tag="run", history=pd.DataFrame({"epoch": [1, 2]}))


def test_deltas_against_the_student_alone_by_hand():
    runs = {("alone", 28): _run([0.60, 0.70, 0.50], None),
            ("mlcak", 28): _run([0.64, 0.69, 0.50]),
            ("logit_kd", 28): _run([0.58, 0.75, 0.52], "upsampled_lr"),
            ("mlcak", 56): _run([0.9, 0.9, 0.9])}
    deltas = study.per_class_deltas(runs)
    # no "alone" run at 56 px: nothing to subtract, so that size is left out
    assert set(deltas["resolution"]) == {28}
    mlcak = deltas[deltas["arm"] == "mlcak"].set_index("class")["Δ AUC"]
    assert mlcak["Nodule"] == pytest.approx(0.04) and mlcak["Cardiomegaly"] == pytest.approx(-0.01)
    groups = study.group_deltas(deltas).set_index("arm")
    assert groups.loc["logit_kd", "large finding"] == pytest.approx(0.05)
    assert groups.loc["logit_kd", "small lesion"] == pytest.approx(-0.02)
    table = study.resolution_table(runs)
    assert list(zip(table["arm"], table["resolution"])) == [
        ("alone", 28), ("logit_kd", 28), ("mlcak", 28), ("mlcak", 56)]
    assert table.loc[0, "macro AUC"] == pytest.approx(0.6)
    assert list(table["teacher input"]) == [study.NO_TEACHER, "upsampled_lr", "high_res",
                                            "high_res"]


def test_student_arms_are_checked():
    with pytest.raises(ValueError, match="choose from alone, logit_kd, mlcak"):
        study.train_student("kd", data=None, out=None, teacher=None)
    with pytest.raises(ValueError, match="teacher"):
        study.train_student("mlcak", data=SimpleNamespace(image_size=28), out=None, teacher=None)
    teacher = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="needs teacher_data"):
        study.train_student("logit_kd", data=SimpleNamespace(image_size=28), out=None,
                            teacher=teacher)
    with pytest.raises(ValueError, match="teacher_input must be one of high_res, upsampled_lr"):
        study.train_student("mlcak", data=SimpleNamespace(image_size=28), out=None,
                            teacher=teacher, teacher_input="original")


def test_arms_record_the_teacher_input_and_global_label(tmp_path):
    from cxrstudy.outputs import Outputs

    data = study.prepare_resolutions("synthetic", None, [16, 32], seed=0, max_images=40,
                                     progress=False, n_images=40, n_patients=20)
    out = Outputs(tmp_path / "04")
    common = dict(schedule=Schedule(epochs=1, batch_size=16), model="deit_tiny_mt", grid=4,
                  n_boot=5, progress=False, model_kwargs=dict(embed_dim=32, depth=2, num_heads=2))
    teacher = study.train_teacher(data[32], out, **common)
    runs = {("teacher", 32): teacher}
    for arm, teacher_input in (("alone", "high_res"), ("logit_kd", "upsampled_lr"),
                               ("mlcak", "high_res")):
        runs[(arm, 16)] = study.train_student(arm, data[16], out, teacher=teacher.model,
                                              teacher_data=data[32], teacher_input=teacher_input,
                                              **common)
    metrics = study.arm_metrics(runs)
    assert {k: m["teacher_input"] for k, m in metrics.items()} == {
        "teacher_32": None, "alone_16": None, "logit_kd_16": "upsampled_lr",
        "mlcak_16": "high_res"}
    assert {m["global_label"] for m in metrics.values()} == {"any_finding"}  # synthetic
    assert set(study.resolution_table(runs)["teacher input"]) == {
        study.NO_TEACHER, "upsampled_lr", "high_res"}


def test_cls_attention_maps_cover_the_grid_in_unit_range():
    torch.manual_seed(0)
    model = create_model("deit_tiny_mt", 3, image_size=28, patch_size=4, depth=2)
    maps = cls_attention(model, torch.rand(3, 1, 28, 28))
    assert maps.shape == (3, 7, 7)
    assert np.allclose(maps.reshape(3, -1).min(axis=1), 0.0)
    assert np.allclose(maps.reshape(3, -1).max(axis=1), 1.0)


def test_minmax_per_image_scales_each_map_on_its_own():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    scaled = minmax_per_image(maps)
    assert torch.allclose(scaled[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(scaled[1], torch.zeros(2, 2))  # a flat map has no peak: all 0


def test_attention_figure_shows_the_teacher_and_one_student_on_the_same_test_images():
    data = study.prepare_resolutions("synthetic", None, [16, 32], seed=0, max_images=40,
                                     progress=False, n_images=40, n_patients=20)
    vit = dict(embed_dim=32, depth=2, num_heads=2)

    def run(size):  # a 4×4 token grid at either size
        classes = len(data[size].classes)
        return SimpleNamespace(model=create_model("deit_tiny_mt", classes, image_size=size,
                                                  patch_size=size // 4, **vit))

    runs = {("teacher", 32): run(32), ("alone", 16): run(16), ("mlcak", 16): run(16)}
    images, maps, ids = study.attention_figure(runs, data, [0, 2], 32, [16], ["alone", "mlcak"])
    assert list(maps) == ["teacher 32 px", "mlcak 16 px"]  # MLCAK shown when it ran
    assert all(m.shape == (2, 4, 4) and m.min() >= 0 and m.max() <= 1 for m in maps.values())
    first = data[32].test[0]["image"][0].numpy()
    assert images[0].dtype == np.uint8 and np.array_equal(images[0], (first * 255).astype(np.uint8))
    assert ids == [data[32].test.meta(i)["image_id"] for i in (0, 2)]
    assert ids == [data[16].test.meta(i)["image_id"] for i in (0, 2)]  # the same images
    _, alone_only, _ = study.attention_figure(runs, data, [0], 32, [16], ["alone"])
    assert list(alone_only) == ["teacher 32 px", "alone 16 px"]


def test_resolution_strip_gives_one_test_image_at_every_size():
    data = study.prepare_resolutions("synthetic", None, [16, 32], seed=0, max_images=40,
                                     progress=False, n_images=40, n_patients=20)
    images, boxes, image_id = study.resolution_strip(data, [16, 32], 3)
    assert {size: image.shape for size, image in images.items()} == {16: (16, 16), 32: (32, 32)}
    pixels = data[32].test[3]["image"][0].numpy()
    assert images[32].dtype == np.uint8 and np.array_equal(images[32], (pixels * 255).astype(np.uint8))
    assert boxes == {size: data[size].test.meta(3)["boxes"] for size in (16, 32)}
    assert image_id == data[16].test.meta(3)["image_id"] == data[32].test.meta(3)["image_id"]
