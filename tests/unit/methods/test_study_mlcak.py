"""The low-resolution study glue: token grids per size, one split at every size, paired
ΔAUC with patient-bootstrap CIs, the teacher's initialisation, maps."""
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
from cxrstudy.methods.mlcak import study
from cxrstudy.train import Schedule, load_checkpoint
from cxrstudy.train.checkpoint import checkpoint_file


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


def test_resolution_table_by_hand():
    runs = {("alone", 28): _run([0.60, 0.70, 0.50], None),
            ("mlcak", 28): _run([0.64, 0.69, 0.50]),
            ("logit_kd", 28): _run([0.58, 0.75, 0.52], "upsampled_lr"),
            ("mlcak", 56): _run([0.9, 0.9, 0.9])}
    table = study.resolution_table(runs)
    assert list(zip(table["arm"], table["resolution"])) == [
        ("alone", 28), ("logit_kd", 28), ("mlcak", 28), ("mlcak", 56)]
    assert table.loc[0, "macro AUC"] == pytest.approx(0.6)
    assert list(table["teacher input"]) == [study.NO_TEACHER, "upsampled_lr", "high_res",
                                            "high_res"]


#: Notebook 04's arms, as its distillation table gives them.
DISTILLATION = {"alone": dict(alpha=0, beta=0, gamma=0),
                "logit_kd": dict(alpha=1.0, beta=1.0, gamma=0),
                "mlcak": dict(alpha=1.0, beta=1.0, gamma=1000.0)}


def test_contrast_pairs_compare_with_alone_and_with_the_same_network_at_the_teachers_size():
    runs = dict.fromkeys([("teacher", 56), ("alone", 28), ("logit_kd", 28), ("mlcak", 28),
                          ("mlcak", 42), ("efficientvit_m0", 28), ("efficientvit_m0", 56),
                          ("efficientvit_m5", 28)])
    assert study.contrast_pairs(runs, 56, DISTILLATION) == [
        ("distillation", ("logit_kd", 28), ("alone", 28)),
        ("distillation", ("mlcak", 28), ("alone", 28)),  # no alone at 42 px: no such pair
        ("resolution", ("alone", 28), ("teacher", 56)),  # the ViT arms: the teacher
        ("resolution", ("logit_kd", 28), ("teacher", 56)),
        ("resolution", ("mlcak", 28), ("teacher", 56)),
        ("resolution", ("mlcak", 42), ("teacher", 56)),
        ("resolution", ("efficientvit_m0", 28), ("efficientvit_m0", 56)),  # its own 56 px run
    ]  # efficientvit_m5 never ran at 56 px: left out


CLASSES = ["Nodule", "Mass", "Cardiomegaly", "Hernia"]


def _scored_run(probs, targets, patients):
    """A run as paired_deltas reads it: test predictions, labels, masks and patient ids."""
    from cxrstudy.metrics import per_class_auc

    return SimpleNamespace(per_class=pd.DataFrame({"class": CLASSES,
                                                   "auc": per_class_auc(targets, probs)}),
                           probs=probs, targets=targets, masks=np.ones_like(targets),
                           patient_ids=patients)


def _test_split():
    """40 patients, one image each: 10 nodules, 2 masses, 8 cardiomegalies, no hernia."""
    rng = np.random.default_rng(0)
    targets = np.zeros((40, 4))
    targets[:10, 0] = 1
    targets[[10, 11], 1] = 1
    targets[20:28, 2] = 1
    scores = rng.random((40, 4)) + 0.3 * targets
    return targets, scores, np.array([f"p{i}" for i in range(40)])


