"""The one-batch cells of 01, 02 and 03 (the equation meets the code): what each saved, read back.

Each ``check_<notebook>(folder)`` asserts on a folder the notebook wrote with the tiny profile
(also callable on a folder of one's own run); the tests call them on the shared tiny run.
CSVs hold full precision, so "by hand equals the library" is checked to 1e-6 on the file.
"""
import math

import pandas as pd

TOLERANCE = 1e-6


def _table(folder, name):
    return pd.read_csv(folder / "tables" / f"{name}.csv")


def _dims(shape: str) -> list[int]:
    return [int(n) for n in shape.split("×")]


def check_01_baseline(folder):
    """The masked BCE of one batch, by hand from the equation and by cxrstudy.train.masked_bce."""
    loss = _table(folder, "one_batch_loss")
    assert len(loss) == 1
    row = loss.iloc[0]
    assert row["model"] == "efficientvit_m0"
    # tiny: batches of 32 images, NIH's 14 findings, every label known
    assert row["images"] == 32 and row["classes"] == 14
    assert row["known labels Σm"] == 32 * 14
    assert 0 <= row["positives"] <= row["known labels Σm"]
    assert math.isfinite(row["by hand"]) and row["by hand"] > 0
    assert abs(row["by hand"] - row["masked_bce"]) <= TOLERANCE
    assert row["|by hand − masked_bce|"] <= TOLERANCE
    # an untrained network's logits sit near 0, where every entry costs about log 2
    assert 0.3 < row["masked_bce"] < 2.0


def check_02_mxa(folder):
    """The first MXA block step by step (shapes, finite, by hand == library) and both placements."""
    trace = _table(folder, "one_batch_mxa_shapes")
    assert list(trace["step"]) == ["input", "ROI box", "region cropped", "crop", "channel attention",
                                   "after channel attention", "spatial attention", "output"]
    shape = dict(zip(trace["step"], trace["shape"].map(_dims)))
    batch, channels, height, width = shape["input"]
    # tiny: 32 images; EfficientViT-M0's first stage at 64 px is 64 channels on a 4×4 grid
    assert (batch, channels, height, width) == (32, 64, 4, 4)
    assert shape["ROI box"] == shape["region cropped"] == [batch, 4]
    assert shape["crop"] == shape["after channel attention"] == shape["output"] == shape["input"]
    assert shape["channel attention"] == [batch, channels, 1, 1]
    assert shape["spatial attention"] == [batch, 1, height, width]
    assert trace["finite"].all()
    assert (trace["max |by hand − library|"] <= TOLERANCE).all()
    assert ((trace["by hand (mean)"] - trace["library (mean)"]).abs() <= TOLERANCE).all()
    means = trace.set_index("step")["library (mean)"]
    for step in ("ROI box", "region cropped", "channel attention", "spatial attention"):
        assert 0.0 <= means[step] <= 1.0, step  # boxes and sigmoid maps lie in [0, 1]

    placements = _table(folder, "one_batch_mxa_placements").set_index("placement")
    assert list(placements.index) == ["mixer", "block_input"]
    assert (placements["shape MXA sees"] == "×".join(map(str, shape["input"]))).all()
    # one window-attention pass beside MXA; the authors' wiring runs it a second time
    assert placements.loc["mixer", "LWA passes per block"] == 1
    assert placements.loc["block_input", "LWA passes per block"] == 2
    assert placements["parameters"].nunique() == 1  # the same parameters, only the wiring differs
    assert (placements["MXA blocks"] == 6).all()  # M0: 1 + 2 + 3 attention blocks
    assert (placements["output"] == f"{batch}×14").all()
    assert (folder / "figures" / "one_batch_roi.png").stat().st_size > 1000

    arms = _table(folder, "arms")
    assert list(arms["arm"]) == ["baseline", "mxa"]


def check_03_knowledge_distillation(folder):
    """The KD loss of one batch: soft targets, each term by hand beside the library, the sum."""
    terms = _table(folder, "one_batch_kd_loss").set_index("term")
    assert list(terms.index) == ["soft targets", "class term", "distillation term", "loss"]
    assert list(terms["library function"]) == ["teacher_targets (mean)", "masked_bce",
                                               "distillation_bce", "kd_loss"]
    assert terms[["by hand", "library"]].map(math.isfinite).all().all()
    assert ((terms["by hand"] - terms["library"]).abs() <= TOLERANCE).all()
    assert (terms["|by hand − library|"] <= TOLERANCE).all()
    alpha = terms.loc["distillation term", "weight"]
    assert alpha == 0.5 and terms.loc["class term", "weight"] == 1 - alpha
    weighted = ((1 - alpha) * terms.loc["class term", "by hand"]
                + alpha * terms.loc["distillation term", "by hand"])
    assert abs(weighted - terms.loc["loss", "library"]) <= TOLERANCE
    # tiny: 32 images × 14 classes, every label known, the own teacher predicts every class
    assert terms.loc["class term", "entries"] == terms.loc["distillation term", "entries"] == 32 * 14

    soft = _table(folder, "one_batch_soft_targets")
    assert len(soft) == 14 and (soft["teacher covers (w)"] == 1).all()
    targets = [c for c in soft.columns if c.endswith(" σ(t/τ)")]
    logits = [c for c in soft.columns if c.endswith(" t")]
    assert len(targets) == len(logits) == 2
    for target, logit in zip(targets, logits):
        assert soft[target].between(0, 1).all()
        # tau = 1: the soft target is the teacher's probability
        expected = 1 / (1 + soft[logit].map(lambda t: math.exp(-t)))
        assert ((soft[target] - expected).abs() <= TOLERANCE).all()
    labels = [c for c in soft.columns if c.endswith(" y")]
    assert soft[labels].isin([0, 1]).all().all()

    arms = _table(folder, "arms")
    assert list(arms["arm"]) == ["baseline", "authors_baseline", "mxa", "kd", "mxa_kd",
                                 "mxa_kd_differentiable", "mxa_kd_gated"]


def test_baseline_computes_one_batch_loss_by_hand(tiny_results):
    root, _ = tiny_results
    check_01_baseline(root / "01_baseline")


def test_mxa_traces_one_batch_through_the_block(tiny_results):
    root, _ = tiny_results
    check_02_mxa(root / "02_mxa")


def test_distillation_computes_one_batch_loss_by_hand(tiny_results):
    root, _ = tiny_results
    check_03_knowledge_distillation(root / "03_knowledge_distillation")
