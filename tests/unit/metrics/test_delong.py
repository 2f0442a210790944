"""DeLong test and interval against a slow definition-based reference and known properties."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cxrstudy.metrics import (delong_ci, delong_covariance, delong_per_class, delong_test,
                              pooled_delong_p)

def _slow_delong_covariance(labels, score_sets):
    """DeLong et al. (1988) written out with the m × n matrix of ψ(X_i, Y_j)."""
    labels = np.asarray(labels, dtype=bool)
    v10, v01, aucs = [], [], []
    for scores in score_sets:
        x, y = scores[labels], scores[~labels]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    m, n = labels.sum(), (~labels).sum()
    s10 = np.atleast_2d(np.cov(np.array(v10)))
    s01 = np.atleast_2d(np.cov(np.array(v01)))
    return np.array(aucs), s10 / m + s01 / n


def test_identical_scores_give_z_zero_and_p_one():
    rng = np.random.default_rng(0)
    y = rng.random(80) < 0.4
    s = rng.random(80) + y
    result = delong_test(y, s, s.copy())
    assert result["z"] == 0.0 and result["p_value"] == 1.0 and result["diff"] == 0.0
    assert result["auc_a"] == result["auc_b"] == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("seed", [1, 2])
def test_covariance_equals_the_slow_structural_components(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(150) < 0.35
    a = rng.integers(0, 7, 150) + 1.5 * y          # many ties
    b = a + rng.normal(scale=2.0, size=150)         # correlated with a
    auc, cov = delong_covariance(y, np.vstack([a, b]))
    slow_auc, slow_cov = _slow_delong_covariance(y, [a, b])
    np.testing.assert_allclose(auc, slow_auc, atol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, rtol=1e-10, atol=1e-15)
    result = delong_test(y, a, b)
    slow_var = slow_cov[0, 0] + slow_cov[1, 1] - 2 * slow_cov[0, 1]
    assert result["var"] == pytest.approx(slow_var, rel=1e-10)
    z = (slow_auc[0] - slow_auc[1]) / np.sqrt(slow_var)
    assert result["z"] == pytest.approx(z, rel=1e-10)
    assert result["p_value"] == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)
    auc_a, low, high = delong_ci(y, a)
    half = norm.ppf(0.975) * np.sqrt(slow_cov[0, 0])
    assert (auc_a, low, high) == pytest.approx((slow_auc[0], slow_auc[0] - half,
                                                slow_auc[0] + half), abs=1e-12)


def test_strongly_better_model_gets_a_small_p_value():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.4
    strong = 2.5 * y + rng.normal(size=300)
    weak = 0.3 * y + rng.normal(size=300)
    result = delong_test(y, strong, weak)
    assert result["diff"] > 0.2 and result["z"] > 0 and result["p_value"] < 1e-6


def test_per_class_uses_known_rows_and_marks_undefined_classes():
    rng = np.random.default_rng(4)
    y = (rng.random((120, 3)) < 0.4).astype(float)
    a = y + rng.normal(size=(120, 3))
    b = 0.5 * y + rng.normal(size=(120, 3))
    mask = (rng.random((120, 3)) < 0.8).astype(float)
    y[:, 2] = 0
    y[mask[:, 2] == 0, 2] = 1  # class 2's positives are all unknown
    table = delong_per_class(y, a, b, mask, classes=["a", "b", "c"])
    assert table["class"].tolist() == ["a", "b", "c"]
    for c in range(2):
        keep = mask[:, c] == 1
        expected = delong_test(y[keep, c], a[keep, c], b[keep, c])
        row = table.iloc[c]
        assert row["n_pos"] == y[keep, c].sum() and row["n_neg"] == (1 - y[keep, c]).sum()
        assert row["p_value"] == pytest.approx(expected["p_value"], rel=1e-12)
        assert row["auc_a"] == pytest.approx(roc_auc_score(y[keep, c], a[keep, c]))
    assert table.iloc[2]["n_pos"] == 0
    assert np.isnan(table.iloc[2][["auc_a", "auc_b", "z", "p_value"]].astype(float)).all()


def test_degenerate_inputs():
    one_positive = delong_test([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3], [0.5, 0.1, 0.2, 0.3])
    assert one_positive["auc_a"] == 1.0 and np.isnan(one_positive["p_value"])  # no covariance
    assert np.isnan(delong_ci([0, 0, 0], [0.1, 0.2, 0.3])).all()
    with pytest.raises(ValueError, match="1-D"):
        delong_test(np.zeros((3, 2)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="row 1"):
        delong_test([1, 0, 1], [0.1, np.nan, 0.3], [0.1, 0.2, 0.3])


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