def test_paired_deltas_of_identical_models_are_zero_with_a_zero_interval():
    targets, scores, patients = _test_split()
    runs = {("alone", 28): _scored_run(scores, targets, patients),
            ("mlcak", 28): _scored_run(scores.copy(), targets, patients)}
    per_class, groups = study.paired_deltas(runs, study.contrast_pairs(runs, 56, DISTILLATION), n_boot=50)
    assert set(per_class["comparison"]) == {"distillation"}
    assert set(per_class["reference"]) == {"alone 28 px"}
    defined = per_class.dropna(subset=["Δ AUC"])
    assert list(defined["class"]) == ["Nodule", "Mass", "Cardiomegaly"]  # Hernia: no positive
    assert (defined[["Δ AUC", "Δ low", "Δ high"]] == 0.0).all().all()
    counted = groups.dropna(subset=["Δ AUC"])
    assert list(counted["group"]) == ["small lesion", "large finding"]
    assert (counted[["Δ AUC", "Δ low", "Δ high"]] == 0.0).all().all()


def test_paired_deltas_leave_classes_with_few_test_positives_out_of_the_group_means():
    targets, scores, patients = _test_split()
    student = scores + np.random.default_rng(1).normal(0.0, 0.3, scores.shape)
    runs = {("teacher", 56): _scored_run(scores, targets, patients),
            ("alone", 28): _scored_run(student, targets, patients)}
    per_class, groups = study.paired_deltas(runs, study.contrast_pairs(runs, 56, DISTILLATION),
                                            min_test_positives=5, n_boot=200, seed=3)
    rows = per_class.set_index("class")
    assert rows["test positives"].to_dict() == {"Nodule": 10, "Mass": 2, "Cardiomegaly": 8,
                                                "Hernia": 0}
    np.testing.assert_allclose(rows["Δ AUC"][:3], (rows["AUC"] - rows["reference AUC"])[:3])
    assert rows["in group mean"].to_dict() == {"Nodule": True, "Mass": False,
                                               "Cardiomegaly": True, "Hernia": False}
    assert study.left_out_classes(per_class) == "Mass (2), Hernia (0)"
    by_group = groups.set_index("group")
    small = by_group.loc["small lesion"]
    # Mass (2 positives) is left out: the small-lesion mean is Nodule's Δ alone, and its
    # interval comes from the same resamples as Nodule's own
    assert small["classes (test positives)"] == "Nodule (10)"
    assert small["left out (test positives)"] == "Mass (2)"
    for column in ("Δ AUC", "Δ low", "Δ high"):
        assert small[column] == pytest.approx(rows.loc["Nodule", column], abs=1e-12)
    assert small["resamples kept"] == 200
    assert by_group.loc["large finding", "Δ AUC"] == pytest.approx(rows.loc["Cardiomegaly",
                                                                            "Δ AUC"])
    other = by_group.loc["other"]
    assert np.isnan(other["Δ AUC"]) and other["classes (test positives)"] == "—"
    assert other["left out (test positives)"] == "Hernia (0)"
    # with a threshold of 2, Mass joins the small-lesion mean
    _, lower = study.paired_deltas(runs, study.contrast_pairs(runs, 56, DISTILLATION), min_test_positives=2,
                                   n_boot=20)
    small = lower.set_index("group").loc["small lesion"]
    assert small["classes (test positives)"] == "Nodule (10), Mass (2)"
    assert small["Δ AUC"] == pytest.approx(rows.loc[["Nodule", "Mass"], "Δ AUC"].mean())


def test_paired_deltas_refuse_runs_scored_on_other_test_rows():
    targets, scores, patients = _test_split()
    runs = {("alone", 28): _scored_run(scores, targets, patients),
            ("mlcak", 28): _scored_run(scores[::-1].copy(), targets[::-1].copy(),
                                       patients[::-1].copy())}
    with pytest.raises(ValueError, match="mlcak 28 px and alone 28 px were scored on different"):
        study.paired_deltas(runs, study.contrast_pairs(runs, 56, DISTILLATION), n_boot=5)
    with pytest.raises(ValueError, match="min_test_positives"):
        study.paired_deltas(runs, [], min_test_positives=-1)


