"""evaluate_checkpoint end to end: tiny trained checkpoint, fabricated PNG dataset whose label
space only partly matches the model's."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import cxrstudy.data as data
from cxrstudy.data.base import CXRDataset, read_image_file
from cxrstudy.evaluate import evaluate_checkpoint, main_evaluate
from cxrstudy.train.checkpoint import load_model_from_checkpoint
from cxrstudy.models import create_model, register_model
from cxrstudy.train import TrainConfig, Trainer, seed_everything

MODEL_CLASSES = ["alpha", "Beta", "Effusion", "Omega"]
DATASET_CLASSES = ["Alpha", "Beta", "Gamma", "Pleural Effusion"]
N_IMAGES, SOURCE_SIZE, MODEL_SIZE = 40, 24, 16


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_chans):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4, num_classes)

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


@register_model("test_evaluate_net", overwrite=True)
def build_tiny_net(num_classes, in_chans, image_size, pretrained=False, **kwargs):
    return TinyNet(num_classes, in_chans)


class FakePNGDataset(CXRDataset):
    """PNG files plus labels.csv in a folder; the first half of the patients is the test split."""

    name = "fake-test"
    classes = DATASET_CLASSES

    def __init__(self, root=None, image_size: int = 16, strict: bool = False):
        super().__init__(image_size=image_size, strict=strict)
        self.root = root
        table = pd.read_csv(f"{root}/labels.csv")
        self.records = table[["image_id", "patient_id", "view", "sex", "age",
                              "official_split"]].copy()
        self.labels = table[DATASET_CLASSES].to_numpy(dtype=np.float32)
        self.validate()

    def read_image(self, i: int) -> np.ndarray:
        return read_image_file(f"{self.root}/{self.records.at[i, 'image_id']}")


def write_fake_dataset(root) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    labels = (rng.random((N_IMAGES, len(DATASET_CLASSES))) > 0.5).astype(np.float32)
    labels[::6, 1] = np.nan  # some Beta labels unknown
    rows = []
    for i in range(N_IMAGES):
        pixels = (rng.random((SOURCE_SIZE, SOURCE_SIZE)) * 80).astype(np.uint8)
        pixels[:12, :12] += np.uint8(150 * labels[i, 0])  # Alpha is visible top-left
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
        rows.append({"image_id": f"img{i:03d}.png", "patient_id": f"p{i // 2:02d}",
                     "view": "PA", "sex": "F", "age": 40 + i,
                     "official_split": "test" if i < N_IMAGES // 2 else "train"})
    table = pd.DataFrame(rows)
    for c, name in enumerate(DATASET_CLASSES):
        table[name] = labels[:, c]
    table.to_csv(root / "labels.csv", index=False)
    return table


@pytest.fixture
def fake_dataset(tmp_path):
    root = tmp_path / "fake"
    root.mkdir()
    table = write_fake_dataset(root)
    data.register_dataset("fake-test", FakePNGDataset)
    yield root, table
    data._ADAPTERS.pop("fake-test", None)


@pytest.fixture
def trained_run(tmp_path):
    """A one-epoch run of the tiny net with EMA, saved under tmp_path/run."""
    enabled = torch.are_deterministic_algorithms_enabled()
    seed_everything(0)
    model = create_model("test_evaluate_net", num_classes=len(MODEL_CLASSES),
                         image_size=MODEL_SIZE)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(8, 1, MODEL_SIZE, MODEL_SIZE, generator=g),
                "target": (torch.rand(8, 4, generator=g) > 0.5).float(),
                "mask": torch.ones(8, 4), "index": torch.arange(8)} for _ in range(3)]
    trainer = Trainer(model, TrainConfig(epochs=1, lr=0.01, ema_decay=0.5, progress=False,
                                         cpu=True, checkpoint_dir=str(tmp_path / "run")),
                      class_names=MODEL_CLASSES)
    trainer.fit(batches, batches)
    yield tmp_path / "run", trainer
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def test_checkpoint_rebuilds_the_model_with_its_ema_weights(trained_run):
    run_dir, trainer = trained_run
    model, meta = load_model_from_checkpoint(run_dir / "best.pt")
    assert meta["weights"] == "ema" and meta["class_names"] == MODEL_CLASSES
    assert meta["epoch"] == 1 and meta["model_config"]["name"] == "test_evaluate_net"
    x = torch.rand(5, 1, MODEL_SIZE, MODEL_SIZE)
    with torch.no_grad():
        assert torch.allclose(model(x), trainer.ema.module.eval()(x), atol=1e-6)
    raw, raw_meta = load_model_from_checkpoint(run_dir, use_ema=False)  # a folder → best.pt
    assert raw_meta["weights"] == "model" and raw_meta["path"].endswith("best.pt")
    with torch.no_grad():
        assert torch.allclose(raw(x), trainer.unwrapped_model.eval()(x), atol=1e-6)


def test_evaluation_matches_classes_by_name_and_reports_the_rest(trained_run, fake_dataset,
                                                                 tmp_path):
    run_dir, _ = trained_run
    root, table = fake_dataset
    out = tmp_path / "metrics" / "fake.json"
    result = evaluate_checkpoint(run_dir / "best.pt", "fake-test", root=root, split="test",
                                 out=out, batch_size=8, n_boot=20, progress=False)

    assert result["unmatched_model_classes"] == ["Omega"]
    assert result["unmatched_dataset_classes"] == ["Gamma"]
    assert result["matched_classes"] == [{"model": "alpha", "dataset": "Alpha"},
                                         {"model": "Beta", "dataset": "Beta"},
                                         {"model": "Effusion", "dataset": "Pleural Effusion"}]
    assert result["image_size"] == MODEL_SIZE  # taken from the checkpoint
    assert result["n_images"] == int((table["official_split"] == "test").sum())

    written = json.loads(out.read_text())
    assert written["unmatched_model_classes"] == ["Omega"]
    per_class = {row["class"]: row for row in written["per_class"]}
    assert list(per_class) == ["Alpha", "Beta", "Pleural Effusion"]
    assert [row["model_class"] for row in written["per_class"]] == ["alpha", "Beta", "Effusion"]
    test_rows = table[table["official_split"] == "test"]
    for name, row in per_class.items():
        assert 0.0 <= row["auc"] <= 1.0
        known = test_rows[name].dropna()
        assert row["n_pos"] == int(known.sum()) and row["n_neg"] == int((known == 0).sum())
    assert written["overall"]["n_classes"] == 3
    assert written["overall"]["n_patients"] == test_rows["patient_id"].nunique()

    with pytest.raises(FileExistsError, match="overwrite"):
        evaluate_checkpoint(run_dir / "best.pt", "fake-test", root=root, out=out, n_boot=5,
                            progress=False)


def test_per_class_auc_is_computed_on_the_matched_columns(trained_run, fake_dataset):
    """The Alpha AUC equals one computed by hand from the model's 'alpha' output."""
    from sklearn.metrics import roc_auc_score

    run_dir, _ = trained_run
    root, table = fake_dataset
    result = evaluate_checkpoint(run_dir, "fake-test", root=root, split="test", n_boot=5,
                                 progress=False)
    model, _ = load_model_from_checkpoint(run_dir)
    ds = data.load_dataset("fake-test", root=root, split="test", image_size=MODEL_SIZE)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        alpha_scores = torch.sigmoid(model(images))[:, MODEL_CLASSES.index("alpha")].numpy()
    expected = roc_auc_score(ds.labels[:, 0], alpha_scores)
    alpha = next(r for r in result["per_class"] if r["class"] == "Alpha")
    assert alpha["auc"] == pytest.approx(expected, abs=1e-6)


