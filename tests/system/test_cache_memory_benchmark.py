"""The cache-memory benchmark (benchmarks/cache_memory.py) on a small set: what it reports.

Checks the recorded facts, never the speed: the pixel file is images × size² bytes, the second
build of the same cache decodes no image, the peak is read from the measuring process (at least its
resident memory before the build), and a second run moves the first run's files aside.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from _fakes import REPO

SCRIPT = REPO / "benchmarks" / "cache_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cxr_benchmark_cache_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache-bench")
    returned = bench.main(["--images", "300", "--size", "32", "--chunk-size", "64",
                           "--out", str(out)])
    return out, returned


def test_reports_the_file_size_and_a_second_build_that_reads_nothing(small_run):
    out, returned = small_run
    stored = json.loads((out / "cache_memory.json").read_text())
    assert returned == stored
    row = stored["row"]
    assert row["images"] == 300 and row["size"] == 32 and row["chunk_size"] == 64
    assert row["file_bytes"] == 300 * 32 * 32
    assert row["first_build_reads"] == 300
    assert row["second_build_reads"] == 0 and row["second_build_same_file"] is True
    assert row["failures"] == 0
    assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0
    assert row["build_increment_bytes"] == row["peak_rss_bytes"] - row["rss_before_bytes"]
    assert row["peak_under_limit"] == (row["peak_rss_bytes"] < stored["limit_bytes"])
    assert row["peak_over_file"] == pytest.approx(row["peak_rss_bytes"] / row["file_bytes"])


def test_markdown_states_the_measures_and_a_rerun_keeps_the_first(bench, small_run):
    out, first = small_run
    text = (out / "cache_memory.md").read_text()
    assert "300 phantom images at 32 px" in text and "| second build |" in text
    bench.main(["--images", "40", "--size", "16", "--out", str(out)])
    moved = sorted((out / "_previous").iterdir())
    assert len(moved) == 1
    assert json.loads((moved[0] / "cache_memory.json").read_text()) == first
    assert json.loads((out / "cache_memory.json").read_text())["row"]["images"] == 40