def test_teacher_pretrained_reaches_create_model(monkeypatch):
    import cxrstudy.models

    data = study.prepare_resolutions("synthetic", None, [32], seed=0, max_images=40,
                                     progress=False, n_images=40, n_patients=20)[32]
    asked = []

    class Built(Exception):
        pass

    def fake_create_model(name, num_classes, **kwargs):
        asked.append((name, kwargs["pretrained"], kwargs["patch_size"]))
        raise Built  # what was asked for is all this test needs: no training

    monkeypatch.setattr(cxrstudy.models, "create_model", fake_create_model)
    for pretrained in (True, False, "/weights/vit.pt"):
        with pytest.raises(Built):
            study.train_teacher(data, out=None, model="deit_tiny_mt", grid=4,
                                pretrained=pretrained)
    assert asked == [("deit_tiny_mt", True, 8), ("deit_tiny_mt", False, 8),
                     ("deit_tiny_mt", "/weights/vit.pt", 8)]


def test_contrast_pairs_read_the_arms_and_the_reference_from_the_distillation_table():
    runs = dict.fromkeys([("teacher", 56), ("plain", 28), ("attention_only", 28),
                          ("efficientvit_m0", 28)])
    design = {"plain": dict(alpha=0, beta=0, gamma=0),
              "attention_only": dict(alpha=0, beta=0, gamma=10.0)}
    assert study.contrast_pairs(runs, 56, design) == [
        ("distillation", ("attention_only", 28), ("plain", 28)),
        ("resolution", ("plain", 28), ("teacher", 56)),
        ("resolution", ("attention_only", 28), ("teacher", 56)),
    ]  # the hybrid is no arm of the table and has no 56 px run: left out
    with pytest.raises(ValueError, match="plain, also_plain all train without the teacher"):
        study.contrast_pairs(runs, 56, dict(design, also_plain=dict(alpha=0, beta=0, gamma=0)))


def test_arm_weights_come_from_the_table_and_are_checked():
    assert study.arm_weights(DISTILLATION, "logit_kd") == {"alpha": 1.0, "beta": 1.0,
                                                           "gamma": 0.0}
    assert not study.distils(study.arm_weights(DISTILLATION, "alone"))
    assert study.distils({"alpha": 0, "beta": 0, "gamma": 0.5})
    with pytest.raises(ValueError, match="unknown arm 'kd'; the distillation table has alone, "
                                         "logit_kd, mlcak"):
        study.arm_weights(DISTILLATION, "kd")
    with pytest.raises(ValueError, match="arm 'x' must give exactly alpha, beta, gamma, got alpha"):
        study.arm_weights({"x": dict(alpha=1.0)}, "x")
    with pytest.raises(ValueError, match="gamma must be a non-negative number"):
        study.loss_weights(dict(alpha=1, beta=1, gamma=-1))


def test_student_setup_gives_each_arm_its_trainer_settings():
    teacher, high = torch.nn.Linear(1, 1), SimpleNamespace(train="the 56 px training split")
    setup = study.StudentSetup(DISTILLATION, teacher=teacher, teacher_data=high,
                               attention_levels=2, align="exact")
    assert setup.trainer_kwargs("alone") == {"teacher": None}  # the teacher never runs
    assert setup.trainer_kwargs("mlcak") == {
        "alpha": 1.0, "beta": 1.0, "gamma": 1000.0, "teacher": teacher,
        "teacher_input": "high_res", "teacher_data": "the 56 px training split",
        "attention_levels": 2, "align": "exact"}
    upsampled = study.StudentSetup(DISTILLATION, teacher=teacher, teacher_input="upsampled_lr")
    assert upsampled.trainer_kwargs("logit_kd")["teacher_data"] is None
    assert upsampled.trainer_kwargs("logit_kd")["gamma"] == 0.0


def test_student_arms_are_checked():
    with pytest.raises(ValueError, match="unknown arm 'kd'; the distillation table has alone, "
                                         "logit_kd, mlcak"):
        study.train_student("kd", None, None, None, study.StudentSetup(DISTILLATION))
    with pytest.raises(ValueError, match="teacher"):
        study.train_student("mlcak", SimpleNamespace(image_size=28), None, None,
                            study.StudentSetup(DISTILLATION))
    teacher = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="needs teacher_data"):
        study.train_student("logit_kd", SimpleNamespace(image_size=28), None, None,
                            study.StudentSetup(DISTILLATION, teacher=teacher))
    with pytest.raises(ValueError, match="teacher_input must be one of high_res, upsampled_lr"):
        study.train_student("mlcak", SimpleNamespace(image_size=28), None, None,
                            study.StudentSetup(DISTILLATION, teacher=teacher,
                                               teacher_input="original"))


