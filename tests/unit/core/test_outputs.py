"""Outputs owns the layout of ``results/<profile>/<notebook>/``: every path it gives is the one
users' results folders already hold (written out by hand here), other notebooks' folders are
opened read-only, and whether the data was synthetic is fixed when the folder is opened."""
import json

import pandas as pd
import pytest

from cxrstudy.outputs import Outputs, profile_dir


def test_the_layout_is_the_one_results_folders_already_have(tmp_path):
    out = Outputs(tmp_path / "tiny" / "01_baseline")
    run = tmp_path / "tiny" / "01_baseline"
    assert out.root == run and out.name == "01_baseline"
    assert out.profile_dir == tmp_path / "tiny"
    assert profile_dir(tmp_path, "tiny") == tmp_path / "tiny"
    assert out.metrics_file == run / "metrics.json"
    assert out.provenance_file == run / "provenance.json"
    assert out.splits_file == run / "splits.csv"
    assert out.executed_notebook == run / "01_baseline.ipynb"
    assert out.figures == run / "figures" and out.tables == run / "tables"
    assert out.checkpoint_dir("densenet121") == run / "checkpoints" / "densenet121"
    assert out.predictions_file("densenet121") == run / "predictions" / "densenet121.npz"
    assert out.backbone_file("fine_tune") == run / "backbones" / "fine_tune.pt"
    assert out.lock_file == tmp_path / "tiny" / ".01_baseline.lock"
    assert out.archive_dir("20250101-120000") == (tmp_path / "tiny" / "_previous"
                                                  / "01_baseline-20250101-120000")
    assert not run.exists()  # naming a path creates nothing


def test_checkpoint_dirs_lists_run_folders_in_tag_order(tmp_path):
    out = Outputs(tmp_path / "05_glori")
    assert out.checkpoint_dirs() == []
    for tag in ("glori_1", "baseline"):
        out.checkpoint_dir(tag).mkdir(parents=True)
    (tmp_path / "05_glori" / "checkpoints" / "notes.txt").write_text("not a run")
    assert [p.name for p in out.checkpoint_dirs()] == ["baseline", "glori_1"]


def test_a_sibling_is_the_other_notebook_of_the_same_profile_and_read_only(tmp_path):
    out = Outputs(tmp_path / "tiny" / "03_knowledge_distillation")
    baseline = out.sibling("01_baseline")
    assert baseline.root == tmp_path / "tiny" / "01_baseline"
    assert baseline.checkpoint_dir("densenet121") == tmp_path / "tiny/01_baseline/checkpoints/densenet121"
    assert not baseline.writable and out.writable
    with pytest.raises(PermissionError, match="read-only"):
        baseline.save_metrics(macro_auc=0.5)
    with pytest.raises(PermissionError, match="read-only"):
        baseline.save_table(pd.DataFrame({"a": [1]}), "t")
    assert not (tmp_path / "tiny" / "01_baseline").exists()
    assert Outputs.of_notebook(tmp_path / "tiny", "01_baseline").root == baseline.root


def test_synthetic_is_set_when_the_folder_is_opened_and_never_later(tmp_path):
    out = Outputs(tmp_path / "01_baseline", synthetic=True)
    out.save_table(pd.DataFrame({"split": ["train"], "images": [3]}), "splits", caption="Splits")
    assert (tmp_path / "01_baseline/tables/splits.md").read_text().startswith(
        "Splits — SYNTHETIC DATA (procedural phantom, not radiographs)\n")
    out.save_metrics(macro_auc=0.5)
    assert json.loads(out.metrics_file.read_text()) == {"macro_auc": 0.5, "synthetic_data": True}
    with pytest.raises(AttributeError):
        out.synthetic = False
    # a real-data folder says nothing; a read-only view reports what the run recorded
    real = Outputs(tmp_path / "02_mxa")
    real.save_metrics(macro_auc=0.6)
    assert "synthetic_data" not in real.load_metrics() and not real.synthetic
    assert Outputs.read_only(tmp_path / "01_baseline").synthetic
    assert not Outputs.read_only(tmp_path / "02_mxa").synthetic


def test_splits_are_written_and_read_back_with_string_ids(tmp_path):
    out = Outputs(tmp_path / "01_baseline")
    assert out.load_splits() is None and out.trained_on() == set()
    table = pd.DataFrame({"image_id": ["007.png", "008.png", "009.png", "010.png"],
                          "patient_id": ["0012", "0012", "0031", "0044"],
                          "split": ["train", "train", "val", "test"]})
    assert out.save_splits(table) == tmp_path / "01_baseline" / "splits.csv"
    assert (tmp_path / "01_baseline/splits.csv").read_text().splitlines() == [
        "image_id,patient_id,split", "007.png,0012,train", "008.png,0012,train",
        "009.png,0031,val", "010.png,0044,test"]
    assert out.load_splits()["patient_id"].tolist() == ["0012", "0012", "0031", "0044"]  # not 12
    assert out.trained_on("image_id") == {"007.png", "008.png", "009.png"}
    assert out.trained_on("patient_id") == {"0012", "0031"}
    assert [p.name for p in (tmp_path / "01_baseline").iterdir()] == ["splits.csv"]  # no temp left


