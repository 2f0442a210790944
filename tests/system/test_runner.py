"""Runner mechanics with a stub executor: skipping, forcing, failures, dependencies, provenance."""
import json

import pytest

from cxrstudy.pipeline.config import ConfigError
from cxrstudy.pipeline.runner import run_notebooks


class RecordingExecutor:
    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, spec, params, output_dir, **kwargs):
        self.calls.append((spec.name, params))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / f"{spec.name}.ipynb").write_text("{}")  # the partial notebook papermill keeps
        if spec.name in self.fail:
            raise RuntimeError(f"cell 3 of {spec.name} raised")


def run(study_dirs, tmp_path, executor, **kw):
    nbs, params = study_dirs
    return run_notebooks("all", "tiny", notebooks_dir=nbs, params_dir=params,
                         results_dir=tmp_path / "results", executor=executor,
                         log=lambda m: None, **kw)


def test_runs_all_then_skips_up_to_date_then_force(study, tmp_path):
    first = RecordingExecutor()
    results = run(study, tmp_path, first)
    assert [r.status for r in results] == ["ok", "ok"]
    assert [c[0] for c in first.calls] == ["00_explore", "01_train"]
    params = first.calls[1][1]
    assert params["output_dir"] == str((tmp_path / "results" / "tiny" / "01_train").resolve())
    prov = json.loads((tmp_path / "results/tiny/01_train/provenance.json").read_text())
    assert prov["status"] == "ok" and prov["params"]["lr"] == 0.01 and prov["wall_seconds"] >= 0
    assert set(prov) >= {"git", "packages", "device", "fingerprint", "params_hash"}

    second = RecordingExecutor()
    assert [r.status for r in run(study, tmp_path, second)] == ["skipped", "skipped"]
    assert second.calls == []

    third = RecordingExecutor()
    assert [r.status for r in run(study, tmp_path, third, force=True)] == ["ok", "ok"]
    assert len(third.calls) == 2


def test_changed_parameter_reruns_that_notebook_and_its_dependants(study, tmp_path):
    run(study, tmp_path, RecordingExecutor())
    again = RecordingExecutor()
    results = run(study, tmp_path, again, overrides=["00_explore.gallery=5"])
    assert [r.status for r in results] == ["ok", "ok"]  # 01 depends on 00, so it reruns too


def test_failure_keeps_partial_output_and_blocks_dependants(study, tmp_path):
    executor = RecordingExecutor(fail={"00_explore"})
    results = run(study, tmp_path, executor)
    assert [r.status for r in results] == ["failed", "blocked"]
    assert "cell 3 of 00_explore raised" in results[0].error
    assert (tmp_path / "results/tiny/00_explore/00_explore.ipynb").is_file()
    prov = json.loads((tmp_path / "results/tiny/00_explore/provenance.json").read_text())
    assert prov["status"] == "failed"
    # a failed notebook is never taken as up to date
    rerun = RecordingExecutor()
    assert [r.status for r in run(study, tmp_path, rerun)] == ["ok", "ok"]


def test_independent_notebooks_continue_after_a_failure(study, tmp_path):
    nbs, _ = study
    spec = json.loads((nbs / "01_train.ipynb").read_text())
    spec["metadata"].pop("cxrstudy")
    (nbs / "01_train.ipynb").write_text(json.dumps(spec))
    results = run(study, tmp_path, RecordingExecutor(fail={"00_explore"}))
    assert [r.status for r in results] == ["failed", "ok"]


def test_bad_override_fails_before_any_notebook_runs(study, tmp_path):
    executor = RecordingExecutor()
    with pytest.raises(ConfigError, match="'epochs'"):
        run(study, tmp_path, executor, overrides=["epochs=2"])
    assert executor.calls == []


def test_rerun_moves_earlier_outputs_aside_instead_of_overwriting(study, tmp_path):
    run(study, tmp_path, RecordingExecutor())
    marker = tmp_path / "results/tiny/00_explore/figures/old.png"
    marker.parent.mkdir(parents=True)
    marker.write_text("earlier figure")
    run(study, tmp_path, RecordingExecutor(), force=True)
    moved = list((tmp_path / "results/tiny/_previous").glob("00_explore-*/figures/old.png"))
    assert len(moved) == 1 and moved[0].read_text() == "earlier figure"
    assert not marker.exists()


def test_failed_run_with_same_parameters_is_resumed_in_place(study, tmp_path):
    run(study, tmp_path, RecordingExecutor(fail={"00_explore"}))
    checkpoint = tmp_path / "results/tiny/00_explore/checkpoints/last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("weights")
    run(study, tmp_path, RecordingExecutor())
    assert checkpoint.read_text() == "weights"
    assert not (tmp_path / "results/tiny/_previous").exists()


def test_relative_data_root_is_made_absolute_for_kernels(study, tmp_path, monkeypatch):
    """Kernels start in notebooks/, so a relative CXRSTUDY_DATA_ROOT would point elsewhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXRSTUDY_DATA_ROOT", "../shared/data")
    seen = []

    def executor(spec, params, output_dir, **kw):
        import os
        seen.append(os.environ["CXRSTUDY_DATA_ROOT"])

    run(study, tmp_path, executor)
    assert seen and all(v == str(tmp_path.parent / "shared" / "data") for v in seen)


def test_images_a_notebook_dropped_reach_the_terminal_and_its_provenance(study, tmp_path):
    def dropping(spec, params, output_dir, **kwargs):
        output_dir.mkdir(parents=True, exist_ok=True)
        dropped = {"00000013_005.png": "cannot decode: truncated"} if spec.name == "01_train" else {}
        (output_dir / "metrics.json").write_text(json.dumps({"dropped_images": dropped}))

    nbs, params = study
    lines = []
    run_notebooks("all", "tiny", notebooks_dir=nbs, params_dir=params,
                  results_dir=tmp_path / "results", executor=dropping, log=lines.append)
    done = [line for line in lines if ": ok in " in line]
    assert "images dropped as unreadable: 1 (00000013_005.png)" in done[1]
    assert "dropped" not in done[0]  # 00_explore dropped nothing: nothing said
    provenance = json.loads((tmp_path / "results/tiny/01_train/provenance.json").read_text())
    assert provenance["dropped_images"] == {"00000013_005.png": "cannot decode: truncated"}


def test_kernels_ask_for_cuda_without_initialising_it(study, tmp_path, monkeypatch):
    """A data-parallel arm forks after the notebook asked torch.cuda.is_available(): the runner
    makes that check NVML-based so the fork can still use the GPUs."""
    import os

    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    seen = []

    def executor(spec, params, output_dir, **kwargs):
        seen.append(os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"))

    run(study, tmp_path, executor)
    assert seen and set(seen) == {"1"}
