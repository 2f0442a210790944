"""The MXA study glue: arms map to the right models, counts and shapes match the block; the
authors' baseline (a double sigmoid) has the loss floor computed by hand."""
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cxrstudy.models import DistilledClassifier, count_parameters, create_model
from cxrstudy.methods.mxa.model import block_shapes, box_statistics, mxa_blocks, roi_boxes
from cxrstudy.methods.mxa.sigmoid_output import (NEGATIVE_FLOOR, POSITIVE_FLOOR, SigmoidOutput,
                                            double_sigmoid_loss_floor)
from cxrstudy.methods.mxa import study


@pytest.mark.parametrize("arm, name, kwargs", [
    ("baseline", "efficientvit_m0", {}),
    ("authors_baseline", "sigmoid_output", {"backbone": "efficientvit_m0"}),
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


def test_parameter_counts_are_our_exact_one_channel_counts_beside_the_papers():
    table = study.parameter_counts(["efficientvit_m5"]).iloc[0]
    assert round(table["without MXA (M)"] * 1e6) == 12093730
    assert round(table["with MXA (M)"] * 1e6) == 16149010
    # the authors' logged counts (no count of the paper's text could be cited); what rebuilds
    # each of their runs exactly: authors_parameter_counts
    assert (table["authors' log without (M)"], table["authors' log with (M)"],
            table["authors' log with + KD (M)"]) == (12.094162, 16.14901, 16.155168)
    # faithful crop: the ROI heads (3.95 M) are frozen, the rest is trained
    assert table["trained with faithful crop (M)"] == pytest.approx(12.203954, abs=1e-6)


def test_block_shapes_follow_the_stages():
    shapes = block_shapes("efficientvit_m0", image_size=64)
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
    boxes = roi_boxes(model, images)
    assert len(boxes) == 6 and all(b.shape == (5, 4) for b in boxes.values())
    assert all(((b >= 0) & (b <= 1)).all() for b in boxes.values())
    batches = [{"image": images[:3]}, {"image": images[3:]}]
    stats = box_statistics(model, batches)
    assert list(stats["images"]) == [5] * 6
    # default initialisation: boxes near (½, ½, ½, ½) are empty → the whole map is used
    assert (stats["whole-map fallback"] == 1.0).all()
    assert (stats["mean cropped area"] == 1.0).all()
    assert len(box_statistics(model, batches, max_batches=1)) == 6


def test_kd_arm_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        study.train_arm("kd", data=None, out=None, backbone="efficientvit_m0")


def test_a_sibling_run_is_reused_only_if_it_never_saw_our_test_images(tmp_path):
    import pandas as pd
    from types import SimpleNamespace

    from cxrstudy.outputs import Outputs
    from cxrstudy.teachers import sibling_run

    out = Outputs(tmp_path / "03_knowledge_distillation")
    data = SimpleNamespace(test=SimpleNamespace(records=pd.DataFrame({"image_id": ["c", "d"]})))
    with pytest.raises(ValueError, match="run:<notebook>/<model tag>"):
        sibling_run("run:01_baseline", out, data)
    with pytest.raises(FileNotFoundError, match="run 01_baseline with this profile first"):
        sibling_run("run:01_baseline/densenet121", out, data)
    folder = tmp_path / "01_baseline/checkpoints/densenet121"
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="splits.csv"):
        sibling_run("run:01_baseline/densenet121", out, data)
    splits = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": ["1", "2", "3", "4"],
                           "split": ["train", "val", "test", "test"]})
    splits.to_csv(tmp_path / "01_baseline/splits.csv", index=False)
    assert sibling_run("run:01_baseline/densenet121", out, data) == folder
    splits.assign(split=["train", "val", "train", "test"]).to_csv(
        tmp_path / "01_baseline/splits.csv", index=False)
    with pytest.raises(ValueError, match="trained on 1 of our test images"):
        sibling_run("run:01_baseline/densenet121", out, data)


# --- the authors' baseline: a forward ending in a sigmoid, trained with BCE-with-logits ----------

