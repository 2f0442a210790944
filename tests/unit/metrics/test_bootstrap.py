"""Patient-level percentile bootstrap: coverage of the point, width, grouping, seeding; macro
means over the point estimate's class set; paired differences of two models."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrstudy.metrics import (bootstrap_ci, group_codes, macro_auc, macro_auc_over,
                              mean_over_classes, micro_auc, paired_auc_difference,
                              per_class_auc, resample_counts, summarize)


def _data(n, n_classes=3, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_classes)) < 0.3).astype(float)
    s = signal * y + rng.normal(size=(n, n_classes))
    return y, s


def test_interval_contains_the_point_estimate():
    y, s = _data(300)
    groups = np.arange(300) // 3
    per_class = bootstrap_ci(per_class_auc, y, s, groups=groups, n_boot=300, progress=False)
    np.testing.assert_allclose(per_class["point"], per_class_auc(y, s))
    assert np.all(per_class["low"] < per_class["point"])
    assert np.all(per_class["point"] < per_class["high"])
    assert per_class["n_boot"] == 300 and per_class["n_valid"].tolist() == [300] * 3
    macro = bootstrap_ci(macro_auc, y, s, groups=groups, n_boot=300, progress=False)
    assert isinstance(macro["point"], float) and isinstance(macro["n_valid"], int)
    assert macro["point"] == pytest.approx(macro_auc(y, s))
    assert macro["low"] < macro["point"] < macro["high"]


def test_interval_narrows_with_more_data():
    small = bootstrap_ci(macro_auc, *_data(100, seed=1), n_boot=300, progress=False)
    large = bootstrap_ci(macro_auc, *_data(1600, seed=1), n_boot=300, progress=False)
    # 16× the data: the width should shrink about 4×; demand at least 2×
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])


def _recording_metric(store):
    """A metric that stores which rows it saw (row id encoded in column 0 of y_score)."""
    def metric(y_true, y_score, mask):
        store.append(y_score[:, 0].astype(int))
        return 0.0
    return metric


def test_group_resampling_keeps_each_patients_images_together():
    sizes = [1, 2, 3, 4, 1, 5, 2, 2, 3, 1]  # unequal numbers of images per patient
    groups = np.repeat([f"patient{i}" for i in range(len(sizes))], sizes)
    n = len(groups)
    y = np.zeros((n, 1))
    row_ids = np.arange(n, dtype=float)[:, None]
    seen: list[np.ndarray] = []
    bootstrap_ci(_recording_metric(seen), y, row_ids, groups=groups, n_boot=50, progress=False)
    assert len(seen) == 51  # the point estimate, then 50 resamples
    for rows in seen[1:]:
        counts = np.bincount(rows, minlength=n)
        per_patient = []
        for patient in np.unique(groups):
            # every image of a patient appears exactly as often as the patient was drawn
            assert len(set(counts[groups == patient])) == 1
            per_patient.append(counts[groups == patient][0])
        assert sum(per_patient) == len(sizes)  # as many patients drawn as there are
    # without groups, images of one patient are drawn independently (the check above can fail)
    seen_rows: list[np.ndarray] = []
    bootstrap_ci(_recording_metric(seen_rows), y, row_ids, n_boot=50, progress=False)
    split = [any(len(set(np.bincount(r, minlength=n)[groups == p])) > 1 for p in np.unique(groups))
             for r in seen_rows[1:]]
    assert any(split)


def test_seeded_runs_repeat_and_other_seeds_differ():
    y, s = _data(120, seed=2)
    groups = np.arange(120) // 2
    a = bootstrap_ci(per_class_auc, y, s, groups=groups, n_boot=200, seed=7, progress=False)
    b = bootstrap_ci(per_class_auc, y, s, groups=groups, n_boot=200, seed=7, progress=False)
    c = bootstrap_ci(per_class_auc, y, s, groups=groups, n_boot=200, seed=8, progress=False)
    assert np.array_equal(a["low"], b["low"]) and np.array_equal(a["high"], b["high"])
    assert not np.array_equal(a["low"], c["low"])


@pytest.mark.parametrize("metric", [per_class_auc, macro_auc, micro_auc])
def test_vectorised_path_equals_calling_the_metric_on_each_resample(metric):
    y, s = _data(150, seed=3)
    mask = (np.random.default_rng(9).random(y.shape) < 0.8).astype(float)
    groups = np.arange(150) // 3
    fast = bootstrap_ci(metric, y, s, mask, groups=groups, n_boot=150, seed=1, progress=False)
    slow = bootstrap_ci(lambda t, p, m: metric(t, p, m), y, s, mask, groups=groups, n_boot=150,
                        seed=1, progress=False)
    np.testing.assert_allclose(fast["low"], slow["low"], atol=1e-12)
    np.testing.assert_allclose(fast["high"], slow["high"], atol=1e-12)
    assert np.array_equal(fast["n_valid"], slow["n_valid"])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_undefined_resamples_are_skipped_and_counted():
    rng = np.random.default_rng(4)
    n = 60  # 30 patients of 2 images
    groups = np.arange(n) // 2
    y = np.zeros((n, 2))
    y[rng.random(n) < 0.4, 0] = 1
    y[[0, 1], 1] = 1  # class 1: a single positive patient
    s = rng.random((n, 2)) + y
    result = bootstrap_ci(per_class_auc, y, s, groups=groups, n_boot=400, seed=0,
                          progress=False)
    assert result["n_valid"][0] == 400
    # P(patient 0 never drawn in 30 draws) = (29/30)^30 ≈ 0.36, so ≈ 256 valid of 400
    assert 200 < result["n_valid"][1] < 310
    assert np.isfinite(result["low"]).all()
    # sklearn gives NaN (older versions raise ValueError) on one-class resamples: either way
    # they are counted alike, and the remaining values equal the rank-based ones
    def sklearn_auc(t, p, m):
        return roc_auc_score(t[:, 1], p[:, 1])
    via_sklearn = bootstrap_ci(sklearn_auc, y, s, groups=groups, n_boot=400, seed=0,
                               progress=False)
    assert via_sklearn["n_valid"] == result["n_valid"][1]
    assert via_sklearn["low"] == pytest.approx(result["low"][1], abs=1e-12)
    assert via_sklearn["high"] == pytest.approx(result["high"][1], abs=1e-12)

    def raising_auc(t, p, m):
        if t[:, 1].min() == t[:, 1].max():
            raise ValueError("Only one class present in y_true")
        return roc_auc_score(t[:, 1], p[:, 1])
    via_raise = bootstrap_ci(raising_auc, y, s, groups=groups, n_boot=400, seed=0,
                             progress=False)
    assert via_raise["n_valid"] == result["n_valid"][1]
    assert via_raise["low"] == pytest.approx(result["low"][1], abs=1e-12)


def test_resample_counts_draw_whole_groups():
    codes = np.array([0, 0, 1, 2, 2, 2])
    chunks = list(resample_counts(np.random.default_rng(0), codes, 3, 10))
    counts = np.concatenate(chunks)
    assert counts.shape == (10, 6)
    assert (counts[:, 0] == counts[:, 1]).all() and (counts[:, 3] == counts[:, 5]).all()
    assert (counts[:, [0, 2, 3]].sum(axis=1) == 3).all()  # three patients drawn each time


def test_bad_arguments_are_rejected():
    y, s = _data(20)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(macro_auc, y, s, groups=np.arange(19), progress=False)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(macro_auc, y, s, alpha=1.5, progress=False)


# ---- macro means over a fixed class set -------------------------------------------------

def test_mean_over_classes_averages_a_fixed_set_or_gives_nan():
    values = np.array([[0.6, np.nan, 0.8], [0.5, 0.7, 0.9]])
    np.testing.assert_allclose(mean_over_classes(values, [0, 2]), [0.7, 0.7])
    np.testing.assert_allclose(mean_over_classes(values, np.array([True, True, False])),
                               [np.nan, 0.6])  # the first row lost class 1: no value
    assert np.isnan(mean_over_classes(values, [])).all()
    with pytest.raises(ValueError, match="class mask"):
        mean_over_classes(values, np.array([True, False]))


def _rare_class_case():
    """20 patients of 2 images; class 0 common, class 1 positive on patient 0's images only."""
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(20), 2)
    y = np.zeros((40, 2))
    y[rng.random(40) < 0.4, 0] = 1
    y[[0, 1], 1] = 1
    s = rng.random((40, 2)) + 0.5 * y
    return y, s, groups


