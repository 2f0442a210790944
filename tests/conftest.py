"""Shared fixtures: offline hub, the real NIH sample (skipped with a reason when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from _fakes import REPO, write_notebook  # noqa: E402  (after the offline switch)



def _missing(reason: str) -> None:
    """Skip without the data, but fail in CI (CXRSTUDY_REQUIRE_DATA=1), where it must be there."""
    if os.environ.get("CXRSTUDY_REQUIRE_DATA") == "1":
        pytest.fail(reason + " (CXRSTUDY_REQUIRE_DATA=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_root() -> Path:
    value = os.environ.get("CXRSTUDY_DATA_ROOT")
    if not value:
        _missing("CXRSTUDY_DATA_ROOT is not set: the real NIH sample is needed for this test")
    return Path(value)


@pytest.fixture(scope="session")
def nih_sample_root(data_root) -> Path:
    root = data_root / "nih-sample"
    if not (root / "Data_Entry_2017_v2020.csv").is_file():
        _missing(f"the NIH sample is not under {root}")
    return root


@pytest.fixture(autouse=True)
def _restore_determinism():
    """seed_everything switches torch to deterministic kernels process-wide; undo it per test."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own preprocessing cache folder; nothing leaks into ~/.cache."""
    monkeypatch.setenv("CXRSTUDY_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_results(nih_sample_root, tmp_path_factory):
    """One tiny-profile run of every notebook (kernel start costs ~10 s each), shared by the
    notebook tests of every file: (``<results>/tiny``, the runner's log lines)."""
    from cxrstudy.pipeline.runner import run_notebooks

    results_dir = tmp_path_factory.mktemp("results")
    logs = []
    outcome = run_notebooks(["all"], "tiny",
                            results_dir=results_dir, progress=False, log=logs.append)
    statuses = {r.name: (r.status, r.error) for r in outcome}
    assert all(s == "ok" for s, _ in statuses.values()), statuses
    return results_dir / "tiny", logs


@pytest.fixture
def study(tmp_path):
    """Two small notebooks (01 depends on 00) and a tiny profile, for config and runner tests."""
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir(), params.mkdir()
    write_notebook(nbs, "00_explore", 'profile = "x"\noutput_dir = ""\nimage_size = 224\nseed = 0\n'
                                      'gallery = 2\nroot = None\n')
    write_notebook(nbs, "01_train", 'profile = "x"\noutput_dir = ""\nimage_size = 224\nseed = 0\n'
                                    'lr = 0.001\nmodels = ["a"]\nuse_ema = False\n', ["00_explore"])
    (params / "tiny.yaml").write_text(
        "description: t\nshared:\n  image_size: 64\n  seed: 3\nnotebooks:\n  01_train:\n    lr: 0.01\n")
    return nbs, params
