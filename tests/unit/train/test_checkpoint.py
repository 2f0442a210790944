"""Checkpoint files: weights-only round trip, atomic replacement, RNG state capture."""
from __future__ import annotations

import hashlib
import random
import warnings

import numpy as np
import pytest
import torch

from cxrstudy.models import create_model
from cxrstudy.train.checkpoint import (CheckpointIntegrityError, existing_checkpoints,
                                       load_checkpoint, load_model_from_checkpoint,
                                       save_checkpoint, to_cpu)
from cxrstudy.train.seeding import capture_rng_state, restore_rng_state, seed_everything


def _payload():
    return {"epoch": 3, "model": {"w": torch.arange(6.0).reshape(2, 3)},
            "history": [{"epoch": 1, "val_macro_auc": float("nan")}],
            "class_names": ["A", "B"], "betas": (0.9, 0.999), "ema": None}


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "run" / "last.pt")
    # the file itself loads under the strict unpickler, no cxrstudy code involved
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cxrstudy-checkpoint" and raw["version"] == 1
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert loaded["class_names"] == ["A", "B"] and loaded["betas"] == (0.9, 0.999)
    assert np.isnan(loaded["history"][0]["val_macro_auc"])
    assert existing_checkpoints(tmp_path / "run") == [path]


def test_objects_are_refused_before_anything_is_written(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "last.pt")
    before = path.read_bytes()
    bad = _payload()
    bad["history"][0]["when"] = object()
    with pytest.raises(TypeError, match=r"\['history'\]\[0\]\['when'\]"):
        save_checkpoint(bad, path)
    assert path.read_bytes() == before  # the previous checkpoint is intact
    # no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(_payload(), tmp_path / "last.pt")
    before = path.read_bytes()

    def broken_save(obj, stream):
        stream.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({**_payload(), "epoch": 4}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]
    assert load_checkpoint(path)["epoch"] == 3  # its digest still matches


def test_foreign_files_are_named(tmp_path):
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a cxrstudy checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_the_sha256_beside_a_checkpoint_is_sha256sums_line_and_checked_on_load(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "best.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "best.pt.sha256").read_text() == f"{digest}  best.pt\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact, recorded checkpoint loads without a warning
        assert load_checkpoint(path)["epoch"] == 3


def _flip_bytes(path, start: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_a_named_error_not_a_model(tmp_path):
    model = create_model("resnet18", num_classes=2, image_size=32, pretrained=False)
    path = save_checkpoint({"kind": "best", "epoch": 1, "model": model.state_dict(), "ema": None,
                            "model_config": model.cxr_config}, tmp_path / "best.pt")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    _flip_bytes(path, start=path.stat().st_size // 2)  # inside the weights
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    for load in (load_checkpoint, load_model_from_checkpoint):
        with pytest.raises(CheckpointIntegrityError) as error:
            load(path)
        message = str(error.value)
        assert str(path) in message and expected in message and actual in message


def test_a_checkpoint_without_its_sha256_loads_with_one_warning(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "last.pt")
    (tmp_path / "last.pt.sha256").unlink()  # as written before checkpoints recorded one
    with pytest.warns(UserWarning, match=r"last\.pt has no last\.pt\.sha256") as caught:
        assert load_checkpoint(path)["epoch"] == 3
    assert len(caught) == 1 and "\n" not in str(caught[0].message)


def test_a_garbled_sha256_file_is_named(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "last.pt")
    (tmp_path / "last.pt.sha256").write_text("not a digest\n")
    with pytest.raises(CheckpointIntegrityError, match=r"last\.pt\.sha256 does not hold"):
        load_checkpoint(path)


def test_to_cpu_detaches_nested_tensors():
    x = torch.ones(2, requires_grad=True) * 2
    moved = to_cpu({"a": [x, (x,)]})
    assert not moved["a"][0].requires_grad and isinstance(moved["a"][1], tuple)


def _draw():
    return (random.random(), float(np.random.rand()), np.random.standard_normal(),
            torch.rand(3).tolist())


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    seed_everything(123)
    _draw()
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = _draw()
    seed_everything(999)  # scramble
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected


def test_seeding_repeats_draws():
    seed_everything(5)
    first = _draw()
    seed_everything(5)
    assert _draw() == first
    assert torch.are_deterministic_algorithms_enabled()