def test_summarize_macro_interval_keeps_the_point_estimates_classes():
    y, s, groups = _rare_class_case()
    n_boot, seed = 200, 3
    _, overall = summarize(y, s, ["common", "rare"], patient_ids=groups, n_boot=n_boot,
                           seed=seed, progress=False)
    assert overall["macro_auc"] == pytest.approx(macro_auc(y, s))  # the point is unchanged
    # by hand: the same resamples (same generator, same draws), each row repeated as often as
    # its patient was drawn; a resample without patient 0 has no AUC for "rare": skipped
    codes, n_groups = group_codes(groups, len(y))
    kept, lost, old_rule = [], 0, []
    for counts in resample_counts(np.random.default_rng(seed), codes, n_groups, n_boot):
        for row_counts in counts:
            rows = np.repeat(np.arange(len(y)), row_counts)
            common = roc_auc_score(y[rows, 0], s[rows, 0])
            if y[rows, 1].any():
                kept.append((common + roc_auc_score(y[rows, 1], s[rows, 1])) / 2)
                old_rule.append(kept[-1])
            else:
                lost += 1
                old_rule.append(common)  # what averaging the resample's own classes gave
    assert 0 < lost < n_boot  # P(patient 0 not drawn) = (19/20)^20 ≈ 0.36
    assert overall["macro_auc_resamples_skipped"] == lost
    assert overall["macro_auc_n_valid"] == n_boot - lost == len(kept)
    assert overall["macro_auc_low"] == pytest.approx(np.quantile(kept, 0.025), abs=1e-12)
    assert overall["macro_auc_high"] == pytest.approx(np.quantile(kept, 0.975), abs=1e-12)
    assert overall["macro_auc_low"] != pytest.approx(np.quantile(old_rule, 0.025), abs=1e-6)
    # bootstrap_ci(macro_auc) fixes the same class set (macro_auc.for_bootstrap); the loop
    # over resamples of the fixed-set metric gives the same values as the vectorised path
    macro = bootstrap_ci(macro_auc, y, s, groups=groups, n_boot=n_boot, seed=seed,
                         progress=False)
    assert macro["n_valid"] == n_boot - lost
    assert macro["low"] == pytest.approx(overall["macro_auc_low"], abs=1e-12)
    fixed = macro_auc_over([0, 1])
    slow = bootstrap_ci(lambda t, p, m: fixed(t, p, m), y, s, groups=groups, n_boot=n_boot,
                        seed=seed, progress=False)
    assert slow["n_valid"] == macro["n_valid"]
    assert slow["low"] == pytest.approx(macro["low"], abs=1e-12)
    assert slow["high"] == pytest.approx(macro["high"], abs=1e-12)


