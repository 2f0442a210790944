"""The notebooks' glue: subsampling keeps whole patients and the split ratio; a run end to end."""
import json

import numpy as np
import pandas as pd
import pytest

from cxrstudy.data import load_dataset
from cxrstudy.experiment import (best_run_sentence, prepare_data, run_metrics, subsample_patients,
                                 train_and_evaluate)
from cxrstudy.outputs import Outputs
from cxrstudy.train import Schedule


def test_subsample_keeps_whole_patients_and_the_split_ratio():
    ds = load_dataset("synthetic", split="all", image_size=32, n_images=400, n_patients=150, seed=1)
    assignment = ds.split_assignment
    keep = subsample_patients(ds, 200, seed=0, assignment=assignment)
    patients = ds.records["patient_id"].to_numpy()
    kept_patients = set(patients[keep])
    # whole patients: every image of a kept patient is kept
    assert set(np.flatnonzero(np.isin(patients, list(kept_patients)))) == set(keep)
    share = {s: (assignment[keep] == s).mean() for s in ("train", "val", "test")}
    full = {s: (assignment == s).mean() for s in ("train", "val", "test")}
    for split in share:  # the ratio survives (the bug this guards: test and val taken first)
        assert abs(share[split] - full[split]) < 0.06, (split, share, full)
    assert 180 <= len(keep) <= 230
    assert np.array_equal(keep, subsample_patients(ds, 200, seed=0, assignment=assignment))
    assert not np.array_equal(keep, subsample_patients(ds, 200, seed=1, assignment=assignment))


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
    row = run.row()
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