def test_command_line_entry_point(trained_run, fake_dataset, tmp_path, capsys):
    run_dir, _ = trained_run
    root, _ = fake_dataset
    out = tmp_path / "cli.json"
    args = argparse.Namespace(checkpoint=str(run_dir / "best.pt"), dataset="fake-test",
                              root=str(root), split="test", image_size=None, batch_size=8,
                              n_boot=5, out=str(out))
    assert main_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "macro AUC" in printed and "Omega" in printed and "Gamma" in printed
    assert json.loads(out.read_text())["split"] == "test"

    args.checkpoint, args.out = str(tmp_path / "missing.pt"), str(tmp_path / "other.json")
    assert main_evaluate(args) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_checkpoints_without_class_names_are_refused(trained_run, fake_dataset, tmp_path):
    run_dir, _ = trained_run
    root, _ = fake_dataset
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    payload["class_names"] = None
    torch.save(payload, tmp_path / "nameless.pt")
    with pytest.raises(ValueError, match="no class names"):
        evaluate_checkpoint(tmp_path / "nameless.pt", "fake-test", root=root, progress=False)


class SeededFakeDataset(FakePNGDataset):
    """The same files without official splits: the split is drawn from the seed."""

    name = "fake-seeded"

    def __init__(self, root=None, image_size: int = 16, strict: bool = False):
        super().__init__(root, image_size, strict)
        self.records = self.records.drop(columns=["official_split"])


def test_the_split_is_drawn_with_the_checkpoints_seed_and_overlap_is_warned(
        trained_run, fake_dataset, tmp_path):
    from cxrstudy.data.splits import assign_splits

    run_dir, _ = trained_run
    root, _ = fake_dataset
    data.register_dataset("fake-seeded", SeededFakeDataset)
    try:
        payload = torch.load(run_dir / "best.pt", weights_only=True)
        payload["train_config"]["seed"] = 7
        run = tmp_path / "study" / "01_baseline"
        (run / "checkpoints" / "net").mkdir(parents=True)
        torch.save(payload, run / "checkpoints" / "net" / "best.pt")
        full = SeededFakeDataset(root, MODEL_SIZE)
        assignment = assign_splits(full, seed=7)
        table = full.records[["image_id", "patient_id"]].assign(split=assignment)
        table.to_csv(run / "splits.csv", index=False)

        result = evaluate_checkpoint(run / "checkpoints" / "net", "fake-seeded", root=root,
                                     n_boot=5, progress=False)
        assert (result["split_seed"], result["split_seed_from"]) == (7, "checkpoint")
        assert result["n_images"] == int((assignment == "test").sum())
        assert result["training_patients_in_split"] == 0

        # another seed draws other test patients, some of which the model trained on
        with pytest.warns(UserWarning, match="training or validation split"):
            other = evaluate_checkpoint(run / "checkpoints" / "net", "fake-seeded", root=root,
                                        n_boot=5, seed=0, progress=False)
        expected = set(table.loc[table["split"] != "test", "patient_id"].astype(str)) & set(
            full.records.loc[assign_splits(full, seed=0) == "test", "patient_id"].astype(str))
        assert other["split_seed_from"] == "--seed" and expected
        assert other["training_patients_in_split"] == len(expected)
    finally:
        data._ADAPTERS.pop("fake-seeded", None)
