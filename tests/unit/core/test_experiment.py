"""The notebooks' glue: the data prepared and a run end to end."""
import json

import numpy as np
import pandas as pd
import pytest

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
