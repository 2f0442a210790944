"""05's and 06's first cells: each paper's mechanism on one real batch of the tiny run, what the
tables say and that the hand computations beside them agree with the library (within 1e-6).

The tiny profile (params/tiny.yaml): 240 NIH sample images at 64 px, 14 classes, batch 32;
05 a deit_tiny (patch 16: a 4×4 grid of 16 tokens) under a 64-wide decoder, 06 two resnet18
(512 channels, stride 32: a 2×2 map, nothing projected). ``check_glori`` and
``check_cross_attention`` take a run's folder, so they can be pointed at any run of that profile.
"""
import numpy as np
import pandas as pd

CLASSES = 14
TOLERANCE = 1e-6


def check_glori(folder):
    """05's ``one_batch_attention``: one row per class, queries d = 64, N = 16 tokens on a 4×4
    grid, each class's attention a distribution over them, the softmax by hand agreeing."""
    table = pd.read_csv(folder / "tables/one_batch_attention.csv")
    assert len(table) == CLASSES and table["class"].is_unique
    assert set(table["d"]) == {64} and set(table["N"]) == {16} and set(table["grid"]) == {"4×4"}
    numbers = table[["Σ_n A_cn", "max A_cn", "max |hand − module|"]].to_numpy(dtype=float)
    assert np.isfinite(numbers).all()
    assert np.abs(table["Σ_n A_cn"] - 1).max() < TOLERANCE
    # a distribution over 16 patches: its largest weight at least the uniform 1/16, at most 1
    assert table["max A_cn"].between(1 / 16 - TOLERANCE, 1).all()
    assert (table["max |hand − module|"] < TOLERANCE).all()
    patches = table["most attended patch"].str.extract(r"\((\d+), (\d+)\)").astype(int)
    assert patches.notna().all().all() and patches.isin(range(4)).all().all()
    assert (folder / "figures/one_image_attention.png").stat().st_size > 1000


def check_cross_attention(folder):
    """06's ``one_batch_cross_attention``: the feature maps, their product and the attention on
    one batch of 32 (shapes, a_i inside (0, 1)), a_i at one position and the balance loss by
    hand agreeing with the library."""
    table = pd.read_csv(folder / "tables/one_batch_cross_attention.csv").set_index("quantity")
    shapes = table["shape"].to_dict()
    for name in ("f₁ (network 1's feature map)", "f₂ (network 2's feature map)",
                 "p₁ (f₁ projected)", "p₂ (f₂ projected, on p₁'s grid)", "p₁ ⊙ p₂"):
        assert shapes[name] == "32×512×2×2", name
    attention = [q for q in table.index if q.startswith("a") and "σ" in q]
    assert len(attention) == 2
    for name in attention:
        assert shapes[name] == "32×1×2×2"
        assert 0 < table.loc[name, "min"] <= table.loc[name, "max"] < 1
    assert shapes["z (mean logits)"] == f"32×{CLASSES}"
    ranges = table.dropna(subset=["min"])
    assert len(ranges) == 8 and np.isfinite(ranges[["min", "max"]].to_numpy(dtype=float)).all()
    # resnet18's features come out of a ReLU, so the product of the two maps is never negative
    assert table.loc["p₁ ⊙ p₂", "min"] >= 0
    checks = table.dropna(subset=["by hand"])
    assert [q.split(" ")[0] for q in checks.index] == ["a₁", "a₂", "balance"]
    values = checks[["by hand", "library", "|hand − library|"]].to_numpy(dtype=float)
    assert np.isfinite(values).all()
    assert np.allclose(checks["|hand − library|"], (checks["by hand"] - checks["library"]).abs(),
                       atol=1e-12)
    assert (checks["|hand − library|"] < TOLERANCE).all()
    assert checks["library"].iloc[:2].between(0, 1, inclusive="neither").all()
    assert checks["library"].iloc[2] > 0  # a loss on a batch with known labels
    assert (folder / "figures/one_batch_cross_attention.png").stat().st_size > 1000


def test_glori_cell_shows_the_class_queries_attending_over_one_image(tiny_results):
    check_glori(tiny_results[0] / "05_glori")


def test_cross_attention_cell_shows_the_equations_on_one_batch(tiny_results):
    check_cross_attention(tiny_results[0] / "06_cross_attention")
