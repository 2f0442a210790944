"""Values that pass the type check but would fail minutes into a run (issue 24): refused while
the parameters are resolved, naming key, value and source, before any kernel starts; and bad
command-line numbers as one line naming the option."""
import pytest

from cxrstudy.pipeline import cli
from cxrstudy.pipeline.config import ConfigError, discover_notebooks, resolve_parameters


@pytest.fixture(scope="module")
def shipped():
    """The study's own notebooks and profiles: the rules must hold against the real keys."""
    from conftest import REPO

    return discover_notebooks(REPO / "notebooks"), REPO / "params"


@pytest.mark.parametrize("override, words", [
    ("lr=.nan", "'lr' must be a finite number, got nan"),
    ("lr=.inf", "'lr' must be a finite number, got inf"),
    ("lr=1e999", "'lr' must be a finite number, got inf"),
    ("lr=0", "'lr' must be greater than 0, got 0.0"),
    ("min_lr=.nan", "'min_lr' must be a finite number, got nan"),
    ("min_lr=-1e-6", "'min_lr' must be at least 0"),
    ("grad_clip=-1", "'grad_clip' must be greater than 0, got -1.0"),
    ("ema_decay=-3", "'ema_decay' must be strictly between 0 and 1, got -3.0"),
    ("ema_decay=1", "'ema_decay' must be strictly between 0 and 1, got 1.0"),
    ("weight_decay=-0.1", "'weight_decay' must be at least 0"),
    ("warmup_epochs=-1", "'warmup_epochs' must be at least 0"),
    ("epochs=0", "'epochs' must be at least 1, got 0"),
    ("batch_size=0", "'batch_size' must be at least 1, got 0"),
    ("image_size=0", "'image_size' must be at least 1, got 0"),
    ("04_low_resolution.resolutions=[0]", r"each of 'resolutions' must be at least 1, got \[0\]"),
    ("05_glori.fractions=[-1]", r"each of 'fractions' must be in \(0, 1\], got \[-1\]"),
    ("05_glori.fractions=[1.5]", r"each of 'fractions' must be in \(0, 1\]"),
    ("05_glori.fractions=[0.5, .nan]", "each of 'fractions' must be a finite number"),
    ("gamma=.inf", "'gamma' must be a finite number"),  # any float key, ruled or not
])
def test_values_that_would_fail_late_are_refused_naming_the_key(shipped, override, words):
    notebooks, params = shipped
    with pytest.raises(ConfigError, match=f"^override: {words}"):
        resolve_parameters("tiny", [override], notebooks, params)


def test_a_bad_value_in_a_profile_names_the_file_and_section(study):
    nbs, params = study
    (params / "bad.yaml").write_text("notebooks:\n  01_train:\n    lr: .nan\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml notebooks\.01_train: 'lr' must be a finite"):
        resolve_parameters("bad", [], discover_notebooks(nbs), params)
    (params / "bad2.yaml").write_text("shared:\n  image_size: -64\n")
    with pytest.raises(ConfigError, match=r"bad2\.yaml shared: 'image_size' must be at least 1"):
        resolve_parameters("bad2", [], discover_notebooks(nbs), params)


def test_the_edges_of_each_range_are_accepted(shipped):
    notebooks, params = shipped
    resolved = resolve_parameters("tiny", ["min_lr=0", "weight_decay=0", "warmup_epochs=0",
                                           "grad_clip=null", "ema_decay=0.999",
                                           "05_glori.fractions=[1.0]"], notebooks, params)
    assert resolved["05_glori"]["fractions"] == [1.0]
    assert resolved["01_baseline"]["ema_decay"] == 0.999 and resolved["01_baseline"]["grad_clip"] is None


def test_a_bad_value_stops_cxrstudy_run_before_any_notebook_executes(monkeypatch, capsys):
    import cxrstudy.pipeline.runner

    def kernel_started(*args, **kwargs):
        raise AssertionError("a notebook was executed")

    monkeypatch.setattr(cxrstudy.pipeline.runner, "execute_notebook", kernel_started)
    monkeypatch.setattr(cxrstudy.pipeline.runner, "execute_in_process", kernel_started)
    assert cli.main(["run", "01", "--profile", "tiny", "-p", "lr=.nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cxrstudy run: override: 'lr' must be a finite number, got nan"


def test_a_key_given_twice_in_a_profile_is_refused(study):
    nbs, params = study
    (params / "twice.yaml").write_text("shared:\n  seed: 1\n  image_size: 64\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml line 4.*key 'seed' is given twice"):
        resolve_parameters("twice", [], discover_notebooks(nbs), params)
    # the same key in two different mappings is not a duplicate
    (params / "apart.yaml").write_text("shared:\n  seed: 1\nnotebooks:\n  00_explore:\n    seed: 2\n")
    assert resolve_parameters("apart", [], discover_notebooks(nbs), params)["00_explore"]["seed"] == 2


@pytest.mark.parametrize("argv, words", [
    (["run", "00", "--profile", "tiny", "--threads", "0"],
     "cxrstudy run: argument --threads: must be at least 1, got 0"),
    (["evaluate", "model.pt", "--dataset", "chestmnist", "--image-size", "0"],
     "cxrstudy evaluate: argument --image-size: must be at least 1, got 0"),
    (["evaluate", "model.pt", "--dataset", "chestmnist", "--image-size", "big"],
     "cxrstudy evaluate: argument --image-size: must be a whole number, got 'big'"),
    (["evaluate", "model.pt", "--dataset", "chestmnist", "--batch-size", "0"],
     "cxrstudy evaluate: argument --batch-size: must be at least 1, got 0"),
    (["data", "check", "chestmnist", "--image-size", "-1"],
     "cxrstudy data check: argument --image-size: must be at least 1, got -1"),
])
def test_a_bad_number_on_the_command_line_is_one_line_naming_the_option(
        monkeypatch, capsys, argv, words):
    import cxrstudy.pipeline.runner

    def ran(*args, **kwargs):
        raise AssertionError("the command ran")

    monkeypatch.setattr(cxrstudy.pipeline.runner, "run_notebooks", ran)
    monkeypatch.setattr(cli, "_cmd_evaluate", ran)
    monkeypatch.setattr(cli, "_cmd_data_check", ran)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(words) and "Traceback" not in err
    assert len(err.splitlines()) == 1
