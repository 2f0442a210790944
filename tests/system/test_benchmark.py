"""The throughput benchmark script (benchmarks/throughput.py) in --quick form.

Checks what the script reports and how it stores it, never how fast anything is: every row
present, images/s positive and equal to images ÷ seconds, every ratio the quotient of the measured
numbers, the Markdown table naming each row, and a second run moving the first run's files aside.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from _fakes import REPO

SCRIPT = REPO / "benchmarks" / "throughput.py"
MODES = ("train", "infer")


def load_script():
    spec = importlib.util.spec_from_file_location("cxr_benchmark_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script()


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    returned = bench.main(["--quick", "--out", str(out), "--device", "cpu"])
    stored = json.loads((out / "throughput.json").read_text())
    return out, returned, stored


def test_quick_run_has_every_row_and_metadata(bench, quick_run):
    _, returned, stored = quick_run
    assert returned == stored
    assert {(r["model"], r["size"]) for r in stored["rows"]} == \
        {(m, s) for m in bench.QUICK_MODELS for s in bench.QUICK_SIZES}
    assert len(stored["rows"]) == len(bench.QUICK_MODELS) * len(bench.QUICK_SIZES)
    assert {(o["crop"], o["size"]) for o in stored["mxa_overhead"]} == \
        {("faithful", 64), ("differentiable", 64)}
    meta = stored["metadata"]
    assert meta["quick"] is True and meta["device"] == "cpu"
    for key in ("device_name", "torch", "cpu_count", "date", "settings"):
        assert meta[key] not in (None, "")
    assert meta["settings"]["sizes"] == [64]
    diff = next(r for r in stored["rows"] if r["model"] == "efficientvit_m5_mxa_diff")
    assert diff["builder"] == "efficientvit_m5_mxa"
    assert diff["model_kwargs"] == {"crop": "differentiable", "roi_init": "whole"}


def test_throughputs_are_positive_and_ratios_are_quotients(bench, quick_run):
    _, _, stored = quick_run
    steps = stored["metadata"]["settings"]["timed_steps"]
    batch = stored["metadata"]["settings"]["batch_size"]
    for row in stored["rows"]:
        for path in bench.PATHS:
            for mode in MODES:
                key = f"{path}_{mode}"
                assert row[f"{key}_images"] == steps * batch
                assert row[f"{key}_ips"] > 0
                assert row[f"{key}_ips"] == pytest.approx(
                    row[f"{key}_images"] / row[f"{key}_seconds"], rel=1e-12)
                assert row[f"{key}_step_s"] == pytest.approx(row[f"{key}_seconds"] / steps,
                                                             rel=1e-12)
        for mode in MODES:
            assert row[f"ours_over_limit_{mode}"] == pytest.approx(
                row[f"ours_{mode}_ips"] / row[f"limit_{mode}_ips"], rel=1e-12)
            assert row[f"ours_over_conventional_{mode}"] == pytest.approx(
                row[f"ours_{mode}_ips"] / row[f"conventional_{mode}_ips"], rel=1e-12)


def test_perfect_packing_columns_follow_from_the_measured_times(bench, quick_run):
    """conv. packed = min(limit, C / (decode + step CPU per image)), from this run's numbers."""
    _, _, stored = quick_run
    cpus = stored["metadata"]["cpus_usable"]
    for row in stored["rows"]:
        assert row["cpus"] == cpus
        for mode in MODES:
            decode = row[f"decode_{mode}_cpu_s_per_image"]
            step_cpu = row[f"limit_{mode}_cpu_s_per_image"]
            assert decode > 0 and step_cpu > 0
            assert step_cpu == pytest.approx(
                row[f"limit_{mode}_cpu_seconds"] / row[f"limit_{mode}_images"], rel=1e-12)
            packed = row[f"conventional_packed_{mode}_ips"]
            assert packed == pytest.approx(
                min(row[f"limit_{mode}_ips"], cpus / (decode + step_cpu)), rel=1e-12)
            assert packed <= row[f"limit_{mode}_ips"]
            assert row[f"ours_over_conventional_packed_{mode}"] == pytest.approx(
                row[f"ours_{mode}_ips"] / packed, rel=1e-12)
    # decoding is the same work for every model at one size
    assert len({r["decode_train_cpu_s_per_image"] for r in stored["rows"]}) == 1


def test_packing_columns_are_empty_off_cpu(bench):
    row = {"limit_train_cpu_seconds": 1.0, "limit_train_images": 10, "limit_train_ips": 5.0,
           "ours_train_ips": 5.0}
    assert set(bench.packing_columns(row, "train", None).values()) == {None}
    filled = bench.packing_columns(row, "train", {"train": 0.1})
    # decode 0.1 s + step 0.1 s per image on C cores: C / 0.2 img/s, but never above the limit
    assert filled["conventional_packed_train_ips"] == pytest.approx(
        min(5.0, filled["cpus"] / 0.2))


def test_mxa_overhead_is_the_quotient_of_limit_step_times(quick_run):
    _, _, stored = quick_run
    rows = {(r["model"], r["size"]): r for r in stored["rows"]}
    for entry in stored["mxa_overhead"]:
        base, mxa = rows[("efficientvit_m5", entry["size"])], rows[(entry["model"], entry["size"])]
        for mode in MODES:
            assert entry[f"m5_{mode}_step_s"] == base[f"limit_{mode}_step_s"]
            assert entry[f"mxa_{mode}_step_s"] == mxa[f"limit_{mode}_step_s"]
            assert entry[f"{mode}_step_time_ratio"] == pytest.approx(
                mxa[f"limit_{mode}_step_s"] / base[f"limit_{mode}_step_s"], rel=1e-12)


def test_markdown_lists_every_row(quick_run):
    out, _, stored = quick_run
    lines = (out / "throughput.md").read_text().splitlines()
    for row in stored["rows"]:
        assert any(line.startswith(f"| {row['model']} | {row['size']} |") for line in lines), \
            row["model"]
    for entry in stored["mxa_overhead"]:
        assert any(line.startswith(f"| mxa_overhead | {entry['crop']} | {entry['size']} |")
                   for line in lines), entry["crop"]
    packed_section = lines[lines.index("## The conventional path at perfect packing (CPU)"):]
    for row in stored["rows"]:
        assert any(line.startswith(f"| {row['model']} | {row['size']} |")
                   for line in packed_section), row["model"]


def test_second_run_moves_the_first_runs_files_aside(bench, quick_run):
    out, _, first = quick_run
    first_md = (out / "throughput.md").read_text()
    bench.main(["--quick", "--out", str(out), "--device", "cpu", "--models", "efficientvit_m0",
                "--warmup", "0", "--steps", "1"])
    moved = sorted((out / "_previous").iterdir())
    assert len(moved) == 1
    assert json.loads((moved[0] / "throughput.json").read_text()) == first
    assert (moved[0] / "throughput.md").read_text() == first_md
    second = json.loads((out / "throughput.json").read_text())
    assert [r["model"] for r in second["rows"]] == ["efficientvit_m0"]


@pytest.mark.parametrize("size, patch", [(64, 8), (128, 16), (224, 16), (32, 8)])
def test_deit_patch_size_leaves_a_grid_of_at_least_four(bench, size, patch):
    name, kwargs = bench.model_spec("deit_tiny", size)
    assert name == "deit_tiny" and kwargs == {"patch_size": patch}
    assert size // kwargs["patch_size"] >= 4
