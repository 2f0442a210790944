"""The low-resolution study glue: token grids per size, one split at every size, deltas, maps."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cxrstudy.models import create_model
from cxrstudy.studies import low_resolution as study


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


def test_class_groups_match_nih_and_chexpert_names():
    assert study.class_group("Nodule") == study.class_group("Mass") == "small lesion"
    assert study.class_group("Cardiomegaly") == "large finding"
    assert study.class_group("Effusion") == study.class_group("Pleural Effusion") == "large finding"
    assert study.class_group("Hernia") == "other"


def _run(aucs):
    per_class = pd.DataFrame({"class": ["Nodule", "Cardiomegaly", "Hernia"], "auc": aucs})
    overall = {"macro_auc": float(np.mean(aucs)), "macro_auc_low": 0.1, "macro_auc_high": 0.9,
               "micro_auc": 0.6, "micro_auc_low": 0.5, "micro_auc_high": 0.7}
    return SimpleNamespace(per_class=per_class, overall=overall, n_params=1e6, train_seconds=2.0)


def test_deltas_against_the_student_alone_by_hand():
    runs = {("alone", 28): _run([0.60, 0.70, 0.50]), ("mlcak", 28): _run([0.64, 0.69, 0.50]),
            ("logit_kd", 28): _run([0.58, 0.75, 0.52]), ("mlcak", 56): _run([0.9, 0.9, 0.9])}
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


def test_student_arms_are_checked():
    with pytest.raises(ValueError, match="choose from alone, logit_kd, mlcak"):
        study.train_student("kd", data=None, out=None, teacher=None)
    with pytest.raises(ValueError, match="teacher"):
        study.train_student("mlcak", data=SimpleNamespace(image_size=28), out=None, teacher=None)


def test_cls_attention_maps_cover_the_grid_in_unit_range():
    torch.manual_seed(0)
    model = create_model("deit_tiny_mt", 3, image_size=28, patch_size=4, depth=2)
    maps = study.cls_attention(model, torch.rand(3, 1, 28, 28))
    assert maps.shape == (3, 7, 7)
    assert np.allclose(maps.reshape(3, -1).min(axis=1), 0.0)
    assert np.allclose(maps.reshape(3, -1).max(axis=1), 1.0)