def test_a_checkpoint_leads_back_to_its_results_folder(tmp_path):
    run = tmp_path / "tiny" / "01_baseline"
    folder = run / "checkpoints" / "densenet121"
    folder.mkdir(parents=True)
    (folder / "best.pt").write_bytes(b"")
    assert Outputs.of_checkpoint(folder / "best.pt").root == run
    assert Outputs.of_checkpoint(folder).root == run
    assert not Outputs.of_checkpoint(folder).writable
    loose = tmp_path / "elsewhere" / "model.pt"
    loose.parent.mkdir()
    loose.write_bytes(b"")
    assert Outputs.of_checkpoint(loose) is None  # not in a results folder: no splits to check


def test_metrics_and_provenance_are_read_with_errors_that_name_the_file(tmp_path):
    out = Outputs(tmp_path / "01_baseline")
    assert out.load_metrics() == {} and out.load_provenance() == {} and out.dropped_images() == {}
    out.save_metrics(dropped_images={"a.png": "cannot decode"})
    assert out.dropped_images() == {"a.png": "cannot decode"}
    out.provenance_file.write_text("{half")
    with pytest.raises(ValueError, match="provenance.json is not valid JSON"):
        out.load_provenance()
    out.metrics_file.write_text("{half")  # a run killed mid-write: the runner reads no drops
    assert out.dropped_images() == {}
    with pytest.raises(ValueError, match="metrics.json is not valid JSON"):
        out.load_metrics()


def test_open_study_loads_the_data_then_records_its_split(tmp_path):
    from cxrstudy.experiment import open_study

    data, out = open_study(tmp_path / "01_baseline", "synthetic", None, 16, seed=0, max_images=40,
                           progress=False, n_images=60, n_patients=30)
    assert out.root == tmp_path / "01_baseline" and out.synthetic and data.synthetic
    splits = out.load_splits()
    assert len(splits) == len(data.train) + len(data.val) + len(data.test)
    assert set(splits.loc[splits["split"] == "test", "image_id"]) == set(data.test.records["image_id"])
    assert out.load_metrics() == {"dropped_images": {}, "synthetic_data": True}
    summary = pd.read_csv(out.tables / "splits.csv")
    assert summary["images"].tolist() == [len(data.train), len(data.val), len(data.test)]
    assert (out.tables / "splits.md").read_text().startswith(
        "Patient-level splits of synthetic (seed 0) — SYNTHETIC DATA")


@pytest.mark.parametrize("arms, shown", [
    (["single", "can_bce", "can_balance"], "can_balance"),
    (["single", "can_focal", "can_bce"], "can_bce"),
    (["ensemble", "can_asl", "can_focal"], "can_asl"),
    (["single", "ensemble"], None),
])
def test_the_attention_maps_come_from_the_balance_arm_first(arms, shown):
    from cxrstudy.methods.can import study

    runs = dict.fromkeys(arms)
    assert study.arm_with_maps(runs) == shown


def test_earlier_outputs_are_moved_aside_never_mixed_with_another_run(tmp_path, monkeypatch):
    from cxrstudy.pipeline import runner

    monkeypatch.setattr(runner.time, "strftime", lambda fmt: "20250101-120000")
    run = tmp_path / "tiny" / "01_baseline"
    for attempt in ("first", "second"):  # two reruns within the same second
        (run / "figures").mkdir(parents=True)
        (run / "figures" / "roc.png").write_text(attempt)
        (run / "metrics.json").write_text("{}")
        runner.archive_previous(run, "fingerprint", log=lambda message: None)
        assert list(run.iterdir()) == []
    previous = tmp_path / "tiny" / "_previous"
    assert sorted(p.name for p in previous.iterdir()) == ["01_baseline-20250101-120000",
                                                          "01_baseline-20250101-120000-1"]
    assert (previous / "01_baseline-20250101-120000/figures/roc.png").read_text() == "first"
    assert (previous / "01_baseline-20250101-120000-1/figures/roc.png").read_text() == "second"
    assert (previous / "01_baseline-20250101-120000-1/metrics.json").is_file()


def test_move_aside_makes_nothing_when_there_is_nothing_to_move(tmp_path):
    from cxrstudy.files import move_aside

    assert move_aside([], tmp_path / "_previous" / "stamp") is None
    assert not (tmp_path / "_previous").exists()
