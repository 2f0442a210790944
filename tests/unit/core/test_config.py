"""Profiles and overrides: precedence, type checks, and errors that name the key."""
import json

import pytest

from cxrstudy.pipeline.config import (ConfigError, discover_notebooks, parameters_cell, parse_override,
                             read_parameter_defaults, resolve_parameters)
from _fakes import write_notebook


def test_precedence_default_shared_section_override(study):
    nbs, params = study
    specs = discover_notebooks(nbs)
    resolved = resolve_parameters("tiny", ["seed=7", "01_train.lr=1"], specs, params)
    assert resolved["00_explore"] == {"image_size": 64, "seed": 7, "gallery": 2, "root": None,
                                      "profile": "tiny"}
    # int 1 widens to float for a float parameter; the section beat shared, the override beat both
    assert resolved["01_train"]["lr"] == 1.0 and isinstance(resolved["01_train"]["lr"], float)
    assert resolved["01_train"]["image_size"] == 64 and resolved["01_train"]["seed"] == 7
    assert specs["01_train"].depends_on == ["00_explore"]


@pytest.mark.parametrize("override, words", [
    (["epochs=3"], "'epochs'"),
    (["image_size=big"], "'image_size' must be int"),
    (["use_ema=1"], "'use_ema' must be bool"),
    (["models=a"], "'models' must be list"),
    (["00_explore.lr=0.1"], "no parameter 'lr'"),
    (["99_none.seed=1"], "unknown notebook '99_none'"),
    (["output_dir=/tmp/x"], "'output_dir'"),
    (["seed"], "key=value"),
])
def test_bad_overrides_are_rejected_naming_the_key(study, override, words):
    nbs, params = study
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        resolve_parameters("tiny", override, discover_notebooks(nbs), params)


def test_bad_profiles_are_rejected_naming_the_key(study):
    nbs, params = study
    specs = discover_notebooks(nbs)
    (params / "bad.yaml").write_text("shared:\n  imagesize: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'imagesize'"):
        resolve_parameters("bad", [], specs, params)
    (params / "bad2.yaml").write_text("shared:\n  image_size: 6.5\n")
    with pytest.raises(ConfigError, match="'image_size' must be int"):
        resolve_parameters("bad2", [], specs, params)
    (params / "bad3.yaml").write_text("notebooks:\n  00_explore:\n    lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'lr' for notebook 00_explore"):
        resolve_parameters("bad3", [], specs, params)
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*known profiles: .*tiny"):
        resolve_parameters("nope", [], specs, params)


def test_override_values_are_read_as_yaml():
    assert parse_override("epochs=3") == ("epochs", 3)
    assert parse_override("lr=1e-3") == ("lr", 1e-3)
    assert parse_override("models=[a, b]") == ("models", ["a", "b"])
    assert parse_override("flag=true") == ("flag", True)
    assert parse_override("name=a=b") == ("name", "a=b")
    assert parse_override("dataset=nih") == ("dataset", "nih")


def test_notebook_without_parameters_cell_is_rejected(tmp_path):
    (tmp_path / "00_x.ipynb").write_text(json.dumps(
        {"cells": [{"cell_type": "code", "metadata": {}, "source": "a = 1", "outputs": []}],
         "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(ConfigError, match="no cell tagged 'parameters'"):
        discover_notebooks(tmp_path)


def test_shipped_profiles_resolve_against_shipped_notebooks():
    """Every profile in params/ is valid for the notebooks in notebooks/."""
    from conftest import REPO

    specs = discover_notebooks(REPO / "notebooks")
    assert {"00_data_exploration", "01_baseline"} <= set(specs)
    for profile in ("tiny", "sample", "default", "paper"):
        resolved = resolve_parameters(profile, [], specs, REPO / "params")
        assert all(p["profile"] == profile for p in resolved.values())


def test_papermill_reads_every_parameter_the_study_reads_but_the_grouped_schedule():
    """papermill's own parser (which warns "Passed unknown parameter" on a line it cannot parse,
    e.g. an ``=`` inside the comment) sees every default ``read_parameter_defaults`` sees, except
    the training schedule's fields, which the training notebooks write a few to a line
    (``epochs = 4; batch_size = 128; ...``) so that a reader does not scroll past the same 14 lines
    six times: papermill reads one name a line, our ``ast`` reader all of them, and the runner
    filters papermill's warning about the rest (our own checks refuse unknown keys)."""
    from conftest import REPO
    from papermill.translators import PythonTranslator

    from cxrstudy.train import Schedule

    grouped_seen = 0
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        source = parameters_cell(json.loads(path.read_text()))["source"]
        source = "".join(source) if isinstance(source, list) else source
        seen_by_papermill = {p.name for p in PythonTranslator.inspect({"source": source})}
        ours = set(read_parameter_defaults(path))
        assert ours - seen_by_papermill <= set(Schedule.keys()), path.name
        assert seen_by_papermill <= ours, path.name
        if set(Schedule.keys()) <= ours:  # a training notebook: its schedule lines are grouped
            assert len([line for line in source.splitlines() if "; " in line.split("#")[0]]) == 5
            grouped_seen += 1
    assert grouped_seen == 6  # 01-06


def test_a_shared_key_means_one_thing_in_every_notebook_that_reads_it():
    """A profile's ``shared`` key reaches every notebook declaring it, so each declaring notebook
    must mean the same thing by it: the same default. 07's CAM batch is ``cam_batch_size``, not
    the training ``batch_size`` (which once set it to 128 without anyone asking)."""
    import yaml
    from conftest import REPO

    specs = discover_notebooks(REPO / "notebooks")
    shared = set()
    for profile in ("tiny", "sample", "default", "paper"):
        shared |= set(yaml.safe_load((REPO / "params" / f"{profile}.yaml").read_text())["shared"])
    default = yaml.safe_load((REPO / "params" / "default.yaml").read_text())
    for key in sorted(shared):
        # one default everywhere, except where the default profile says otherwise for a notebook
        defaults = {name: spec.defaults[key] for name, spec in specs.items() if key in spec.defaults
                    and key not in (default["notebooks"].get(name) or {})}
        assert len({json.dumps(v) for v in defaults.values()}) == 1, (key, defaults)
    assert "batch_size" not in specs["07_explainability"].defaults
    assert specs["07_explainability"].defaults["cam_batch_size"] == 16


def test_each_notebook_opened_as_it_is_runs_the_default_profile():
    """A student who presses "Run all" in JupyterLab gets the default profile: every notebook's
    parameter defaults equal params/default.yaml resolved for it (and it writes to
    results/default/<notebook>)."""
    from conftest import REPO

    specs = discover_notebooks(REPO / "notebooks")
    resolved = resolve_parameters("default", [], specs, REPO / "params")
    for name, spec in specs.items():
        defaults = dict(spec.defaults)
        assert defaults.pop("output_dir") == f"../results/default/{name}", name
        drift = {k: (v, resolved[name][k]) for k, v in defaults.items()
                 if v != resolved[name][k] or type(v) is not type(resolved[name][k])}
        assert not drift, f"{name}: notebook default vs default profile: {drift}"
