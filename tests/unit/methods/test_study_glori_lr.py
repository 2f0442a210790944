"""05's learning-rate search: one run per rate and arm, the best validation macro AUC kept (ties
to the schedule's rate, then the smaller), the frozen arms on the kept fine-tuned backbone, and
label efficiency at the rates chosen at 100% — checked with a stand-in trainer whose validation
AUCs are known."""
import fnmatch
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cxrstudy import experiment
from cxrstudy.experiment import prepare_data
from cxrstudy.outputs import Outputs
from cxrstudy.methods.glori import study
from cxrstudy.train import Schedule

SCHEDULE = Schedule(epochs=1, lr=5e-4)
#: 05's design as its notebook writes it: arm → the settings its model is built with.
ARM_MODELS = {"fine_tune": {}, "linear_probe": {"n_blocks": 4}, "linear_probe_last": {"n_blocks": None},
              "glori": {"use_cls": False}, "glori_cls": {"use_cls": True}}


# ---- the pieces, by hand ----------------------------------------------------------------------
def test_select_rate_takes_the_best_validation_auc():
    assert study.select_rate({1e-4: 0.61, 5e-4: 0.64, 2e-3: 0.70}, 5e-4) == 2e-3
    assert study.select_rate({1e-4: 0.61}, 5e-4) == 1e-4  # one rate: that rate


def test_select_rate_ties_go_to_the_schedules_rate_then_the_smaller():
    assert study.select_rate({1e-4: 0.7, 5e-4: 0.7, 2e-3: 0.7}, 5e-4) == 5e-4
    assert study.select_rate({2e-3: 0.7, 1e-4: 0.7, 5e-4: 0.6}, 5e-4) == 1e-4
    # an undefined AUC loses to any number; none defined: the same tie rule
    assert study.select_rate({5e-4: math.nan, 2e-3: 0.51}, 5e-4) == 2e-3
    assert study.select_rate({2e-3: math.nan, 5e-4: math.nan}, 5e-4) == 5e-4
    assert study.select_rate({2e-3: math.nan, 1e-3: None}, 5e-4) == 1e-3
    with pytest.raises(ValueError, match="at least one"):
        study.select_rate({}, 5e-4)


def test_rate_tags_keep_the_schedules_run_and_are_left_out_by_07():
    assert study.rate_tag("glori", 5e-4, 5e-4) == "glori"
    assert study.rate_tag("glori", 2e-3, 5e-4) == "glori_lr_0.002"
    assert study.rate_tag("fine_tune_0.25", 1e-5, 5e-4) == "fine_tune_0.25_lr_0.00001"
    # 07_explainability's default exclude pattern (label-efficiency runs) covers the extra runs
    assert fnmatch.fnmatch("05_glori/" + study.rate_tag("glori_cls", 0.1, 5e-4), "05_glori/*_0.*")
    kept = "05_glori/" + study.rate_tag("glori_cls", 5e-4, 5e-4)
    assert not fnmatch.fnmatch(kept, "05_glori/*_0.*")


def test_arm_rates_search_only_the_named_arms():
    rates = study.arm_rates(["fine_tune", "glori"], 5e-4, [5e-4, 2e-3], ["glori"],
                            {"fine_tune": 1e-4})
    assert rates == {"fine_tune": [1e-4], "glori": [5e-4, 2e-3]}
    assert study.arm_rates(["glori"], 5e-4, [1e-3, 2e-3]) == {"glori": [1e-3, 2e-3]}  # None: all
    for grid in (None, []):  # no grid: the schedule's rate, as before the search
        assert study.arm_rates(["fine_tune", "glori"], 5e-4, grid) == {"fine_tune": [5e-4],
                                                                       "glori": [5e-4]}
    for bad, error in (([5e-4, 5e-4], "repeats"), ([0.0], "positive"), (["fast"], "positive"),
                       (0.001, "list"), ("0.001", "list")):
        with pytest.raises((ValueError, TypeError), match=error):
            study.arm_rates(["glori"], 5e-4, bad)
    with pytest.raises(ValueError, match="unknown arms"):
        study.arm_rates(["glori"], 5e-4, [1e-3], ["gloria"])
    # an arm of the design that does not run this time may be named: nothing of it trains
    assert study.arm_rates(["glori"], 5e-4, [1e-3, 2e-3], ["linear_probe"],
                           known=list(ARM_MODELS)) == {"glori": [5e-4]}
    with pytest.raises(ValueError, match="unknown arms"):
        study.arm_rates(["glori"], 5e-4, [1e-3], ["linear_probe"])  # known: the arms run


def test_validation_auc_is_the_best_epochs():
    run = SimpleNamespace(history=pd.DataFrame({"val_macro_auc": [0.55, np.nan, 0.62, 0.60]}))
    assert study.validation_auc(run) == 0.62
    assert math.isnan(study.validation_auc(SimpleNamespace(history=pd.DataFrame(
        {"val_macro_auc": [np.nan]}))))
    assert math.isnan(study.validation_auc(SimpleNamespace(history=pd.DataFrame())))