def test_arms_record_the_teacher_input_and_global_label(tmp_path):
    from cxrstudy.outputs import Outputs

    data = study.prepare_resolutions("synthetic", None, [16, 32], seed=0, max_images=40,
                                     progress=False, n_images=40, n_patients=20)
    out = Outputs(tmp_path / "04")
    schedule = Schedule(epochs=1, batch_size=16)
    vit = dict(embed_dim=32, depth=2, num_heads=2)
    teacher = study.train_teacher(data[32], out, schedule, model="deit_tiny_mt", grid=4,
                                  model_kwargs=vit, n_boot=5, progress=False)
    runs = {("teacher", 32): teacher}
    for arm, teacher_input in (("alone", "high_res"), ("logit_kd", "upsampled_lr"),
                               ("mlcak", "high_res")):
        setup = study.StudentSetup(DISTILLATION, teacher=teacher.model, teacher_data=data[32],
                                   teacher_input=teacher_input, model="deit_tiny_mt", grid=4,
                                   model_kwargs=vit, n_boot=5)
        runs[(arm, 16)] = study.train_student(arm, data[16], out, schedule, setup,
                                              progress=False)
    metrics = study.arm_metrics(runs)
    assert {k: m["teacher_input"] for k, m in metrics.items()} == {
        "teacher_32": None, "alone_16": None, "logit_kd_16": "upsampled_lr",
        "mlcak_16": "high_res"}
    assert {m["global_label"] for m in metrics.values()} == {"any_finding"}  # synthetic
    assert set(study.resolution_table(runs)["teacher input"]) == {
        study.NO_TEACHER, "upsampled_lr", "high_res"}
    # each arm's weights reached its trainer (saved with the run), the alone arm's as 0
    saved = {arm: load_checkpoint(checkpoint_file(out.checkpoint_dir(f"{arm}_16")))
             ["train_config"]["mlcak"] for arm in ("alone", "logit_kd", "mlcak")}
    assert {arm: (s["alpha"], s["beta"], s["gamma"]) for arm, s in saved.items()} == {
        "alone": (0.0, 0.0, 0.0), "logit_kd": (1.0, 1.0, 0.0), "mlcak": (1.0, 1.0, 1000.0)}


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


