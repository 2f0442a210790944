"""The ablation table: CIs copied from each run, DeLong against the reference, collapse counts."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cxrstudy.ablation import ablation_table, constant_score_classes, pooled_delong_p
from cxrstudy.metrics.delong import delong_test


def _run(probs, targets, masks, macro=0.7):
    overall = {"micro_auc": 0.8, "micro_auc_low": 0.7, "micro_auc_high": 0.9,
               "macro_auc": macro, "macro_auc_low": macro - 0.1, "macro_auc_high": macro + 0.1}
    return SimpleNamespace(probs=probs, targets=targets, masks=masks, overall=overall,
                           n_params=2_000_000)


def test_constant_scores_are_found_only_among_known_labels():
    scores = np.array([[0.5, 0.1, 0.3], [0.5, 0.2, 0.9], [0.5, 0.3, 0.3]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    # class c varies only on the unknown row, so among known rows it is constant
    assert constant_score_classes(scores, ["a", "b", "c"], mask) == ["a", "c"]
    assert constant_score_classes(scores, ["a", "b", "c"]) == ["a"]


def test_pooled_delong_uses_the_known_pairs_only():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (40, 3)).astype(float)
    a, b = rng.random((40, 3)), rng.random((40, 3))
    mask = np.ones_like(targets)
    mask[:10, 0] = 0
    known = mask > 0
    expected = delong_test(targets[known], a[known], b[known])["p_value"]
    assert pooled_delong_p(targets, a, b, mask) == pytest.approx(expected)
    assert np.isnan(pooled_delong_p(np.zeros((5, 2)), a[:5, :2], b[:5, :2]))


def test_ablation_table_rows_and_paper_column():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, (60, 2)).astype(float)
    masks = np.ones_like(targets)
    good = np.clip(targets * 0.6 + rng.random((60, 2)) * 0.4, 0, 1)
    collapsed = np.full((60, 2), 0.3)
    runs = {"baseline": _run(collapsed, targets, masks, macro=0.5),
            "mxa_kd": _run(good, targets, masks, macro=0.9)}
    table = ablation_table(runs, "baseline", ["A", "B"], paper={"baseline": 0.66, "mxa_kd": 0.85},
                           paper_label="paper")
    assert list(table["arm"]) == ["baseline", "mxa_kd"]
    base, best = table.iloc[0], table.iloc[1]
    assert base["collapsed"] == 2 and best["collapsed"] == 0
    assert np.isnan(base["DeLong p (micro)"]) and best["DeLong p (micro)"] < 1e-3
    assert best["better"] == 2 and best["worse"] == 0
    assert best["Δ macro"] == pytest.approx(0.5, abs=0.3)
    assert best["micro 95% CI"] == "0.700–0.900"
    assert list(table["paper"]) == [0.66, 0.85]
    assert best["params (M)"] == pytest.approx(2.0)


def test_ablation_table_refuses_runs_on_different_images():
    targets = np.eye(4)[:, :2]
    runs = {"baseline": _run(np.random.rand(4, 2), targets, np.ones((4, 2))),
            "other": _run(np.random.rand(4, 2), 1 - targets, np.ones((4, 2)))}
    with pytest.raises(ValueError, match="other images"):
        ablation_table(runs, "baseline", ["A", "B"])
    with pytest.raises(KeyError, match="reference"):
        ablation_table(runs, "nope", ["A", "B"])