# ---- train_arms with a stand-in trainer -----------------------------------------------------
#: validation macro AUC of each (arm, rate): fine_tune and glori_cls best at 2e-3, linear_probe
#: at the schedule's 5e-4, glori tied (the schedule's rate kept)
VAL_AUC = {("fine_tune", 5e-4): 0.60, ("fine_tune", 2e-3): 0.66,
           ("linear_probe", 5e-4): 0.64, ("linear_probe", 2e-3): 0.58,
           ("glori", 5e-4): 0.61, ("glori", 2e-3): 0.61,
           ("glori_cls", 5e-4): 0.59, ("glori_cls", 2e-3): 0.63}


@pytest.fixture
def trainer(monkeypatch):
    """Stand-in for train_and_evaluate: records every call, answers with VAL_AUC (by the tag's
    arm and the schedule's rate), raises FloatingPointError for the rates in ``diverges``."""
    calls, diverges = [], set()

    def train_and_evaluate(model, data, out, schedule, *, tag, pretrained, model_kwargs, **kwargs):
        arm = tag.split("_lr_")[0]
        arm = arm.rsplit("_", 1)[0] if arm[-1].isdigit() else arm  # label-efficiency suffix
        calls.append({"model": model, "tag": tag, "lr": schedule.lr, "schedule": schedule,
                      "pretrained": pretrained, "seed": kwargs.get("seed")})
        if (arm, schedule.lr) in diverges:
            raise FloatingPointError("non-finite training loss nan at epoch 1")
        history = pd.DataFrame({"epoch": [1, 2], "val_macro_auc": [0.5, VAL_AUC[arm, schedule.lr]]})
        return SimpleNamespace(tag=tag, model=torch.nn.Linear(2, 2), history=history,
                               extra={"best_epoch": 2}, overall={}, n_params=1, train_seconds=0.0)

    monkeypatch.setattr(experiment, "train_and_evaluate", train_and_evaluate)
    return SimpleNamespace(calls=calls, diverges=diverges)


def test_each_arm_keeps_its_best_validation_run_on_the_kept_backbone(trainer, tmp_path):
    out = Outputs(tmp_path / "05_glori")
    arms = ["fine_tune", "linear_probe", "glori", "glori_cls"]
    runs = study.train_arms(None, out, arms, SCHEDULE, arm_models=ARM_MODELS, lr_grid=[5e-4, 2e-3],
                            loss="bce")
    assert study.chosen_rates(runs) == {"fine_tune": 2e-3, "linear_probe": 5e-4, "glori": 5e-4,
                                        "glori_cls": 2e-3}
    assert {arm: run.tag for arm, run in runs.items()} == {
        "fine_tune": "fine_tune_lr_0.002", "linear_probe": "linear_probe", "glori": "glori",
        "glori_cls": "glori_cls_lr_0.002"}
    # fine_tune first (both rates), then each frozen arm at both rates on the kept backbone
    assert [c["tag"] for c in trainer.calls[:2]] == ["fine_tune", "fine_tune_lr_0.002"]
    backbone = str(out.backbone_file("fine_tune_lr_0.002"))
    assert {c["pretrained"] for c in trainer.calls[2:]} == {backbone}
    assert len(trainer.calls) == 8
    assert (tmp_path / "05_glori/backbones/fine_tune_lr_0.002.pt").is_file()
    # the run at the schedule's rate gets the schedule itself (the same run as without a search)
    assert all(c["schedule"] is SCHEDULE for c in trainer.calls if c["lr"] == 5e-4)
    table = study.lr_sweep_table(runs)
    assert list(table.columns) == list(study.SWEEP_COLUMNS) and len(table) == 8
    assert table.groupby("arm")["selected"].sum().to_dict() == dict.fromkeys(arms, 1)
    picked = table[table["selected"]].set_index("arm")
    assert picked["val macro AUC"].to_dict() == pytest.approx(
        {"fine_tune": 0.66, "linear_probe": 0.64, "glori": 0.61, "glori_cls": 0.63})
    assert picked.loc["glori_cls", "run"] == "glori_cls_lr_0.002" and not table["diverged"].any()


def test_without_a_grid_every_arm_trains_once_at_the_schedules_rate(trainer, tmp_path):
    out = Outputs(tmp_path / "05_glori")
    for grid in (None, [5e-4]):
        trainer.calls.clear()
        runs = study.train_arms(None, out, ["fine_tune", "glori"], SCHEDULE, arm_models=ARM_MODELS,
                                lr_grid=grid)
        assert [(c["tag"], c["lr"]) for c in trainer.calls] == [("fine_tune", 5e-4),
                                                                ("glori", 5e-4)]
        assert trainer.calls[1]["pretrained"] == str(out.backbone_file("fine_tune"))
        assert study.chosen_rates(runs) == {"fine_tune": 5e-4, "glori": 5e-4}
        assert study.lr_sweep_table(runs)["selected"].all()


