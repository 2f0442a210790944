"""Notebook 04's one-batch cell: the MLCAK loss's terms on one real training batch of the tiny
profile (teacher 56 px, student 28 px, a 7×7 token grid), each computed by hand beside
``mlcak_loss``'s own value, the attention maps' shapes, and the teacher-vs-student figure."""
import numpy as np
import pandas as pd

TERMS = ["local BCE", "global BCE", "local logit KD", "global logit KD", "attention", "total"]


def check_low_resolution(folder):
    """Assert on what the one-batch cell of a tiny run of 04 wrote into ``folder``."""
    terms = pd.read_csv(folder / "tables/one_batch_loss.csv")
    assert list(terms["term"]) == TERMS
    values = terms[["by hand", "mlcak_loss", "weighted"]].to_numpy(dtype=float)
    assert np.isfinite(values).all()
    # every term by hand (float64, from the logits, labels and maps) equals the library's
    assert np.allclose(terms["by hand"], terms["mlcak_loss"], rtol=0, atol=1e-6)
    parts, total = terms.iloc[:-1], terms.iloc[-1]
    # the tiny profile's α = β = 1, γ = 1000; L_cls's two parts weigh 1
    assert list(parts["weight"]) == [1.0, 1.0, 1.0, 1.0, 1000.0]
    assert np.allclose(parts["weighted"], parts["weight"] * parts["mlcak_loss"], rtol=0, atol=1e-9)
    assert abs(parts["weighted"].sum() - total["mlcak_loss"]) <= 1e-6
    assert (parts["mlcak_loss"] > 0).all()  # every weight is positive, so every term was computed

    levels = pd.read_csv(folder / "tables/one_batch_attention.csv")
    # deit_tiny has 12 blocks: three evenly spaced pairs ending at the last block
    assert list(zip(levels["student block"], levels["teacher block"])) == [(3, 3), (7, 7), (11, 11)]
    # a 32-image batch; 7×7 patches + CLS = 50 tokens on both sides (56 px / patch 8, 28 px / 4)
    assert set(levels["teacher grid"]) == {"7×7"} and set(levels["student grid"]) == {"7×7"}
    for column in ("teacher map", "aligned teacher map", "student map"):
        assert set(levels[column]) == {"32×50×50"}, column
    attention = terms.set_index("term").loc["attention", "mlcak_loss"]
    assert abs(levels["MSE(A_s, A_t)"].sum() - attention) <= 1e-9

    assert (folder / "figures/one_batch_attention_maps.png").stat().st_size > 1000


def test_one_batch_cell_writes_the_loss_terms_and_the_maps(tiny_results):
    check_low_resolution(tiny_results[0] / "04_low_resolution")