def test_the_double_sigmoid_floor_by_hand():
    # positive: -log sigma(1) = log(1 + e^-1); negative: -log(1 - sigma(0)) = log 2
    assert POSITIVE_FLOOR == pytest.approx(0.313262, abs=1e-6)
    assert NEGATIVE_FLOOR == pytest.approx(0.693147, abs=1e-6)
    # BCE-with-logits reaches them at the ends of the sigmoid's range, s = 1 and s = 0
    bce = F.binary_cross_entropy_with_logits
    assert bce(torch.tensor(1.0), torch.tensor(1.0)).item() == pytest.approx(POSITIVE_FLOOR)
    assert bce(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(NEGATIVE_FLOOR)
    # and nothing in (0, 1) goes lower
    s = torch.linspace(0, 1, 1001)
    assert bce(s, torch.ones_like(s), reduction="none").min().item() >= POSITIVE_FLOOR - 1e-7
    assert bce(s, torch.zeros_like(s), reduction="none").min().item() >= NEGATIVE_FLOOR - 1e-7
    # one positive and three negatives: (0.313262 + 3 × 0.693147) / 4 = 0.598176
    assert double_sigmoid_loss_floor([[1, 0, 0, 0]]) == pytest.approx(0.598176, abs=1e-6)
    # unknown entries do not count: only the positive is known
    assert double_sigmoid_loss_floor([[1, 0]], mask=[[1, 0]]) == pytest.approx(POSITIVE_FLOOR)
    # a soft label inside (sigma(0), sigma(1)) can be met exactly: its floor is its entropy
    assert double_sigmoid_loss_floor([[0.6]]) == pytest.approx(
        -0.6 * math.log(0.6) - 0.4 * math.log(0.4))


def _separable_problem(n=256, features=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, :classes] > 0.5).float()  # class k: feature k above 0.5 (~31 % positives)
    return x, y


@pytest.mark.parametrize("wrapped", [True, False])
def test_training_cannot_go_below_the_floor_with_the_double_sigmoid(wrapped):
    """The same linear model, data and optimiser: the correct model drives the loss towards 0,
    the authors' sigmoid output never gets below the floor however long it trains."""
    torch.manual_seed(0)
    x, y = _separable_problem()
    model = torch.nn.Linear(x.shape[1], y.shape[1])
    model = SigmoidOutput(model) if wrapped else model
    optimiser = torch.optim.Adam(model.parameters(), lr=0.1)
    floor = double_sigmoid_loss_floor(y.numpy())
    losses = []
    for _ in range(500):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    if wrapped:
        assert min(losses) >= floor - 1e-6
        assert losses[-1] - floor < 0.03  # it does approach the floor: the data are separable
        assert floor > 0.55
    else:
        assert losses[-1] < 0.1 < floor - 0.4


def test_the_sigmoid_output_wrapper_rebuilds_and_leaves_head_tuples_alone():
    torch.manual_seed(0)
    model = create_model("sigmoid_output", 3, image_size=64, backbone="efficientvit_m0").eval()
    assert isinstance(model, SigmoidOutput)
    assert model.cxr_config["name"] == "sigmoid_output"
    assert model.cxr_config["kwargs"] == {"backbone": "efficientvit_m0"}
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits = model.backbone(images)
        assert torch.allclose(model(images), torch.sigmoid(logits))
    assert all(k.startswith("backbone.") for k in model.state_dict())
    # a training-mode tuple of heads passes unchanged, as in the authors' forward
    distilled = SigmoidOutput(create_model("efficientvit_m0", 3, image_size=64, distilled=True))
    out = distilled.train()(images)
    assert isinstance(out, tuple) and out.cls.shape == (2, 3)
    assert torch.allclose(out.cls, distilled.backbone(images).cls)  # the heads' raw logits
    with pytest.raises(ValueError, match="already ends in a sigmoid"):
        SigmoidOutput(model)