def test_loss_on_one_batch_matches_mlcak_loss_and_an_independent_recomputation():
    import torch.nn.functional as F

    from cxrstudy.methods.mlcak.training import dataset_global_labels

    data = study.prepare_resolutions("synthetic", None, [28, 64], seed=0, max_images=40,
                                     progress=False, n_images=40, n_patients=20)
    vit = dict(embed_dim=32, depth=2, num_heads=2)
    weights = dict(alpha=0.5, beta=2.0, gamma=100.0)
    state = torch.random.get_rng_state()
    result = study.loss_on_one_batch(data[28], data[64], model="deit_tiny_mt", grid=14,
                                     weights=weights, batch_size=6, seed=3, model_kwargs=vit)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is kept
    terms = result.terms.set_index("term")
    assert list(terms.index) == ["local BCE", "global BCE", "local logit KD", "global logit KD",
                                 "attention", "total"]
    assert np.allclose(terms["by hand"], terms["mlcak_loss"], rtol=0, atol=1e-6)
    assert list(terms["weight"].iloc[:-1]) == [1.0, 1.0, 0.5, 2.0, 100.0]
    parts = terms.iloc[:-1]
    assert terms.loc["total", "mlcak_loss"] == pytest.approx(
        (parts["weight"] * parts["mlcak_loss"]).sum(), abs=1e-6)

    # the same two networks, rebuilt here from the same seed, give the same logit terms
    torch.manual_seed(3)
    teacher = create_model("deit_tiny_mt", len(data[64].classes), in_chans=1, image_size=64,
                           patch_size=4, **vit).eval()
    student = create_model("deit_tiny_mt", len(data[28].classes), in_chans=1, image_size=28,
                           patch_size=2, **vit).eval()
    rows = range(6)
    with torch.no_grad():
        z_t = teacher.forward_tasks(torch.stack([data[64].train[i]["image"] for i in rows]))
        z_s = student.forward_tasks(torch.stack([data[28].train[i]["image"] for i in rows]))
    target = torch.stack([data[28].train[i]["target"] for i in rows]).float()
    assert terms.loc["local logit KD", "by hand"] == pytest.approx(
        float(((z_s.local - z_t.local) ** 2).mean()), rel=1e-5)
    assert terms.loc["global logit KD", "by hand"] == pytest.approx(
        float(((z_s.global_ - z_t.global_) ** 2).mean()), rel=1e-5)
    assert terms.loc["local BCE", "by hand"] == pytest.approx(  # synthetic labels: all known
        float(F.binary_cross_entropy_with_logits(z_s.local, target)), rel=1e-5)
    labels = dataset_global_labels(data[28].train)
    assert terms.loc["global BCE", "by hand"] == pytest.approx(float(
        F.binary_cross_entropy_with_logits(z_s.global_, torch.as_tensor(labels.target[:6]),
                                           weight=torch.as_tensor(labels.mask[:6]),
                                           reduction="sum") / labels.mask[:6].sum()), rel=1e-5)

    # 64 px: patch 4, a 16×16 grid, resized to the 28 px student's 14×14 (patch 2); + CLS
    levels = result.levels
    assert list(zip(levels["student block"], levels["teacher block"])) == [(0, 0), (1, 1)]
    assert set(levels["teacher map"]) == {"6×257×257"} and set(levels["teacher grid"]) == {"16×16"}
    assert set(levels["aligned teacher map"]) == {"6×197×197"}
    assert set(levels["student map"]) == {"6×197×197"} and set(levels["student grid"]) == {"14×14"}
    assert levels["MSE(A_s, A_t)"].sum() == pytest.approx(terms.loc["attention", "mlcak_loss"],
                                                          abs=1e-9)
    # the figure: the first two images at 64 px, each network's CLS attention on its own grid
    assert [m.shape for m in result.maps.values()] == [(2, 16, 16), (2, 14, 14)]
    assert list(result.maps) == ["teacher 64 px (16×16)", "student 28 px (14×14)"]
    assert all(m.min() == 0 and m.max() == pytest.approx(1) for m in result.maps.values())
    assert result.images[0].shape == (64, 64) and result.images[0].dtype == np.uint8
    assert result.image_ids == list(data[28].train.records["image_id"][:2])


def test_loss_on_one_batch_leaves_out_the_terms_whose_weight_is_zero():
    data = study.prepare_resolutions("synthetic", None, [16, 32], seed=0, max_images=40,
                                     progress=False, n_images=40, n_patients=20)
    result = study.loss_on_one_batch(data[16], data[32], model="deit_tiny_mt", grid=4,
                                     weights=dict(alpha=1.0, beta=0, gamma=0), batch_size=4,
                                     teacher_input="upsampled_lr",
                                     model_kwargs=dict(embed_dim=32, depth=2, num_heads=2))
    terms = result.terms.set_index("term")
    assert terms.loc["global logit KD", "mlcak_loss"] == 0.0 == terms.loc["attention", "by hand"]
    assert terms.loc["local logit KD", "mlcak_loss"] > 0
    assert terms.loc["total", "by hand"] == pytest.approx(
        terms.loc[["local BCE", "global BCE", "local logit KD"], "by hand"].sum(), abs=1e-9)
    with pytest.raises(ValueError, match="teacher_input must be one of"):
        study.loss_on_one_batch(data[16], data[32], model="deit_tiny_mt", grid=4,
                                weights=dict(alpha=1.0, beta=0, gamma=0), teacher_input="x")
