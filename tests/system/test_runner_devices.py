"""Many devices, one study: dependencies from ``run:`` references, notebooks running at once on
device workers, failures and Ctrl-C with notebooks in flight, and each kernel's environment."""
import json
import os
import signal
import threading

import pytest

from cxrstudy.pipeline import cli
from cxrstudy.pipeline.config import ConfigError, discover_notebooks, notebook_dependencies, resolve_parameters
from cxrstudy.pipeline.runner import run_notebooks
from cxrstudy.pipeline.workers import Worker, make_workers, parse_devices


def write_notebook(folder, name, parameters, code="x = 1", metadata=None):
    cells = [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": parameters,
         "outputs": [], "execution_count": None},
        {"cell_type": "code", "metadata": {}, "source": code, "outputs": [], "execution_count": None},
    ]
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    if metadata:
        meta["cxrstudy"] = metadata
    (folder / f"{name}.ipynb").write_text(json.dumps(
        {"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))


HEADER = 'profile = "x"\noutput_dir = ""\nseed = 0\n'


@pytest.fixture
def study(tmp_path):
    """00 and 01 independent; 02 reuses 01's model only where the profile says so (like 03's
    teacher); 03 reports on all three, also after a failure (like 08)."""
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir(), params.mkdir()
    write_notebook(nbs, "00_a", HEADER)
    write_notebook(nbs, "01_b", HEADER + "lr = 0.1\n")
    write_notebook(nbs, "02_c", HEADER + 'teacher = "own"\n')
    write_notebook(nbs, "03_report", HEADER, metadata={
        "depends_on": ["00_a", "01_b", "02_c"], "runs_after_failed_upstream": True})
    (params / "tiny.yaml").write_text("shared:\n  seed: 1\nnotebooks:\n  02_c:\n"
                                      "    teacher: run:01_b/model\n")
    return nbs, params


class Recorder:
    """A stub executor: records start and end, fails where told, can wait at a barrier."""

    def __init__(self, fail=(), barrier=None):
        self.events, self.fail, self.barrier, self.kwargs = [], set(fail), barrier, {}
        self.lock = threading.Lock()

    def __call__(self, spec, params, output_dir, **kwargs):
        with self.lock:
            self.events.append(("start", spec.name))
            self.kwargs[spec.name] = kwargs
        if self.barrier is not None and spec.name in ("00_a", "01_b"):
            self.barrier.wait()  # both must be running at once, or this breaks
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps({"seed": params["seed"]}))
        with self.lock:
            self.events.append(("end", spec.name))
        if spec.name in self.fail:
            raise RuntimeError(f"{spec.name} raised")

    def index(self, kind, name):
        return self.events.index((kind, name))


def run(study_dirs, tmp_path, executor, **kw):
    nbs, params = study_dirs
    return run_notebooks(kw.pop("names", "all"), "tiny", notebooks_dir=nbs, params_dir=params,
                         results_dir=tmp_path / "results", executor=executor,
                         log=kw.pop("log", lambda m: None), check_data=False, **kw)


def statuses(results):
    return {r.name: r.status for r in results}


# --- dependencies from run: references ---------------------------------------------------

def test_a_run_reference_is_a_dependency_for_that_profile_only(study):
    nbs, params = study
    specs = discover_notebooks(nbs)
    deps = notebook_dependencies(specs, resolve_parameters("tiny", [], specs, params))
    assert deps["02_c"] == ["01_b"] and deps["01_b"] == []
    assert deps["03_report"] == ["00_a", "01_b", "02_c"]
    own = resolve_parameters("tiny", ["02_c.teacher=own"], specs, params)
    assert notebook_dependencies(specs, own)["02_c"] == []


@pytest.mark.parametrize("profile, upstream", [("tiny", []), ("sample", ["01_baseline"]),
                                               ("default", ["01_baseline"])])
def test_the_study_profiles_that_reuse_01s_teacher_make_03_wait_for_it(profile, upstream):
    specs = discover_notebooks()
    deps = notebook_dependencies(specs, resolve_parameters(profile, [], specs))
    assert deps["03_knowledge_distillation"] == upstream
    assert deps["07_explainability"][0] == "01_baseline" and deps["08_report"][-1] == "07_explainability"
    overridden = resolve_parameters(profile, ["teacher=run:01_baseline/densenet121"], specs)
    assert notebook_dependencies(specs, overridden)["03_knowledge_distillation"] == ["01_baseline"]


@pytest.mark.parametrize("value, words", [("run:09_x/model", "names no notebook"),
                                          ("run:02_c/model", "refers to the notebook itself")])
def test_a_bad_run_reference_is_refused_before_any_notebook(study, tmp_path, value, words):
    executor = Recorder()
    with pytest.raises(ConfigError, match=f"02_c: teacher='{value}' {words}"):
        run(study, tmp_path, executor, overrides=[f"02_c.teacher={value}"])
    assert executor.events == []


def test_a_failed_upstream_blocks_the_notebook_that_reuses_its_run(study, tmp_path):
    results = run(study, tmp_path, Recorder(fail={"01_b"}))
    assert statuses(results) == {"00_a": "ok", "01_b": "failed", "02_c": "blocked",
                                 "03_report": "ok"}


def test_a_changed_upstream_reruns_the_notebook_that_reuses_its_run(study, tmp_path):
    run(study, tmp_path, Recorder())
    results = run(study, tmp_path, Recorder(), overrides=["01_b.lr=0.2"])
    assert statuses(results) == {"00_a": "skipped", "01_b": "ok", "02_c": "ok", "03_report": "ok"}


def test_named_notebooks_run_upstream_first(study, tmp_path):
    executor = Recorder()
    run(study, tmp_path, executor, names=["02", "01"])
    assert [name for kind, name in executor.events if kind == "start"] == ["01_b", "02_c"]


def test_without_devices_the_log_reads_as_before(study, tmp_path):
    import re

    lines = []
    run(study, tmp_path, Recorder(fail={"01_b"}), log=lines.append)
    out = str((tmp_path / "results/tiny").resolve())
    shapes = [f"results: {out}(; threads per kernel: .*)?",
              f"\\[1/4\\] 00_a: running \\(profile tiny\\) → {out}/00_a", r"\[1/4\] 00_a: ok in \d+\.\d s",
              f"\\[2/4\\] 01_b: running \\(profile tiny\\) → {out}/01_b",
              r"\[2/4\] 01_b: failed in \d+\.\d s — RuntimeError: 01_b raised",
              r"\[3/4\] 02_c: not run, it depends on failed 01_b",
              f"\\[4/4\\] 03_report: running \\(profile tiny\\) → {out}/03_report",
              r"\[4/4\] 03_report: ok in \d+\.\d s",
              r"time per notebook: 00_a \S+ s \(ok\), 01_b \S+ s \(failed\), 02_c 0\.0 s \(blocked\), "
              r"03_report \S+ s \(ok\); total \S+ s"]
    assert len(lines) == len(shapes)
    for line, shape in zip(lines, shapes):
        assert re.fullmatch(shape, line), line


# --- device workers ----------------------------------------------------------------------

def test_devices_are_parsed_and_bad_ones_named():
    assert parse_devices("0,1,cuda:3,cpu") == ["cuda:0", "cuda:1", "cuda:3", "cpu"]
    for text, words in [("gpu0", "'gpu0' is neither"), ("", "comma-separated"),
                        ("0,,1", "comma-separated")]:
        with pytest.raises(ValueError, match=words):
            parse_devices(text)


def test_each_worker_sees_its_own_gpu_and_a_share_of_the_cores():
    workers = make_workers(["cuda:0", "cuda:1", "cpu", "cpu"], environ={}, cores=8,
                           gpu_count=lambda: 2)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1", "", ""]
    assert all(w.env["OMP_NUM_THREADS"] == w.env["MKL_NUM_THREADS"] == "2" for w in workers)
    # numbers count within our own CUDA_VISIBLE_DEVICES; --threads (OMP_NUM_THREADS) is kept
    inside = make_workers(["cuda:1"], environ={"CUDA_VISIBLE_DEVICES": "4,6",
                                               "OMP_NUM_THREADS": "3"}, cores=8)
    assert inside == [Worker("cuda:1", {"CUDA_VISIBLE_DEVICES": "6"})]
    with pytest.raises(ValueError, match="GPU 2 asked for, but only 2 GPU"):
        make_workers(["cuda:2"], environ={}, cores=8, gpu_count=lambda: 2)


def test_independent_notebooks_run_at_once_and_dependents_wait(study, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    executor = Recorder(barrier=threading.Barrier(2, timeout=60))
    results = run(study, tmp_path, executor, devices="1,cpu")
    assert [r.name for r in results] == ["00_a", "01_b", "02_c", "03_report"]
    assert set(statuses(results).values()) == {"ok"}
    assert executor.index("end", "01_b") < executor.index("start", "02_c")
    assert executor.index("start", "03_report") > max(
        executor.index("end", n) for n in ("00_a", "01_b", "02_c"))
    gpus = {name: kw["worker"].env["CUDA_VISIBLE_DEVICES"] for name, kw in executor.kwargs.items()}
    assert {gpus["00_a"], gpus["01_b"]} == {"7", ""}  # GPU 1 of 5,7 is 7; cpu sees none
    record = json.loads((tmp_path / "results/tiny/00_a/provenance.json").read_text())
    assert record["status"] == "ok" and record["worker"]["device"] in ("cuda:1", "cpu")


def test_a_notebook_that_becomes_ready_keeps_its_place_in_study_order(study, tmp_path):
    nbs, _ = study
    write_notebook(nbs, "04_d", HEADER)  # independent of everything
    executor = Recorder()
    run(study, tmp_path, executor, devices="cpu", overrides=["02_c.teacher=run:00_a/model"])
    # 02_c becomes ready when 00_a ends, after 01_b and 04_d were queued; it still goes first
    assert [name for kind, name in executor.events if kind == "start"] == [
        "00_a", "01_b", "02_c", "03_report", "04_d"]


def test_workers_write_what_a_sequential_run_writes(study, tmp_path):
    run(study, tmp_path / "one", Recorder())
    run(study, tmp_path / "two", Recorder(), devices="cpu,cpu")
    for name in ("00_a", "01_b", "02_c", "03_report"):
        assert ((tmp_path / "one/results/tiny" / name / "metrics.json").read_text()
                == (tmp_path / "two/results/tiny" / name / "metrics.json").read_text())
        record = json.loads((tmp_path / "one/results/tiny" / name / "provenance.json").read_text())
        assert "worker" not in record  # a sequential record is as before
    # same fingerprints: workers take a sequential run's outputs as up to date
    again = run(study, tmp_path / "one", Recorder(), devices="cpu,cpu")
    assert set(statuses(again).values()) == {"skipped"}


def test_a_failure_on_one_worker_blocks_only_its_dependents(study, tmp_path):
    lines = []
    results = run(study, tmp_path, Recorder(fail={"01_b"}), devices="cpu,cpu", log=lines.append)
    assert statuses(results) == {"00_a": "ok", "01_b": "failed", "02_c": "blocked",
                                 "03_report": "ok"}
    assert any(line.startswith("[3/4] 02_c: not run, it depends on failed 01_b") for line in lines)
    assert lines[-1].startswith("time per notebook: 00_a") and "on 2 workers" in lines[-1]


def interruptible(started, trigger):
    """00_a runs until the runner cancels it; 01_b waits for 00_a to start, then ``trigger``."""
    def executor(spec, params, output_dir, cancel, **kwargs):
        if spec.name == "00_a":
            started.set()
        else:
            assert started.wait(30)
            trigger()
        assert cancel.wait(30), "the runner never cancelled the notebook"
        raise KeyboardInterrupt
    return executor


def assert_both_interrupted_and_unlocked(tmp_path):
    for name in ("00_a", "01_b"):
        record = json.loads((tmp_path / f"results/tiny/{name}/provenance.json").read_text())
        assert record["status"] == "interrupted", name
    assert not (tmp_path / "results/tiny/02_c").exists()  # never started
    assert not list((tmp_path / "results/tiny").glob(".*.lock"))


def test_an_interrupted_notebook_stops_the_others_in_flight(study, tmp_path):
    started = threading.Event()

    def interrupt_this_one():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(study, tmp_path, interruptible(started, interrupt_this_one), devices="cpu,cpu")
    assert_both_interrupted_and_unlocked(tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_or_kill_records_interrupted_for_every_notebook_in_flight(study, tmp_path, signum):
    started, before = threading.Event(), signal.getsignal(signal.SIGTERM)
    # a test run started in the background (nohup, &) inherits an ignored SIGINT: give this
    # process Python's own Ctrl-C handler, as an interactive run has
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(study, tmp_path, interruptible(started, lambda: os.kill(os.getpid(), signum)),
                devices="cpu,cpu")
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert_both_interrupted_and_unlocked(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == before  # our SIGTERM handler is gone again


def test_bad_devices_on_the_command_line_exit_2(capsys):
    assert cli.main(["run", "00", "--profile", "tiny", "--devices", "gpu"]) == 2
    assert "cxrstudy run: --devices 'gpu': 'gpu' is neither" in capsys.readouterr().err


# --- the process side: real kernels ------------------------------------------------------

def test_each_notebook_runs_in_its_own_process_with_its_workers_environment(tmp_path):
    """Two stub notebooks on two workers; each kernel reports what it sees. A failing cell is
    named as in a sequential run."""
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir(), params.mkdir()
    report = ('import json, os, pathlib\npathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)\n'
              'pathlib.Path(output_dir, "env.json").write_text(json.dumps({k: os.environ.get(k) '
              'for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}))')
    write_notebook(nbs, "00_a", HEADER, report)
    write_notebook(nbs, "01_b", HEADER, report)
    write_notebook(nbs, "02_c", HEADER, 'raise ValueError("no such image")',
                   metadata={"depends_on": ["00_a"]})
    (params / "tiny.yaml").write_text("shared: {}\nnotebooks: {}\n")
    lines = []
    env = {k: os.environ.pop(k, None) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        results = run_notebooks("all", "tiny", notebooks_dir=nbs, params_dir=params,
                                results_dir=tmp_path / "results", devices="cpu,cpu",
                                progress=False, check_data=False, log=lines.append)
    finally:
        os.environ.update({k: v for k, v in env.items() if v is not None})
    assert statuses(results) == {"00_a": "ok", "01_b": "ok", "02_c": "failed"}
    assert results[2].error == "ValueError: no such image (cell [3])"  # after papermill's injected parameters
    from cxrstudy.pipeline.workers import available_cores
    threads = str(max(1, available_cores() // 2))
    for name in ("00_a", "01_b"):
        seen = json.loads((tmp_path / f"results/tiny/{name}/env.json").read_text())
        assert seen == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads}
    assert (tmp_path / "results/tiny/02_c/02_c.ipynb").is_file()  # the partial notebook is kept
