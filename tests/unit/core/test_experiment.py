"""The notebooks' glue: the data prepared and a run end to end."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cxrstudy.experiment import prepare_data, train_and_evaluate
from cxrstudy.outputs import Outputs
from cxrstudy.tables import best_run_sentence, overall_row, run_metrics
from cxrstudy.train import Schedule


def test_prepare_data_and_train_and_evaluate_write_their_artefacts(tmp_path):
    from cxrstudy.experiment import open_study

    data, out = open_study(tmp_path / "run", "synthetic", None, 32, seed=0, max_images=160,
                           progress=False, n_images=240, n_patients=120)
    assert data.synthetic and out.synthetic
    splits = pd.read_csv(tmp_path / "run/splits.csv")
    assert len(splits) == len(data.train) + len(data.val) + len(data.test)
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    run = train_and_evaluate("resnet18", data, out, Schedule(epochs=2, batch_size=32), n_boot=50,
                             seed=0, progress=False)
    assert list(run.history["epoch"]) == [1, 2]
    assert run.probs.shape == (len(data.test), len(data.classes))
    assert 0.0 <= run.overall["macro_auc"] <= 1.0
    saved = np.load(tmp_path / "run/predictions/resnet18.npz", allow_pickle=False)
    assert np.allclose(saved["probs"], run.probs)
    assert (tmp_path / "run/checkpoints/resnet18/best.pt").is_file()  # marked complete,
    assert not (tmp_path / "run/checkpoints/resnet18/last.pt").exists()  # resume state dropped
    assert (tmp_path / "run/tables/history_resnet18.csv").is_file()
    row = overall_row(run)
    assert row["model"] == "resnet18" and row["epochs"] == 2 and row["best epoch"] in (1, 2)


def test_augmentation_options_and_min_lr_reach_the_trainer(tmp_path):
    from cxrstudy.train import load_checkpoint

    out = Outputs(tmp_path / "run")
    data = prepare_data("synthetic", None, 32, seed=0, max_images=96, progress=False,
                        n_images=120, n_patients=60)
    with pytest.raises(ValueError, match="unknown augmentation keys"):
        Schedule(epochs=1, augment_options={"elastc_p": 0.6})
    recipe = Schedule(epochs=1, batch_size=32, min_lr=1e-5,
                      augment_options={"elastic_p": 0.6, "blur_p": 0.4})
    run = train_and_evaluate("resnet18", data, out, recipe, tag="recipe", n_boot=20,
                             progress=False)
    payload = load_checkpoint(run.checkpoint_dir / "best.pt")
    assert payload["train_config"]["min_lr"] == 1e-5
    metrics = run_metrics({"recipe": run})
    assert metrics["recipe"]["epochs_trained"] == 1
    assert set(metrics["recipe"]["per_class_auc"]) == set(data.classes)
    assert best_run_sentence({"recipe": run}, data).startswith("Best macro AUC: recipe ")


def test_first_batch_is_the_training_loaders_first():
    from _fakes import FAKE_CLASSES, GeneratedCXR
    from cxrstudy.experiment import StudyData, first_batch, make_loaders

    data = StudyData(train=GeneratedCXR(n=20, image_size=16), val=GeneratedCXR(n=6, image_size=16),
                     test=GeneratedCXR(n=6, image_size=16), classes=list(FAKE_CLASSES),
                     image_size=16, dataset="generated")
    batch = first_batch(data, 8, seed=3)
    loader_first = next(iter(make_loaders(data, 8, 3)[0]))
    assert batch["image"].shape == (8, 1, 16, 16) and batch["target"].shape == (8, len(FAKE_CLASSES))
    assert torch.equal(batch["index"], loader_first["index"])
    assert not torch.equal(batch["index"], torch.arange(8))  # shuffled, as training reads it


def test_shared_test_targets_refuses_runs_tested_on_other_rows():
    from cxrstudy.experiment import shared_test_targets

    targets, masks = np.array([[1, 0], [0, 1]]), np.ones((2, 2))
    run = SimpleNamespace(targets=targets, masks=masks, patient_ids=np.array(["p1", "p2"]))
    twin = SimpleNamespace(targets=targets.copy(), masks=masks.copy(),
                           patient_ids=np.array(["p1", "p2"]))
    got_targets, got_masks = shared_test_targets({"a": run, "b": twin})
    assert got_targets is targets and got_masks is masks
    swapped = SimpleNamespace(targets=targets[::-1], masks=masks, patient_ids=np.array(["p2", "p1"]))
    with pytest.raises(ValueError, match="'b' was tested on other rows than 'a'"):
        shared_test_targets({"a": run, "b": swapped})
    with pytest.raises(ValueError, match="no runs"):
        shared_test_targets({})
