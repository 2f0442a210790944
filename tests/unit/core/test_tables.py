"""The result tables: one numeric row per run (hand-computed AUCs), CIs kept as numbers and
joined into text only for display, the ablation table's DeLong and collapse columns."""
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from cxrstudy import plots  # noqa: E402
from cxrstudy.display import ci_columns, fold_ci, format_ci  # noqa: E402
from cxrstudy.metrics import summarize  # noqa: E402
from cxrstudy.outputs import Outputs  # noqa: E402
from cxrstudy.tables import (ablation_table, best_run_sentence, comparison_table,  # noqa: E402
                             overall_row, per_class_table, run_metrics, save_per_class,
                             save_results)

# Four images, two classes. Class A: positives {0.9, 0.8} above negatives {0.2, 0.1}: AUC 1.
# Class B: positives {0.6, 0.4}, negatives {0.3, 0.5}; 0.4 < 0.5 is the one wrong pair: 3/4.
# Macro AUC (1 + 0.75) / 2 = 0.875. Micro: positives {0.9, 0.8, 0.6, 0.4} against negatives
# {0.2, 0.1, 0.3, 0.5}: only 0.4 < 0.5 is wrong, 15/16 = 0.9375.
TARGETS = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
SCORES = np.array([[0.9, 0.3], [0.2, 0.6], [0.8, 0.4], [0.1, 0.5]])
CLASSES = ["A", "B"]


def fake_run(tag="resnet18", targets=TARGETS, probs=SCORES, n_params=2_500_000, n_boot=50):
    """What train_and_evaluate returns, with the metrics summarize computes on the test set."""
    masks = np.ones_like(targets)
    per_class, overall = summarize(targets, probs, CLASSES, mask=masks, n_boot=n_boot, seed=0,
                                   progress=False)
    return SimpleNamespace(tag=tag, targets=targets, probs=probs, masks=masks,
                           per_class=per_class, overall=overall, n_params=n_params,
                           history=pd.DataFrame({"epoch": [1, 2, 3]}), train_seconds=12.34,
                           extra={"best_epoch": 2})


def test_overall_row_holds_hand_computed_numbers():
    run = fake_run()
    row = overall_row(run)
    assert row["model"] == "resnet18"
    assert row["macro AUC"] == pytest.approx(0.875)
    assert row["micro AUC"] == pytest.approx(0.9375)
    assert row["params (M)"] == pytest.approx(2.5)
    assert (row["epochs"], row["best epoch"], row["train s"]) == (3, 2, 12.3)
    for value in ("macro AUC", "micro AUC"):  # the CI is two numbers around the value
        low, high = ci_columns(value)
        assert isinstance(row[low], float) and isinstance(row[high], float)
        assert row[low] <= row[value] <= row[high]
    assert overall_row(run, label="arm")["arm"] == "resnet18"


def test_ci_columns_follow_one_spelling():
    assert ci_columns("macro AUC") == ("macro low", "macro high")
    assert ci_columns("densenet121 AUC") == ("densenet121 low", "densenet121 high")


def test_format_ci_is_the_display_form():
    assert format_ci(0.65, 0.61, 0.7) == "0.650 (0.610–0.700)"
    assert format_ci(0.65, 0.61, 0.7, digits=2, label="95% CI ") == "0.65 (95% CI 0.61–0.70)"
    assert format_ci(0.65, None, float("nan")) == "0.650"
    assert format_ci(None, 0.1, 0.2) == ""


def test_fold_ci_joins_value_and_interval_columns_for_display_only():
    frame = pd.DataFrame({"arm": ["a", "b"], "macro AUC": [0.65, np.nan],
                          "macro low": [0.61, np.nan], "macro high": [0.70, np.nan],
                          "Δ AUC": [0.01, 0.02]})
    shown = fold_ci(frame)
    assert list(shown.columns) == ["arm", "macro AUC (95% CI)", "Δ AUC"]
    assert list(shown["macro AUC (95% CI)"]) == ["0.650 (0.610–0.700)", ""]
    assert list(frame.columns)[2] == "macro low"  # the numbers themselves are untouched


def test_comparison_and_per_class_tables_keep_numeric_cis():
    runs = {"resnet18": fake_run(), "densenet121": fake_run("densenet121", probs=1 - SCORES)}
    table = comparison_table(runs)
    assert list(table["model"]) == ["resnet18", "densenet121"]
    assert table["macro low"].dtype == float and table["micro high"].dtype == float
    assert table.loc[1, "macro AUC"] == pytest.approx(0.125)  # every ranking reversed
    per_class = per_class_table(runs).set_index("class")
    assert per_class.loc["B", "resnet18 AUC"] == pytest.approx(0.75)
    assert per_class.loc["A", "densenet121 AUC"] == pytest.approx(0.0)
    for tag, run in runs.items():
        expected = run.per_class.set_index("class")
        assert np.allclose(per_class[f"{tag} low"], expected["auc_low"], equal_nan=True)
        assert np.allclose(per_class[f"{tag} high"], expected["auc_high"], equal_nan=True)
    assert list(per_class["n_pos"]) == [2, 2]


