"""GLoRI and CAN study glue: prevalence buckets, training fractions, losses per arm, maps."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cxrstudy.experiment import prepare_data
from cxrstudy.explain.evidence import disease_maps
from cxrstudy.models import create_model
from cxrstudy.methods.can import study as can_study
from cxrstudy.methods.glori import study


#: A design as the notebooks write theirs: 05's arm → model settings, 06's arm → class loss and
#: the pairs it compares (arm, against, what differs).
GLORI_ARMS = {"fine_tune": {}, "linear_probe": {"n_blocks": 4}, "linear_probe_last": {"n_blocks": None},
              "glori": {"use_cls": False}, "glori_cls": {"use_cls": True}}
CAN_ARMS = {"single": "bce", "single_second": "bce", "ensemble": "bce", "can_bce": "bce",
            "can_weighted_bce": "weighted_bce", "can_balance": "can_balance"}
CAN_PAIRS = [("single_second", "single", "the network"),
             ("ensemble", "single", "a second network and the two-network loss"),
             ("ensemble", "single_second", "a second network, the other way round"),
             ("can_bce", "ensemble", "CAN's projections, heads and cross-attention"),
             ("can_bce", "single", "everything at once")]


def _data(labels, classes):
    train = SimpleNamespace(labels=np.asarray(labels, dtype=float))
    return SimpleNamespace(train=train, classes=classes)


def test_prevalence_buckets_cut_the_ranked_classes_in_thirds():
    # prevalences 0.75, 0.5, 0.25, 0 (with an unknown label in class b: 2 of 4 known... see below)
    labels = [[1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0], [1, np.nan, 0, 0, 0, 0], [0, 1, 0, 0, 1, 1]]
    table = study.prevalence_buckets(_data(labels, list("abcdef")))
    assert table["train prevalence"].tolist() == pytest.approx([0.75, 2 / 3, 0.25, 0, 0.75, 0.25])
    # ranked a, e (0.75), b, c, f (0.25), d: thirds of six classes are two each, ties kept in order
    assert dict(zip(table["class"], table["bucket"])) == {
        "a": "head", "e": "head", "b": "medium", "c": "medium", "f": "tail", "d": "tail"}
    assert table["positives"].tolist() == [3, 2, 1, 0, 3, 1]


def test_bucket_table_averages_known_aucs():
    buckets = pd.DataFrame({"class": list("abc"), "bucket": ["head", "medium", "tail"]})
    run = SimpleNamespace(per_class=pd.DataFrame({"class": list("abc"), "auc": [0.8, np.nan, 0.6]}))
    table = study.bucket_table({"glori": run}, buckets).set_index("arm")
    assert table.loc["glori", "head"] == 0.8 and table.loc["glori", "tail"] == 0.6
    assert np.isnan(table.loc["glori", "medium"])


def test_training_fraction_keeps_whole_patients_and_leaves_val_and_test():
    data = prepare_data("synthetic", None, 16, seed=0, progress=False, n_images=200, n_patients=50)
    quarter = study.with_training_fraction(data, 0.25, seed=0)
    assert quarter.val is data.val and quarter.test is data.test
    patients = set(quarter.train.records["patient_id"])
    full = data.train.records
    assert set(full[full["patient_id"].isin(patients)]["image_id"]) == \
        set(quarter.train.records["image_id"])  # every image of a chosen patient
    assert 0.15 * len(data.train) <= len(quarter.train) <= 0.4 * len(data.train)
    assert study.with_training_fraction(data, 1.0) is data
    with pytest.raises(ValueError, match="fraction"):
        study.with_training_fraction(data, 0.0)


def test_arms_are_checked_before_any_training():
    with pytest.raises(ValueError, match="unknown arms"):
        study.train_arms(None, None, ["probe"], arm_models=GLORI_ARMS)
    with pytest.raises(ValueError, match="backbone_weights"):
        study.train_arms(None, None, ["glori"], arm_models=GLORI_ARMS, backbone_weights="imagenet")
    with pytest.raises(ValueError, match="decoder_norm"):
        study.train_arms(None, None, ["glori"], arm_models=GLORI_ARMS, decoder_norm="middle")
    with pytest.raises(ValueError, match="loss"):
        study.train_arms(None, None, ["glori"], arm_models=GLORI_ARMS, loss="focal")


def test_each_arm_builds_its_model_from_the_designs_settings(monkeypatch, tmp_path):
    import cxrstudy.experiment
    from cxrstudy.outputs import Outputs

    calls = {}

    def record(model, data, out, schedule, *, tag, model_kwargs, **kwargs):
        calls[tag] = (model, model_kwargs)
        return SimpleNamespace(tag=tag, model=torch.nn.Linear(2, 2), extra={},
                               history=pd.DataFrame({"val_macro_auc": [0.6]}))

    monkeypatch.setattr(cxrstudy.experiment, "train_and_evaluate", record)
    design = dict(GLORI_ARMS, linear_probe={"n_blocks": 2})  # an edited design reaches the model
    study.train_arms(None, Outputs(tmp_path / "05_glori"), list(design), arm_models=design,
                     backbone="deit_tiny", decoder_dim=64)
    assert calls["fine_tune"] == ("deit_tiny", {})
    assert calls["linear_probe"] == ("linear_probe", {"backbone": "deit_tiny", "n_blocks": 2})
    assert calls["linear_probe_last"] == ("linear_probe", {"backbone": "deit_tiny", "n_blocks": None})
    for arm, use_cls in (("glori", False), ("glori_cls", True)):
        assert calls[arm] == ("glori", {"backbone": "deit_tiny", "use_cls": use_cls, "decoder_dim": 64,
                                        "decoder_norm": "post", "n_blocks": study.N_BLOCKS})


def test_the_reference_arm_is_the_designs_when_it_ran_else_the_first():
    from cxrstudy.tables import reference_arm

    assert reference_arm(dict.fromkeys(["glori", "linear_probe"]), "linear_probe") == "linear_probe"
    assert reference_arm(dict.fromkeys(["glori", "glori_cls"]), "linear_probe") == "glori"


def test_glori_losses_bce_asl_and_their_sum_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # three known entries
    p = torch.sigmoid(logits)
    bce = -(torch.log(p[0, 0]) + torch.log(1 - p[0, 1]) + torch.log(1 - p[1, 0])) / 3
    shifted = (p - 0.05).clamp_min(0)  # ASL: γ+ = 1, γ− = 4, negatives shifted by 0.05
    asl = -((1 - p[0, 0]) * torch.log(p[0, 0]) + shifted[0, 1] ** 4 * torch.log(1 - shifted[0, 1])
            + shifted[1, 0] ** 4 * torch.log(1 - shifted[1, 0])) / 3
    values = {name: study.glori_loss(name)(logits, target, mask).item()
              for name in study.GLORI_LOSSES}
    assert values["bce"] == pytest.approx(bce.item(), rel=1e-5)
    assert values["asl"] == pytest.approx(asl.item(), rel=1e-5)
    assert values["bce+asl"] == pytest.approx(bce.item() + asl.item(), rel=1e-5)
    own = lambda z, y, m=None: z.sum()  # noqa: E731
    assert study.glori_loss(own) is own
    with pytest.raises(ValueError, match="loss"):
        study.glori_loss("bce+focal")


def test_disease_maps_pick_the_boxed_class():
    classes = ["Nodule", "Mass", "Effusion"]
    images = [torch.rand(1, 32, 32) for _ in range(2)]
    boxes = [[{"label": "Mass", "x": 1, "y": 2, "w": 5, "h": 5}], []]

    class Tiny(list):
        pass
    dataset = Tiny({"image": im} for im in images)
    dataset.classes = classes
    dataset.meta = lambda i: {"boxes": boxes[i]}
    model = create_model("glori", 3, image_size=32, backbone="deit_tiny", patch_size=8,
                         decoder_dim=32, decoder_heads=4)
    out = disease_maps(model, dataset, [0, 1])
    assert out["maps"].shape == (2, 4, 4)
    assert out["titles"][0].startswith("Mass") and out["boxes"][0] == boxes[0]
    assert out["boxes"][1] == []
    assert np.allclose(out["maps"].reshape(2, -1).max(axis=1), 1.0)


def test_can_arms_take_their_losses_and_weights_from_the_training_prevalence():
    data = _data([[1, 0], [0, 0], [0, 0], [0, 1]], ["A", "B"])
    weighted = can_study.arm_loss("weighted_bce", data, max_weight=2.0)
    logits = torch.zeros(1, 2)
    target = torch.tensor([[1.0, 0.0]])
    # prevalence 0.25 → pos weight (1 − 0.25)/0.25 = 3, capped at 2: loss = (2·log 2 + log 2)/2
    assert weighted(logits, target, torch.ones(1, 2)).item() == pytest.approx(1.5 * np.log(2))
    assert can_study.arm_loss("bce", data)(logits, target, torch.ones(1, 2)).item() == \
        pytest.approx(np.log(2))
    with pytest.raises(KeyError, match="can_balance"):  # the known losses are listed
        can_study.arm_loss("dice", data)


def test_can_arms_train_each_network_alone_both_averaged_and_both_cross_attending(monkeypatch):
    import cxrstudy.experiment
    from cxrstudy.train import Schedule
    from cxrstudy.methods.can.training import CANTrainer

    calls = {}

    def record(model, data, out, schedule, **kwargs):
        calls[kwargs["tag"]] = (model, kwargs)
        assert schedule.epochs == 1  # every arm trains on the schedule it was given

    monkeypatch.setattr(cxrstudy.experiment, "train_and_evaluate", record)
    data = _data([[1, 0], [0, 1]], ["A", "B"])
    for arm in ("single", "single_second", "ensemble", "can_bce"):
        can_study.train_arm(arm, data, None, Schedule(epochs=1), loss=CAN_ARMS[arm],
                            backbones=("resnet18", "efficientvit_m0"),
                            can_options={"attention": "channel"}, branch_weight=0.5)
    assert calls["single"][0] == "resnet18" and "trainer_cls" not in calls["single"][1]
    assert calls["single_second"][0] == "efficientvit_m0"
    model, ensemble = calls["ensemble"]
    assert model == "logit_ensemble" and ensemble["trainer_cls"] is CANTrainer
    # no attention options reach the ensemble
    assert ensemble["model_kwargs"] == {"backbones": ("resnet18", "efficientvit_m0")}
    model, can = calls["can_bce"]
    assert model == "can" and can["model_kwargs"]["attention"] == "channel"
    # the ensemble and CAN share the loss: the same class loss and the same branch weight
    assert ensemble["trainer_kwargs"] == can["trainer_kwargs"]
    assert ensemble["trainer_kwargs"]["branch_weight"] == 0.5
    assert type(ensemble["loss"]) is type(can["loss"])


def test_can_arms_read_alone_together_cross_attending_and_comparisons_by_hand():
    assert can_study.ordered_arms(["can_balance", "ensemble", "single", "single_second"],
                                  CAN_ARMS) == ["single", "single_second", "ensemble", "can_balance"]
    with pytest.raises(ValueError, match="can_dice"):
        can_study.ordered_arms(["single", "can_dice"], CAN_ARMS)
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
    masks = np.ones_like(targets)

    def run(macro, micro, probs):
        return SimpleNamespace(overall={"macro_auc": macro, "micro_auc": micro}, targets=targets,
                               masks=masks, probs=np.asarray(probs, dtype=float))

    good = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.6], [0.1, 0.3]]
    bad = [[0.4, 0.6], [0.5, 0.2], [0.3, 0.5], [0.6, 0.4]]
    runs = {"single": run(0.70, 0.72, bad), "ensemble": run(0.80, 0.75, good),
            "can_bce": run(0.85, 0.70, good)}
    table = can_study.comparisons(runs, CAN_PAIRS).set_index("comparison")
    # single_second did not run: its rows are left out; the rest in the order of the pairs
    assert list(table.index) == ["ensemble − single", "can_bce − ensemble", "can_bce − single"]
    assert table.loc["can_bce − ensemble", "Δ macro AUC"] == pytest.approx(0.05)
    assert table.loc["can_bce − ensemble", "Δ micro AUC"] == pytest.approx(-0.05)
    assert table.loc["can_bce − ensemble", "isolates"] == "CAN's projections, heads and cross-attention"
    assert table.loc["ensemble − single", "isolates"] == "a second network and the two-network loss"
    # identical scores: DeLong cannot tell them apart; otherwise the pooled test of the pair
    from cxrstudy.metrics import pooled_delong_p

    assert table.loc["can_bce − ensemble", "DeLong p (micro)"] == pytest.approx(1.0)
    assert table.loc["ensemble − single", "DeLong p (micro)"] == pytest.approx(
        pooled_delong_p(targets, np.asarray(good), np.asarray(bad), masks))
    assert table.loc["ensemble − single", "DeLong p (micro)"] < 0.05
