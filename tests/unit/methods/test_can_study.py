"""CAN study glue for the attention-off control: where can_no_attention sits among the arms,
what reaches its model, and the comparison that isolates the cross-attention, by hand."""
from types import SimpleNamespace

import numpy as np
import pytest

from cxrstudy.methods.can import study as can_study


#: 06's design as its notebook writes it, cut to the arms these tests train.
ARM_LOSSES = {"single": "bce", "single_second": "bce", "ensemble": "bce", "can_no_attention": "bce",
              "can_bce": "bce", "can_balance": "can_balance"}
PAIRS = [("ensemble", "single", "a second network and the two-network loss"),
         ("can_no_attention", "ensemble", "CAN's projections and heads, no attention"),
         ("can_bce", "can_no_attention", "the cross-attention alone"),
         ("can_bce", "ensemble", "CAN's projections, heads and cross-attention"),
         ("can_bce", "single", "everything at once")]


def _data(labels, classes):
    return SimpleNamespace(train=SimpleNamespace(labels=np.asarray(labels, dtype=float)),
                           classes=classes)


def test_the_attention_off_arm_reads_between_the_ensemble_and_can():
    assert can_study.ordered_arms(["can_bce", "can_no_attention", "single", "ensemble"],
                                  ARM_LOSSES) == ["single", "ensemble", "can_no_attention", "can_bce"]
    # its maps are held flat: never the arm whose attention the notebook draws
    assert can_study.arm_with_maps({"single": 1, "can_no_attention": 1}) is None
    assert can_study.arm_with_maps({"can_no_attention": 1, "can_focal": 1}) == "can_focal"


def test_the_attention_off_arm_is_can_bce_with_the_switch_off(monkeypatch):
    import cxrstudy.experiment
    from cxrstudy.train import Schedule
    from cxrstudy.methods.can.training import CANTrainer

    calls = {}

    def record(model, data, out, schedule, **kwargs):
        calls[kwargs["tag"]] = (model, kwargs)

    monkeypatch.setattr(cxrstudy.experiment, "train_and_evaluate", record)
    data = _data([[1, 0], [0, 1]], ["A", "B"])
    options = {"attention": "channel", "residual": False}
    for arm in ("single", "single_second", "ensemble", "can_no_attention", "can_bce"):
        can_study.train_arm(arm, data, None, Schedule(epochs=1), loss=ARM_LOSSES[arm],
                            backbones=("resnet18", "densenet121"),
                            can_options=options, branch_weight=0.5, attention_weight=0.3,
                            seed=7, pretrained=True)
    off, on = calls["can_no_attention"], calls["can_bce"]
    assert off[0] == on[0] == "can" and off[1]["trainer_cls"] is CANTrainer
    assert off[1]["model_kwargs"] == {**on[1]["model_kwargs"], "cross_attention": False}
    assert "cross_attention" not in on[1]["model_kwargs"]  # can_bce's recipe is unchanged
    assert off[1]["trainer_kwargs"] == on[1]["trainer_kwargs"]
    assert type(off[1]["loss"]) is type(on[1]["loss"])
    assert options == {"attention": "channel", "residual": False}  # the caller's dict untouched
    # the initialisation switch and the seed reach every arm alike
    assert {tag: (kw["pretrained"], kw["seed"]) for tag, (_, kw) in calls.items()} == {
        tag: (True, 7) for tag in calls}


def test_the_comparisons_isolate_the_attention_against_the_attention_off_arm():
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
    masks = np.ones_like(targets)

    def run(macro, micro):
        probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6], [0.1, 0.3]]) * macro
        return SimpleNamespace(overall={"macro_auc": macro, "micro_auc": micro},
                               targets=targets, masks=masks, probs=probs)

    runs = {"single": run(0.70, 0.71), "ensemble": run(0.76, 0.74),
            "can_no_attention": run(0.79, 0.80), "can_bce": run(0.81, 0.78)}
    table = can_study.comparisons(runs, PAIRS).set_index("comparison")
    assert list(table.index) == ["ensemble − single", "can_no_attention − ensemble",
                                 "can_bce − can_no_attention", "can_bce − ensemble",
                                 "can_bce − single"]
    assert table.loc["can_bce − can_no_attention", "Δ macro AUC"] == pytest.approx(0.02)
    assert table.loc["can_bce − can_no_attention", "Δ micro AUC"] == pytest.approx(-0.02)
    assert table.loc["can_no_attention − ensemble", "Δ macro AUC"] == pytest.approx(0.03)
    # the two steps add up to what CAN adds over the ensemble
    assert table.loc["can_bce − ensemble", "Δ macro AUC"] == pytest.approx(
        table.loc["can_no_attention − ensemble", "Δ macro AUC"]
        + table.loc["can_bce − can_no_attention", "Δ macro AUC"])
    # each row carries its pair's sentence from the design
    assert table["isolates"].to_dict() == {f"{arm} − {against}": isolates
                                           for arm, against, isolates in PAIRS}