def _ablation_runs():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, (60, 2)).astype(float)
    good = np.clip(targets * 0.6 + rng.random((60, 2)) * 0.4, 0, 1)
    collapsed = np.full((60, 2), 0.3)
    return {"baseline": fake_run("baseline", targets, collapsed, n_params=2_000_000),
            "mxa_kd": fake_run("mxa_kd", targets, good)}


def test_ablation_table_rows_paper_column_and_numeric_cis():
    runs = _ablation_runs()
    table = ablation_table(runs, "baseline", CLASSES, paper={"baseline": 0.66, "mxa_kd": 0.85},
                           paper_label="paper")
    assert list(table["arm"]) == ["baseline", "mxa_kd"]
    base, best = table.iloc[0], table.iloc[1]
    assert base["collapsed"] == 2 and best["collapsed"] == 0
    assert np.isnan(base["DeLong p (micro)"]) and best["DeLong p (micro)"] < 1e-3
    assert best["better"] == 2 and best["worse"] == 0
    assert best["Δ macro"] == pytest.approx(best["macro AUC"] - 0.5)
    assert list(table["paper"]) == [0.66, 0.85]
    assert base["params (M)"] == pytest.approx(2.0)
    o = runs["mxa_kd"].overall  # the numeric CI columns are the run's own values
    assert (best["micro AUC"], best["micro low"], best["micro high"]) == (
        o["micro_auc"], o["micro_auc_low"], o["micro_auc_high"])
    assert (best["macro low"], best["macro high"]) == (o["macro_auc_low"], o["macro_auc_high"])
    shown = fold_ci(table).iloc[1]  # and the display form joins them
    assert shown["micro AUC (95% CI)"] == (f"{o['micro_auc']:.3f} ({o['micro_auc_low']:.3f}–"
                                           f"{o['micro_auc_high']:.3f})")


def test_ablation_table_refuses_runs_on_different_images():
    targets = np.eye(4)[:, :2]
    runs = {"baseline": fake_run("baseline", targets, np.random.rand(4, 2)),
            "other": fake_run("other", 1 - targets, np.random.rand(4, 2))}
    with pytest.raises(ValueError, match="other images"):
        ablation_table(runs, "baseline", CLASSES)
    with pytest.raises(KeyError, match="reference"):
        ablation_table(runs, "nope", CLASSES)


def test_metric_bars_reads_the_numeric_ci_columns():
    table = ablation_table(_ablation_runs(), "baseline", CLASSES)
    figure = plots.metric_bars(table, "arm", "micro AUC", "micro low", "micro high")
    bars = figure.axes[0].patches
    assert [b.get_width() for b in bars] == pytest.approx(list(table["micro AUC"]))


class _Split:
    def __init__(self, patients):
        self.records = pd.DataFrame({"patient_id": patients})

    def __len__(self):
        return len(self.records)


def test_best_run_sentence_names_the_best_macro_auc_with_its_ci():
    runs = {"resnet18": fake_run(), "densenet121": fake_run("densenet121", probs=1 - SCORES)}
    data = SimpleNamespace(test=_Split(["p1", "p1", "p2", "p3"]))
    o = runs["resnet18"].overall
    assert best_run_sentence(runs, data) == (
        f"Best macro AUC: resnet18 0.875 (95% CI {o['macro_auc_low']:.3f}–"
        f"{o['macro_auc_high']:.3f}) on 4 test images from 3 patients.")


def test_save_results_and_save_per_class_write_what_the_notebooks_read(tmp_path, capsys):
    runs = {"resnet18": fake_run()}
    data = SimpleNamespace(test=_Split(["p1", "p2", "p3", "p4"]))
    out = Outputs(tmp_path / "run")
    table = save_per_class(out, runs, "toy")
    saved = pd.read_csv(tmp_path / "run/tables/per_class_auc.csv")
    assert list(saved.columns) == ["class", "n_pos", "n_neg", "resnet18 AUC", "resnet18 low",
                                   "resnet18 high"]
    assert np.allclose(saved["resnet18 AUC"], table["resnet18 AUC"])
    markdown = (tmp_path / "run/tables/per_class_auc.md").read_text()
    assert "resnet18 AUC (95% CI)" in markdown and "resnet18 low" not in markdown
    assert list((tmp_path / "run/figures").glob("per_class_auc.*"))
    save_results(out, runs, data, dataset="toy")
    metrics = out.load_metrics()
    assert metrics["dataset"] == "toy"
    model = metrics["models"]["resnet18"]
    assert model["per_class_auc"] == pytest.approx({"A": 1.0, "B": 0.75})
    assert (model["params"], model["epochs_trained"], model["best_epoch"]) == (2_500_000, 3, 2)
    assert set(model) == set(run_metrics(runs)["resnet18"])
    assert capsys.readouterr().out.startswith("Best macro AUC: resnet18 0.875 ")