def test_summarize_macro_set_leaves_out_a_class_without_positives():
    y, s, groups = _rare_class_case()
    y[:, 1] = 0  # "rare" has no positive at all: not in the point estimate, so never missed
    _, overall = summarize(y, s, ["common", "rare"], patient_ids=groups, n_boot=100,
                           progress=False)
    assert overall["n_classes_undefined"] == 1
    assert overall["macro_auc_resamples_skipped"] == 0 and overall["macro_auc_n_valid"] == 100


# ---- paired differences ------------------------------------------------------------------

def test_paired_difference_of_a_model_with_itself_is_zero_with_a_zero_interval():
    y, s, groups = _rare_class_case()
    per_class, sets = paired_auc_difference(y, s, s.copy(), ["common", "rare"],
                                            patient_ids=groups, n_boot=100, progress=False,
                                            class_sets={"both": ["common", "rare"]})
    assert per_class["delta"].tolist() == [0.0, 0.0]
    assert per_class["delta_low"].tolist() == [0.0, 0.0]
    assert per_class["delta_high"].tolist() == [0.0, 0.0]
    row = sets.iloc[0]
    assert (row["delta"], row["delta_low"], row["delta_high"]) == (0.0, 0.0, 0.0)
    assert row["classes"] == "common, rare" and row["n_classes"] == 2
    assert 0 < row["resamples_skipped"] == 100 - row["n_valid"] == 100 - per_class["n_valid"][1]


def test_paired_difference_uses_the_same_resamples_for_both_models():
    y, s, groups = _rare_class_case()
    other = np.random.default_rng(11).random(s.shape) + 0.2 * y
    n_boot, seed = 150, 4
    per_class, sets = paired_auc_difference(y, s, other, ["common", "rare"], patient_ids=groups,
                                            n_boot=n_boot, seed=seed, progress=False,
                                            class_sets={"common only": ["common"],
                                                        "both": ["rare", "common"]})
    assert per_class["delta"].to_numpy() == pytest.approx(
        per_class_auc(y, s) - per_class_auc(y, other))
    assert per_class["n_pos"].tolist() == [int(y[:, 0].sum()), 2]
    codes, n_groups = group_codes(groups, len(y))
    common, both = [], []
    for counts in resample_counts(np.random.default_rng(seed), codes, n_groups, n_boot):
        for row_counts in counts:
            rows = np.repeat(np.arange(len(y)), row_counts)
            delta = [roc_auc_score(y[rows, c], s[rows, c])
                     - roc_auc_score(y[rows, c], other[rows, c])
                     if y[rows, c].any() else np.nan for c in (0, 1)]
            common.append(delta[0])
            if np.isfinite(delta[1]):
                both.append(np.mean(delta))
    rows = sets.set_index("set")
    assert rows.loc["common only", "delta_low"] == pytest.approx(np.quantile(common, 0.025),
                                                                 abs=1e-12)
    assert rows.loc["both", "n_valid"] == len(both)
    assert rows.loc["both", "delta_high"] == pytest.approx(np.quantile(both, 0.975), abs=1e-12)
    assert per_class["delta_high"][0] == pytest.approx(np.quantile(common, 0.975), abs=1e-12)


def test_paired_difference_checks_its_class_sets():
    y, s, groups = _rare_class_case()
    with pytest.raises(ValueError, match="class set 'small' names classes not among the "
                                         "scores: Mass"):
        paired_auc_difference(y, s, s, ["common", "rare"], class_sets={"small": ["Mass"]},
                              progress=False)