def test_a_sigmoid_output_arm_with_kd_is_refused(monkeypatch):
    monkeypatch.setitem(study.ARMS, "authors_kd", study.Arm(mxa=False, kd=True, output="sigmoid"))
    with pytest.raises(ValueError, match="non-distilled"):
        study.arm_model("authors_kd", "efficientvit_m0")
    monkeypatch.setitem(study.ARMS, "authors_mxa", study.Arm(mxa=True, kd=False, output="sigmoid"))
    name, kwargs = study.arm_model("authors_mxa", "efficientvit_m0")
    assert (name, kwargs["backbone"], kwargs["crop"]) == ("sigmoid_output", "efficientvit_m0_mxa",
                                                          "faithful")
    assert study.arms_table(["baseline", "authors_baseline"])["output"].tolist() == ["logits",
                                                                                       "sigmoid"]


def test_authors_baseline_check_reports_the_floor_and_the_collapse():
    classes = ["a", "b"]
    data = SimpleNamespace(classes=classes, train=SimpleNamespace(
        targets=np.array([[1, 0], [0, 0], [0, 1], [0, 0]], dtype=np.float32),
        masks=np.ones((4, 2), dtype=np.float32)))
    run = SimpleNamespace(history=pd.DataFrame({"train_loss": [0.70, 0.66, 0.62]}),
                          probs=np.array([[0.5, 0.6], [0.5, 0.7], [0.5, 0.6]]),
                          masks=np.ones((3, 2)))
    check = study.authors_baseline_check(run, data)
    # 2 positives, 6 negatives of 8 entries
    assert check["loss_floor"] == pytest.approx((2 * POSITIVE_FLOOR + 6 * NEGATIVE_FLOOR) / 8)
    assert check["train_positive_rate"] == 0.25 and check["all_labels_known"]
    assert (check["min_train_loss"], check["final_train_loss"]) == (0.62, 0.62)
    assert check["collapsed"] == ["a"]


def test_the_paper_number_sits_beside_the_arm_that_reproduces_it():
    assert study.PAPER_MICRO_AUC_BY_ARM == {"authors_baseline": 0.66, "mxa_kd": 0.85}
    assert study.PAPER_GAIN == pytest.approx(0.19)
    arms = ["baseline", "authors_baseline", "mxa_kd", "mxa_kd_mixer", "mxa_kd_differentiable"]
    # the authors' wiring: 0.85 beside mxa_kd, never beside our placement or our crop
    authors = study.settings_by_arm(arms, {"mxa_placement": "block_input"})
    assert study.paper_micro_auc_by_arm("03_knowledge_distillation", authors) == {
        "authors_baseline": 0.66, "mxa_kd": 0.85}
    assert [authors[a]["authors_model"] for a in arms] == [False, True, True, False, False]
    # our placement: the 0.85 has no arm to stand beside
    ours = study.settings_by_arm(arms, {"mxa_placement": "mixer"})
    assert study.paper_micro_auc_by_arm("03_knowledge_distillation", ours) == {
        "authors_baseline": 0.66}


def test_mixer_arms_keep_their_placement_whatever_the_notebook_says():
    name, kwargs = study.arm_model("mxa_kd_mixer", "efficientvit_m0")
    assert (name, kwargs["mxa_placement"], kwargs["distilled"]) == ("efficientvit_m0_mxa", "mixer", True)
    settings = study.arm_settings("mxa_mixer", {"mxa_placement": "block_input", "crop": "differentiable"})
    assert (settings["placement"], settings["crop"]) == ("mixer", "differentiable")
    assert study.arm_settings("mxa", {"mxa_placement": "block_input"})["placement"] == "block_input"
    assert study.arm_settings("baseline", {"mxa_placement": "block_input"})["placement"] is None
    with pytest.raises(ValueError, match="unknown"):
        study.arm_settings("mxa", {"window": 3})


def test_paper_gain_parts_split_the_gain_into_the_bug_and_the_method():
    table = pd.DataFrame({"arm": ["baseline", "authors_baseline", "mxa", "mxa_kd"],
                          "micro AUC": [0.70, 0.50, 0.69, 0.72]})
    parts = study.paper_gain_parts(table)
    assert list(parts["Δ micro AUC (ours)"]) == pytest.approx([0.20, 0.02, 0.22])
    assert parts["paper Δ micro AUC"].iloc[-1] == pytest.approx(0.19)
    assert parts["paper Δ micro AUC"].iloc[:2].isna().all()
    sentence = study.paper_gain_sentence(parts)
    assert "+0.200" in sentence and "+0.020" in sentence and "91%" in sentence
    # without authors_baseline there is nothing to split, and the sentence says so
    alone = study.paper_gain_parts(table[table["arm"] != "authors_baseline"])
    assert list(alone["step"]) == ["MXA + KD over a correct baseline"]
    assert "did not run" in study.paper_gain_sentence(alone)