def test_a_diverging_rate_loses_and_all_diverging_fails(trainer, tmp_path):
    out = Outputs(tmp_path / "05_glori")
    trainer.diverges.add(("glori_cls", 2e-3))  # the rate that would have won
    runs = study.train_arms(None, out, ["glori_cls"], SCHEDULE, arm_models=ARM_MODELS,
                            lr_grid=[5e-4, 2e-3], backbone_weights="pretrained")
    assert study.chosen_rates(runs) == {"glori_cls": 5e-4}
    table = study.lr_sweep_table(runs).set_index("lr")
    assert table.loc[2e-3, "diverged"] and math.isnan(table.loc[2e-3, "val macro AUC"])
    trainer.diverges.add(("glori_cls", 5e-4))
    with pytest.raises(FloatingPointError, match="every learning rate"):
        study.train_arms(None, out, ["glori_cls"], SCHEDULE, arm_models=ARM_MODELS,
                         lr_grid=[5e-4, 2e-3], backbone_weights="pretrained")
    with pytest.raises(FloatingPointError, match="non-finite"):  # no search: as before
        study.train_arms(None, out, ["glori_cls"], SCHEDULE, arm_models=ARM_MODELS,
                         backbone_weights="pretrained")


def test_label_efficiency_reuses_the_rates_chosen_at_full_data(trainer, tmp_path):
    data = prepare_data("synthetic", None, 16, seed=0, progress=False, n_images=120, n_patients=40)
    out = Outputs(tmp_path / "05_glori")
    full = study.train_arms(data, out, ["fine_tune", "glori_cls"], SCHEDULE, arm_models=ARM_MODELS,
                            lr_grid=[5e-4, 2e-3])
    trainer.calls.clear()
    table = study.label_efficiency(data, out, [0.5, 1.0], ["glori_cls"], SCHEDULE,
                                   full_runs=full, seed=0, arm_models=ARM_MODELS)
    # one run per arm at half the patients, each at its chosen rate: no search again
    assert [(c["tag"], c["lr"]) for c in trainer.calls] == [("fine_tune_0.5_lr_0.002", 2e-3),
                                                            ("glori_cls_0.5_lr_0.002", 2e-3)]
    assert trainer.calls[1]["pretrained"] == str(out.backbone_file("fine_tune_0.5_lr_0.002"))
    assert table.set_index("fraction")["lr"].to_dict() == {0.5: 2e-3, 1.0: 2e-3}


def test_arms_table_shows_each_arms_rate_beside_its_name():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(40, 3)).astype(float)
    masks = np.ones_like(targets, dtype=bool)

    def run(tag, lr):
        probs = np.clip(targets * 0.3 + rng.random(targets.shape) * 0.7, 0, 1)
        per_class = pd.DataFrame({"class": list("abc"), "auc": [0.7, 0.7, 0.7]})
        return SimpleNamespace(tag=tag, probs=probs, targets=targets, masks=masks, n_params=10,
                               per_class=per_class, overall={"macro_auc": 0.7}, train_seconds=1.0,
                               history=pd.DataFrame({"epoch": [1]}), extra={"lr": lr})

    runs = {"linear_probe": run("linear_probe", 5e-4), "glori": run("glori_lr_0.002", 2e-3)}
    table = study.arms_table(runs, "linear_probe", list("abc"))
    assert list(table.columns[:2]) == ["arm", "lr"]
    assert table.set_index("arm")["lr"].to_dict() == {"linear_probe": 5e-4, "glori": 2e-3}


def test_profiles_search_a_few_rates_and_the_rehearsal_two_of_the_papers():
    from cxrstudy.pipeline.config import resolve_parameters
    from cxrstudy.rehearsal import scale

    paper = resolve_parameters("paper")["05_glori"]
    assert min(paper["lr_grid"]) == 1e-5 and max(paper["lr_grid"]) == 0.1  # the official range
    assert paper["lr"] in paper["lr_grid"] and paper["lr_sweep_arms"] is None
    rehearsed = resolve_parameters("paper", scale.override_arguments())["05_glori"]
    assert len(rehearsed["lr_grid"]) == 2 and paper["lr"] in rehearsed["lr_grid"]
    assert set(rehearsed["lr_grid"]) <= set(paper["lr_grid"])
    tiny = resolve_parameters("tiny")["05_glori"]
    assert len(tiny["lr_grid"]) == 2 and tiny["lr"] in tiny["lr_grid"]
    assert resolve_parameters("default")["05_glori"]["lr_grid"] == []  # no search
