"""The runner under interruption and bad input: interrupted runs resume from their checkpoints,
one run per results folder, failures and bad profiles say why on the terminal."""
import json
import os
import subprocess
import sys

import pytest

from cxrstudy.pipeline import cli
from cxrstudy.pipeline.config import ConfigError, discover_notebooks, resolve_parameters
from cxrstudy.data.availability import DataUnavailableError
from cxrstudy.pipeline.runner import RunLock, RunLockedError, describe_failure, run_notebooks
from _fakes import REPO


def run(study_dirs, tmp_path, executor, **kw):
    nbs, params = study_dirs
    return run_notebooks("all", "tiny", notebooks_dir=nbs, params_dir=params,
                         results_dir=tmp_path / "results", executor=executor,
                         log=kw.pop("log", lambda m: None), **kw)


def provenance(tmp_path, name="00_explore"):
    return json.loads((tmp_path / f"results/tiny/{name}/provenance.json").read_text())


class Interrupted:
    """Trains one epoch (writes last.pt), then the user presses Ctrl-C."""

    def __call__(self, spec, params, output_dir, **kwargs):
        (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (output_dir / "checkpoints/last.pt").write_text("epoch 1")
        raise KeyboardInterrupt


def ok(spec, params, output_dir, **kwargs):
    output_dir.mkdir(parents=True, exist_ok=True)


def test_ctrl_c_records_interrupted_and_the_next_run_resumes_in_place(study, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(study, tmp_path, Interrupted())
    assert provenance(tmp_path)["status"] == "interrupted"
    lines = []
    results = run(study, tmp_path, ok, log=lines.append)
    assert [r.status for r in results] == ["ok", "ok"]
    # the checkpoint was not archived: training resumes from it
    assert (tmp_path / "results/tiny/00_explore/checkpoints/last.pt").read_text() == "epoch 1"
    assert not (tmp_path / "results/tiny/_previous").exists()
    assert any("resuming in place" in line and "interrupted" in line for line in lines)
    assert not list((tmp_path / "results/tiny").glob(".*.lock"))  # every lock released


def test_a_killed_run_is_resumed_too(study, tmp_path):
    """kill -9 leaves the 'running' record written before the kernel started."""
    def killed(spec, params, output_dir, **kwargs):
        Interrupted()(spec, params, output_dir)

    with pytest.raises(KeyboardInterrupt):
        run(study, tmp_path, killed)
    record = provenance(tmp_path)
    record["status"] = "running"  # what kill -9 leaves: no chance to write 'interrupted'
    (tmp_path / "results/tiny/00_explore/provenance.json").write_text(json.dumps(record))
    run(study, tmp_path, ok)
    assert (tmp_path / "results/tiny/00_explore/checkpoints/last.pt").is_file()
    assert not (tmp_path / "results/tiny/_previous").exists()


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(study, tmp_path):
    output_dir = tmp_path / "results/tiny/00_explore"
    output_dir.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = output_dir.parent / ".00_explore.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                    "started": "2026-12-03 10:00:00"}))
        calls = []
        with pytest.raises(RunLockedError, match=f"process {holder.pid} .*2026-12-03 10:00:00"):
            run(study, tmp_path, lambda *a, **k: calls.append(a))
        assert calls == []
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the stale lock is taken over and the run proceeds
    assert [r.status for r in run(study, tmp_path, ok)] == ["ok", "ok"]


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path / "01_baseline"):
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            RunLock(tmp_path / "01_baseline").__enter__()
    assert not (tmp_path / ".01_baseline.lock").exists()


def test_a_failure_names_the_notebooks_own_exception():
    from papermill.exceptions import PapermillExecutionError

    exc = PapermillExecutionError(cell_index=4, exec_count=5, source="load()",
                                  ename="CorruptImageError",
                                  evalue="cannot decode images_001/images/x.png", traceback=[])
    assert describe_failure(exc) == \
        "CorruptImageError: cannot decode images_001/images/x.png (cell [5])"
    assert describe_failure(RuntimeError("boom")) == "RuntimeError: boom"


def test_a_malformed_profile_names_its_file_and_line(study):
    nbs, params = study
    (params / "tiny.yaml").write_text("shared:\n  image_size: 64\n  seed: [3\nnotebooks: {}\n")
    with pytest.raises(ConfigError, match=r"tiny\.yaml line \d+, column \d+: not valid YAML"):
        resolve_parameters("tiny", [], discover_notebooks(nbs), params)


@pytest.mark.parametrize("override, words", [
    ("seed=-1", "'seed' must be at least 0, got -1"),
    ("image_size=0", "'image_size' must be at least 1, got 0"),
])
def test_out_of_range_values_are_refused_before_any_kernel(study, tmp_path, override, words):
    calls = []
    with pytest.raises(ConfigError, match=words):
        run(study, tmp_path, lambda *a, **k: calls.append(a), overrides=[override])
    assert calls == []


def test_the_real_profiles_refuse_negative_epochs_and_no_processes():
    with pytest.raises(ConfigError, match="'epochs' must be at least 1, got -1"):
        resolve_parameters("tiny", ["epochs=-1"])
    with pytest.raises(ConfigError, match="'num_processes' must be at least 1, got 0"):
        resolve_parameters("tiny", ["num_processes=0"])


def test_an_unknown_dataset_lists_the_known_ones(study, tmp_path):
    nbs, params = study
    (params / "tiny.yaml").write_text("shared:\n  image_size: 64\nnotebooks: {}\n")
    text = (nbs / "00_explore.ipynb").read_text().replace('root = None', 'root = None\\ndataset = \\"nihh\\"')
    (nbs / "00_explore.ipynb").write_text(text)
    with pytest.raises(DataUnavailableError, match="unknown dataset 'nihh'; known datasets: .*nih-sample"):
        run(study, tmp_path, ok, check_data=True)


def test_ctrl_c_on_the_command_line_is_one_line(monkeypatch, capsys):
    import cxrstudy.pipeline.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxrstudy.pipeline.runner, "run_notebooks", interrupted)
    assert cli.main(["run", "00", "--profile", "tiny"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("cxrstudy run: interrupted") and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_threads_reach_the_kernels_environment(monkeypatch):
    import cxrstudy.pipeline.runner

    seen = {}

    def record(*args, **kwargs):
        seen["omp"] = os.environ.get("OMP_NUM_THREADS")
        return []

    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(cxrstudy.pipeline.runner, "run_notebooks", record)
    assert cli.main(["run", "00", "--profile", "tiny", "--threads", "2"]) == 0
    assert seen["omp"] == "2" and os.environ["MKL_NUM_THREADS"] == "2"


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom cxrstudy.pipeline import cli\ntry:\n    cli.main(['run', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--threads N" in out.stdout and out.stdout.strip().endswith("False")


def test_make_clean_results_removes_the_profile_and_its_archive():
    from pathlib import Path

    repo = REPO
    profile = f"pytest-clean-{os.getpid()}"
    archived = repo / "results" / profile / "_previous" / "01_baseline-20261203" / "last.pt"
    archived.parent.mkdir(parents=True)
    archived.write_bytes(b"0" * 1024)
    try:
        out = subprocess.run(["make", "-s", "clean-results", f"PROFILE={profile}"], cwd=repo,
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("removing") and not (repo / "results" / profile).exists()
    finally:
        import shutil
        shutil.rmtree(repo / "results" / profile, ignore_errors=True)


def test_papermills_notes_on_the_grouped_schedule_lines_are_dropped_and_nothing_else(caplog):
    """The runner silences papermill's "Unable to parse line" / "Passed unknown parameter" (its
    one-name-a-line reader and our grouped schedule lines), not its other messages."""
    import logging

    from cxrstudy.pipeline.workers import quiet_grouped_schedule_notes

    quiet_grouped_schedule_notes()
    quiet_grouped_schedule_notes()  # idempotent
    assert len(logging.getLogger("papermill.translators").filters) == 1
    with caplog.at_level(logging.INFO):
        logging.getLogger("papermill.translators").warning("Unable to parse line 21 'a = 1; b = 2'.")
        logging.getLogger("papermill").warning("Passed unknown parameter: lr")
        logging.getLogger("papermill").warning("Input notebook does not contain a cell with tag 'parameters'")
    assert [r.getMessage() for r in caplog.records] == [
        "Input notebook does not contain a cell with tag 'parameters'"]