def test_view_options_pass_views_to_chexpert_only():
    assert study.view_options("chexpert", "all") == {"views": "all"}
    assert study.view_options("chexpert", "frontal") == {"views": "frontal"}
    assert study.view_options("nih-sample", "all") == {} == study.view_options("chestmnist", "frontal")
    with pytest.raises(ValueError, match="views"):
        study.view_options("chexpert", "lateral")


@pytest.mark.parametrize("training", [True, False])
def test_box_statistics_leaves_the_model_in_the_mode_it_found(training):
    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", 3, image_size=64, distilled=True).train(training)
    box_statistics(model, [{"image": torch.rand(2, 1, 64, 64)}])
    assert all(m.training == training for m in model.modules())


def test_the_paper_reference_is_read_on_access_not_on_import(monkeypatch):
    import importlib

    from cxrstudy import reference

    read = []
    for name in ("values_by_prefix", "paper"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name,
                            lambda *a, _f=original, _n=name, **k: read.append(_n) or _f(*a, **k))
    fresh = importlib.reload(study)
    assert read == []  # importing the study reads nothing
    assert fresh.PAPER_GAIN == 0.19 and read[0] == "values_by_prefix"  # on first access
    monkeypatch.undo()
    importlib.reload(study)


def test_the_teacher_sentence_gives_the_macro_ci_and_the_micro_auc():
    from cxrstudy.teachers import teacher_sentence

    result = {"teacher": "own densenet121",
              "overall": {"macro_auc": 0.6543, "macro_auc_low": 0.6012, "macro_auc_high": 0.7111,
                          "micro_auc": 0.7}}
    assert teacher_sentence(result) == ("Teacher own densenet121: macro AUC 0.654 "
                                        "(95% CI 0.601–0.711), micro AUC 0.700")
    result["overall"]["macro_auc_low"] = None  # no CI (e.g. one class only): the value alone
    assert "macro AUC 0.654, micro" in teacher_sentence(result)


# ---- the one-batch cells of 01-03 (the equation meets the code) -----------------------------
def test_model_for_arm_applies_the_notebooks_options_except_a_pinned_placement():
    options = {"crop": "differentiable", "mxa_placement": "block_input"}
    assert study.model_for_arm("mxa", "efficientvit_m0", options) == (
        "efficientvit_m0_mxa", {"mxa_mode": "sum", "crop": "differentiable", "roi_init": "default",
                                "mxa_placement": "block_input"})
    assert study.model_for_arm("mxa_kd_mixer", "efficientvit_m0", options)[1]["mxa_placement"] == "mixer"
    assert study.model_for_arm("kd", "efficientvit_m0", options) == ("efficientvit_m0",
                                                                     {"distilled": True})


def test_initial_arm_model_is_seeded_as_training_starts():
    data = SimpleNamespace(classes=list("ABC"), image_size=64)
    first = study.initial_arm_model("mxa_kd", data, "efficientvit_m0", {"mxa_placement": "block_input"})
    again = study.initial_arm_model("mxa_kd", data, "efficientvit_m0", {"mxa_placement": "block_input"})
    other = study.initial_arm_model("mxa_kd", data, "efficientvit_m0", seed=1)
    assert isinstance(first, DistilledClassifier) and first.head_dist.linear.out_features == 3
    assert first.backbone.mxa_config["placement"] == "block_input"
    weights = first.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in again.state_dict().items())
    assert not all(torch.equal(weights[k], v) for k, v in other.state_dict().items())


class _FixedHeads(torch.nn.Module):
    """A 'student' whose two heads give fixed logits, whatever the images."""

    def __init__(self, cls, dist):
        super().__init__()
        self.register_buffer("cls", torch.tensor(cls))
        self.register_buffer("dist", torch.tensor(dist))

    def forward_heads(self, images):
        from cxrstudy.models.distill import DistilledOutput
        return DistilledOutput(self.cls, self.dist)


