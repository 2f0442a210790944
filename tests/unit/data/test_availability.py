"""Pre-flight data checks: a missing dataset stops a run before any kernel, with the way forward."""
import json

import numpy as np
import pytest

from cxrstudy.data import availability
from cxrstudy.data.availability import DataUnavailableError, ensure_available
from cxrstudy.data.download import OfflineError
from cxrstudy.pipeline.runner import run_notebooks
from _fakes import write_notebook


def offline(*args, **kwargs):
    raise OfflineError("https://example.invalid/chestmnist_64.npz is unreachable")


def _fake_chestmnist(root, sizes):
    """What download_chestmnist leaves: MedMNIST's file under medmnist/ for each size."""
    from cxrstudy.data.chestmnist import npz_name

    folder = root / "medmnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for size in sizes:
        arrays = {}
        for split, n in (("train", 4), ("val", 2), ("test", 2)):
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
        np.savez(folder / npz_name(size), **arrays)


def test_missing_chestmnist_offline_names_the_sample_profile_and_data_root(tmp_path, monkeypatch):
    monkeypatch.setattr("cxrstudy.data.download.download_chestmnist", offline)
    with pytest.raises(DataUnavailableError) as info:
        ensure_available("chestmnist", tmp_path, image_size=64, log=lambda m: None)
    message = str(info.value)
    assert "PROFILE=sample" in message and "CXRSTUDY_DATA_ROOT" in message
    assert "unreachable" in message


def test_missing_chestmnist_is_fetched_once_when_online(tmp_path, monkeypatch):
    calls = []

    def fake_download(root, sizes):
        calls.append(tuple(sizes))
        _fake_chestmnist(root, sizes)

    monkeypatch.setattr("cxrstudy.data.download.download_chestmnist", fake_download)
    ensure_available("chestmnist", tmp_path, image_size=64, log=lambda m: None)
    ensure_available("chestmnist", tmp_path, image_size=64, log=lambda m: None)
    assert calls == [(64,)]  # the smallest size ≥ 64 px, fetched once


def test_registration_datasets_say_how_to_get_them(tmp_path):
    with pytest.raises(DataUnavailableError, match="make data DATASET=chexpert"):
        ensure_available("chexpert", tmp_path / "nothing", log=lambda m: None)


def test_real_sample_is_available(nih_sample_root):
    ensure_available("nih-sample", nih_sample_root.parent, image_size=64, log=lambda m: None)


def test_run_stops_before_any_notebook_when_data_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr("cxrstudy.data.download.download_chestmnist", offline)
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir(), params.mkdir()
    write_notebook(nbs, "00_a", f'profile = "x"\noutput_dir = ""\ndataset = "chestmnist"\n'
                                f'data_root = {str(tmp_path / "empty")!r}\nimage_size = 64\n')
    (params / "default.yaml").write_text("shared: {}\n")
    started = []
    with pytest.raises(DataUnavailableError):
        run_notebooks("all", "default", notebooks_dir=nbs, params_dir=params,
                      results_dir=tmp_path / "results", log=lambda m: None,
                      executor=lambda *a, **k: started.append(a))
    assert started == [] and not (tmp_path / "results").exists()


def test_a_missing_nih_sample_names_its_download(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        ensure_available("nih-sample", tmp_path, image_size=64, log=lambda m: None)
    message = str(info.value)
    assert "make data DATASET=nih-sample" in message and "CXRSTUDY_DATA_ROOT" in message


def test_a_notebook_by_hand_offline_reads_the_nih_sample_and_says_so(tmp_path, monkeypatch,
                                                                     nih_sample_root):
    (tmp_path / "nih-sample").symlink_to(nih_sample_root)
    monkeypatch.setattr("cxrstudy.data.download.download_chestmnist", offline)
    lines = []
    with pytest.warns(UserWarning) as caught:
        name = availability.usable_dataset("chestmnist", tmp_path, 64, log=lines.append)
    assert name == "nih-sample"
    # the choice is a line of the notebook's own output, not only a warning
    assert lines[-1].startswith("Dataset: nih-sample, INSTEAD OF chestmnist")
    message = str(caught[0].message)
    assert "ChestMNIST (64 px)" in message and "unreachable" in message
    assert str(tmp_path / "nih-sample") in message and "PROFILE=sample" in message


def test_offline_without_the_sample_the_notebook_stops_with_the_way_forward(tmp_path, monkeypatch):
    monkeypatch.setattr("cxrstudy.data.download.download_chestmnist", offline)
    with pytest.raises(DataUnavailableError, match="PROFILE=sample"):
        availability.usable_dataset("chestmnist", tmp_path, 64, log=lambda m: None)


def test_a_notebook_by_hand_fetches_only_the_missing_chestmnist_sizes(tmp_path, monkeypatch):
    fetched = []

    def fake_download(root, sizes):
        fetched.extend(sizes)
        _fake_chestmnist(root, sizes)

    monkeypatch.setattr("cxrstudy.data.download.download_chestmnist", fake_download)
    _fake_chestmnist(tmp_path, [64])
    assert availability.usable_dataset("chestmnist", tmp_path, [28, 64, 100],
                                       log=lambda m: None) == "chestmnist"
    assert fetched == [28, 128]  # 64 was there; 100 px reads the 128 px file
    assert availability.usable_dataset("chestmnist", tmp_path, [28, 64, 100]) == "chestmnist"
    assert fetched == [28, 128]  # all there now: nothing fetched again


def test_other_datasets_pass_through_without_a_check(tmp_path, monkeypatch):
    monkeypatch.setattr("cxrstudy.data.download.download_chestmnist", offline)
    lines = []
    assert availability.usable_dataset("chexpert", tmp_path / "nothing", 224, log=lines.append) == "chexpert"
    assert lines == ["Dataset: chexpert."]
