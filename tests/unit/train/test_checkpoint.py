"""Checkpoint files: weights-only round trip, atomic replacement, RNG state capture."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cxrstudy.train.checkpoint import (existing_checkpoints, load_checkpoint, save_checkpoint,
                                       to_cpu)
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
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


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
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_foreign_files_are_named(tmp_path):
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a cxrstudy checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


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