class _FixedTeacher(torch.nn.Module):
    def __init__(self, logits, teacher_mask):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("logits", torch.tensor(logits))
        self.register_buffer("teacher_mask", torch.tensor(teacher_mask))

    def forward(self, images):
        return self.logits * self.scale


def _kd_batch():
    batch = {"image": torch.zeros(2, 1, 4, 4), "target": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
             "mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "index": torch.tensor([3, 7])}
    dataset = SimpleNamespace(classes=["A", "B"], meta=lambda i: {"image_id": f"img{i}"})
    return batch, dataset


def test_one_batch_kd_computes_each_term_by_hand_beside_the_library():
    """Two images, two classes; the teacher covers class A only; τ = 2, α = 0.25."""
    student = _FixedHeads([[2.0, -1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]).train()
    teacher = _FixedTeacher([[0.0, 2.0], [-2.0, 0.0]], [1.0, 0.0]).train()
    batch, dataset = _kd_batch()
    terms, soft = study.one_batch_kd(student, teacher, batch, dataset, alpha=0.25, tau=2.0)

    def softplus(v):  # BCE(z, 1) = softplus(−z), BCE(z, 0) = softplus(z)
        return math.log1p(math.exp(v))
    sigmoid = 1 / (1 + math.exp(-1))  # σ(2 / τ)
    # the three known labels: (2, y=1), (−1, y=0), (0, y=0); image 2's class B is unknown
    class_term = (softplus(-2) + softplus(-1) + math.log(2)) / 3
    # class A only: z_dist 1 against q = σ(0) = ½, z_dist 0 against q = σ(−1): log 2
    dist_term = (0.5 * softplus(-1) + 0.5 * softplus(1) + math.log(2)) / 2
    terms = terms.set_index("term")
    assert terms.loc["class term", "by hand"] == pytest.approx(class_term, abs=1e-6)
    assert terms.loc["distillation term", "by hand"] == pytest.approx(dist_term, abs=1e-6)
    assert terms.loc["loss", "by hand"] == pytest.approx(0.75 * class_term + 0.25 * dist_term,
                                                         abs=1e-6)
    assert (terms["by hand"] - terms["library"]).abs().max() < 1e-6
    assert list(terms["weight"].iloc[1:]) == [0.75, 0.25, 1.0]
    assert terms.loc["class term", "entries"] == 3 and terms.loc["distillation term", "entries"] == 2
    assert terms.loc["soft targets", "by hand"] == pytest.approx(
        (0.5 + sigmoid + (1 - sigmoid) + 0.5) / 4)
    assert list(soft.columns) == ["class", "teacher covers (w)", "img3 y", "img3 t", "img3 σ(t/τ)",
                                  "img7 y", "img7 t", "img7 σ(t/τ)"]
    assert list(soft["teacher covers (w)"]) == [1, 0]
    assert soft["img3 σ(t/τ)"].tolist() == pytest.approx([0.5, sigmoid])
    assert soft["img7 y"].iloc[0] == 0 and math.isnan(soft["img7 y"].iloc[1])  # unknown: blank
    assert student.training and teacher.training  # both left in the mode they came in


def test_one_batch_kd_hard_targets_are_the_teachers_decisions():
    student = _FixedHeads([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    teacher = _FixedTeacher([[0.0, 2.0], [-2.0, 0.5]], [1.0, 1.0])
    batch, dataset = _kd_batch()
    terms, soft = study.one_batch_kd(student, teacher, batch, dataset, kd_mode="hard", n_images=1)
    assert soft["img3 1[σ(t) > ½]"].tolist() == [0.0, 1.0]  # σ(0) = ½ is not above ½
    terms = terms.set_index("term")
    assert terms.loc["soft targets", "by hand"] == 0.5  # 1[σ(t) > ½] over (0, 2, −2, 0.5)
    assert terms.loc["loss", "library"] == pytest.approx(math.log(2), abs=1e-6)  # all logits 0
