"""Atomic writes (cxrstudy.files): a finished write replaces the file, a failed one leaves the old
file as it was and no temporary file behind."""
import json

import pytest

from cxrstudy.files import atomic_path, write_json_atomic


def test_a_finished_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "deep" / "metrics.json"
    write_json_atomic(target, {"b": 1, "a": [0.5, None]}, sort_keys=True)
    assert target.read_text() == '{\n  "a": [\n    0.5,\n    null\n  ],\n  "b": 1\n}\n'
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "splits.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["splits.csv"]
    with pytest.raises(ValueError):  # NaN refused where strict JSON is asked for
        write_json_atomic(tmp_path / "result.json", {"auc": float("nan")}, allow_nan=False)
    assert [p.name for p in tmp_path.iterdir()] == ["splits.csv"]
