"""Classification metrics and summary tables: hand-computed values and sklearn cross-checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrstudy.metrics import (check_inputs, compare_models, constant_score_classes,
                              f1_at_threshold, json_ready, label_counts, macro_auc, micro_auc,
                              midranks, per_class_ap, per_class_auc, rank_auc, summarize,
                              weighted_auc)

# Six samples, one class. Positives score {0.9, 0.6, 0.4}; negatives {0.6, 0.5, 0.2}.
# All nine (positive, negative) pairs, 1 = ranked right, ½ = tie, 0 = wrong:
#   0.9 vs 0.6 → 1     0.9 vs 0.5 → 1     0.9 vs 0.2 → 1
#   0.6 vs 0.6 → ½     0.6 vs 0.5 → 1     0.6 vs 0.2 → 1
#   0.4 vs 0.6 → 0     0.4 vs 0.5 → 0     0.4 vs 0.2 → 1
# AUC = (3 + 2.5 + 1) / 9 = 6.5 / 9
HAND_TRUE = np.array([1, 1, 1, 0, 0, 0])
HAND_SCORE = np.array([0.9, 0.6, 0.4, 0.6, 0.5, 0.2])
HAND_AUC = 6.5 / 9


def test_auc_on_the_six_sample_hand_example():
    assert rank_auc(HAND_TRUE, HAND_SCORE) == pytest.approx(HAND_AUC, abs=1e-12)
    assert per_class_auc(HAND_TRUE, HAND_SCORE) == pytest.approx([HAND_AUC], abs=1e-12)
    # the order of rows does not matter
    order = np.array([5, 2, 0, 3, 1, 4])
    assert rank_auc(HAND_TRUE[order], HAND_SCORE[order]) == pytest.approx(HAND_AUC, abs=1e-12)


def test_midranks_average_tied_ranks():
    # sorted: 1 (rank 1), 3, 3 (ranks 2, 3 → 2.5), 7 (4), 9, 9, 9 (5, 6, 7 → 6)
    assert midranks([9, 3, 1, 9, 7, 3, 9]).tolist() == [6, 2.5, 1, 6, 4, 2.5, 6]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_auc_equals_sklearn_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((300, 5)) < 0.3).astype(int)
    scores = rng.integers(0, 6, size=(300, 5)) + y  # six-ish values: most pairs tie
    scores = scores.astype(float)
    expected = [roc_auc_score(y[:, c], scores[:, c]) for c in range(5)]
    assert per_class_auc(y, scores) == pytest.approx(expected, abs=1e-12)
    logits = np.log(scores + 0.5)  # a monotone transform changes nothing
    assert per_class_auc(y, logits) == pytest.approx(expected, abs=1e-12)


def test_weighted_auc_equals_auc_of_repeated_rows():
    rng = np.random.default_rng(3)
    y = rng.random(40) < 0.4
    s = rng.integers(0, 5, 40).astype(float)
    weights = rng.integers(0, 4, size=(6, 40))
    got = weighted_auc(y, s, weights)
    for b in range(6):
        rows = np.repeat(np.arange(40), weights[b])
        assert got[b] == pytest.approx(roc_auc_score(y[rows], s[rows]), abs=1e-12)
    assert np.isnan(weighted_auc(y, s, np.where(y, 1, 0)[None]))[0]  # no negatives weighted in


def test_masked_entries_are_excluded():
    rng = np.random.default_rng(4)
    y = (rng.random((50, 3)) < 0.4).astype(float)
    s = rng.random((50, 3))
    mask = (rng.random((50, 3)) < 0.7).astype(float)
    base = per_class_auc(y, s, mask)
    for c in range(3):
        keep = mask[:, c] == 1
        assert base[c] == pytest.approx(roc_auc_score(y[keep, c], s[keep, c]), abs=1e-12)
    s2, y2 = s.copy(), y.copy()
    hidden = mask == 0
    s2[hidden] = rng.random(hidden.sum()) * 100  # change masked scores ...
    y2[hidden] = 1 - y2[hidden]                  # ... and masked labels
    assert np.array_equal(per_class_auc(y2, s2, mask), base)
    assert micro_auc(y2, s2, mask) == micro_auc(y, s, mask)
    assert np.array_equal(per_class_ap(y2, s2, mask), per_class_ap(y, s, mask))
    assert np.array_equal(f1_at_threshold(y2, s2, mask)[0], f1_at_threshold(y, s, mask)[0])
    # NaN labels with mask=None mean the same thing; NaN scores at unknown entries are fine
    y_nan = np.where(hidden, np.nan, y)
    s_nan = np.where(hidden, np.nan, s)
    assert np.array_equal(per_class_auc(y_nan, s_nan), base)


def test_undefined_class_is_nan_and_excluded_from_macro():
    y = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=float)
    s = np.array([[0.9, 0.1, 0.8], [0.2, 0.2, 0.3], [0.8, 0.3, 0.1], [0.1, 0.9, 0.6]])
    # class 1's only positive (row 3) is masked: among known rows it has negatives only
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1]], dtype=float)
    auc = per_class_auc(y, s, mask)
    # class 0: positives {0.9, 0.8} vs negatives {0.2, 0.1} → 1
    # class 2: positives {0.8, 0.1} vs negatives {0.3, 0.6} → (1 + 1 + 0 + 0) / 4 = 0.5
    assert auc[0] == 1.0 and auc[2] == 0.5 and np.isnan(auc[1])
    assert macro_auc(y, s, mask) == pytest.approx(0.75)
    assert np.isnan(per_class_ap(y, s, mask)[1])  # no known positive: AP undefined too
    n_pos, n_neg = label_counts(y, mask)
    assert n_pos.tolist() == [2, 0, 2] and n_neg.tolist() == [2, 3, 2]


def test_micro_and_macro_differ_on_a_constructed_example():
    # Each class ranks its own positive first (macro = 1), but class B's positive (0.3) falls
    # below class A's negative (0.8) in the pooled ranking. Pooled pairs:
    #   0.9 vs 0.8 → 1, 0.9 vs 0.2 → 1, 0.3 vs 0.8 → 0, 0.3 vs 0.2 → 1  → micro = 3/4
    y = np.array([[1, 0], [0, 0], [0, 1], [0, 0]], dtype=float)
    s = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.3], [0.0, 0.2]])
    mask = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    assert macro_auc(y, s, mask) == 1.0
    assert micro_auc(y, s, mask) == pytest.approx(0.75)
    # with everything known the zeros become real entries and the micro value changes
    assert micro_auc(y, s) != pytest.approx(0.75)


def test_f1_by_hand_with_scalar_and_per_class_thresholds():
    y = np.array([[1, 1], [1, 1], [0, 0], [0, 0], [1, 1]], dtype=float)
    s = np.array([[0.8, 0.8], [0.3, 0.3], [0.6, 0.6], [0.1, 0.1], [0.55, 0.55]])
    # threshold 0.5 → predicted [1, 0, 1, 0, 1]: TP 2, FP 1, FN 1 → F1 = 4 / 6
    per_class, macro = f1_at_threshold(y, s, threshold=0.5)
    assert per_class == pytest.approx([2 / 3, 2 / 3]) and macro == pytest.approx(2 / 3)
    # class 1 at 0.7 → predicted [1, 0, 0, 0, 0]: TP 1, FP 0, FN 2 → F1 = 2 / 4
    per_class, macro = f1_at_threshold(y, s, threshold=np.array([0.5, 0.7]))
    assert per_class == pytest.approx([2 / 3, 0.5]) and macro == pytest.approx(7 / 12)
    # no positives and no predictions: undefined, left out of the macro mean
    per_class, macro = f1_at_threshold(np.c_[y[:, 0], np.zeros(5)], np.c_[s[:, 0], s[:, 0] * 0],
                                       threshold=0.5)
    assert np.isnan(per_class[1]) and macro == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="threshold"):
        f1_at_threshold(y, s, threshold=[0.5, 0.5, 0.5])


def test_average_precision_by_hand():
    # ranking 0.9 (pos) → P 1, R ½;  0.8 (neg);  0.7 (pos) → P 2/3, R 1
    # AP = ½ · 1 + ½ · 2/3 = 5/6
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert per_class_ap(y, s) == pytest.approx([5 / 6])
    assert per_class_ap(y, s)[0] == pytest.approx(average_precision_score(y, s))


def test_bad_inputs_name_the_offending_entry():
    y = np.array([[1, 0], [0, 2]], dtype=float)
    with pytest.raises(ValueError, match="row 1, class 1"):
        check_inputs(y, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="row 0, class 1"):
        check_inputs(np.zeros((2, 2)), np.array([[0.0, np.inf], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="differ in shape"):
        check_inputs(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask must hold 0/1"):
        check_inputs(np.zeros((2, 2)), np.zeros((2, 2)), mask=np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="known"):  # NaN label marked as known by the mask
        check_inputs(np.array([[np.nan]]), np.zeros((1, 1)), mask=np.ones((1, 1)))


def _synthetic(n_patients=80, images_per_patient=2, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    pids = np.repeat([f"p{i}" for i in range(n_patients)], images_per_patient)
    n = len(pids)
    y = (rng.random((n, n_classes)) < 0.3).astype(float)
    s = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(size=(n, n_classes)))))
    return y, s, pids


def test_summarize_matches_the_individual_metrics_and_is_json_ready():
    y, s, pids = _synthetic()
    mask = np.ones_like(y)
    mask[:10, 1] = 0
    y[:, 3] = 0  # class 3 never positive: undefined AUC
    classes = ["Atelectasis", "Effusion", "Mass", "Hernia"]
    per_class, overall = summarize(y, s, classes, mask=mask, patient_ids=pids, n_boot=200,
                                   progress=False)
    assert list(per_class.columns[:8]) == ["class", "n_pos", "n_neg", "auc", "auc_low",
                                           "auc_high", "ap", "f1"]
    assert per_class["class"].tolist() == classes
    n_pos, n_neg = label_counts(y, mask)
    assert per_class["n_pos"].tolist() == n_pos.tolist()
    assert per_class["n_neg"].tolist() == n_neg.tolist() and n_neg[1] == 150 - n_pos[1]
    np.testing.assert_allclose(per_class["auc"], per_class_auc(y, s, mask))
    np.testing.assert_allclose(per_class["ap"], per_class_ap(y, s, mask))
    np.testing.assert_allclose(per_class["f1"], f1_at_threshold(y, s, mask)[0])
    defined = per_class["auc"].notna()
    assert (per_class.loc[defined, "auc_low"] <= per_class.loc[defined, "auc"]).all()
    assert (per_class.loc[defined, "auc"] <= per_class.loc[defined, "auc_high"]).all()
    assert overall["macro_auc"] == pytest.approx(macro_auc(y, s, mask))
    assert overall["micro_auc"] == pytest.approx(micro_auc(y, s, mask))
    assert overall["macro_auc_low"] < overall["macro_auc"] < overall["macro_auc_high"]
    assert overall["micro_auc_low"] < overall["micro_auc"] < overall["micro_auc_high"]
    assert overall["n_classes_undefined"] == 1
    assert overall["n_images"] == 160 and overall["n_patients"] == 80
    assert overall["resampling_unit"] == "patient"
    # plain JSON: NaN is stored as None, so strict JSON encoding works
    text = json.dumps(overall, allow_nan=False)
    assert json.loads(text) == overall
    assert all(isinstance(v, (int, float, str, type(None))) for v in overall.values())


def test_summarize_writes_undefined_overall_values_as_none():
    y = np.zeros((6, 2))
    s = np.random.default_rng(0).random((6, 2))
    per_class, overall = summarize(y, s, ["a", "b"], n_boot=20, progress=False)
    assert per_class["auc"].isna().all()
    assert overall["macro_auc"] is None and overall["micro_auc"] is None
    assert overall["n_classes_undefined"] == 2 and overall["n_patients"] is None
    assert json_ready({"x": np.float32("nan"), "y": np.array([1.5, np.inf])}) == {
        "x": None, "y": [1.5, None]}


def test_compare_models_reports_macro_auc_and_delong_p_per_class():
    rng = np.random.default_rng(5)
    y = (rng.random((400, 3)) < 0.4).astype(float)
    noise = rng.normal(size=(400, 3))
    weak = 0.2 * y + noise
    strong = 3.0 * y + rng.normal(size=(400, 3))
    table = compare_models(y, {"weak": weak, "same": weak.copy(), "strong": strong},
                           reference="weak", classes=["a", "b", "c"])
    assert table["model"].tolist() == ["weak", "same", "strong"]
    assert [c for c in table.columns if c.startswith("p_")] == ["p_a", "p_b", "p_c"]
    ref, same, best = (table.iloc[i] for i in range(3))
    assert ref["is_reference"] and np.isnan([ref["p_a"], ref["p_b"], ref["p_c"]]).all()
    assert ref["macro_auc"] == pytest.approx(macro_auc(y, weak))
    assert best["macro_auc"] == pytest.approx(macro_auc(y, strong))
    assert best["macro_auc_diff"] == pytest.approx(macro_auc(y, strong) - macro_auc(y, weak))
    assert [same["p_a"], same["p_b"], same["p_c"]] == [1.0, 1.0, 1.0]
    assert same["macro_auc_diff"] == 0.0 and same["n_better"] == 0
    assert max(best["p_a"], best["p_b"], best["p_c"]) < 1e-6
    assert best["n_better"] == 3 and best["n_worse"] == 0
    with pytest.raises(KeyError, match="reference"):
        compare_models(y, {"weak": weak}, reference="missing")


def test_constant_scores_are_found_only_among_known_labels():
    scores = np.array([[0.5, 0.1, 0.3], [0.5, 0.2, 0.9], [0.5, 0.3, 0.3]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    # class c varies only on the unknown row, so among known rows it is constant
    assert constant_score_classes(scores, ["a", "b", "c"], mask) == ["a", "c"]
    assert constant_score_classes(scores, ["a", "b", "c"]) == ["a"]
