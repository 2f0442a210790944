"""One training schedule: its defaults, its one spelling of "off", how a notebook builds it, and
that every training notebook declares it (so one ``-p`` override reaches all of them)."""
import dataclasses

import pytest

from cxrstudy.pipeline.config import ConfigError, discover_notebooks, resolve_parameters
from cxrstudy.data.augment import BatchAugment
from cxrstudy.train import Schedule, TrainConfig

TRAINING_NOTEBOOKS = ("01_baseline", "02_mxa", "03_knowledge_distillation", "04_low_resolution",
                      "05_glori", "06_cross_attention")


def test_the_schedule_defaults_written_out():
    assert dataclasses.asdict(Schedule()) == {
        "epochs": 10, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.05, "warmup_epochs": 1.0,
        "min_lr": 1e-6, "ema_decay": None, "early_stopping_patience": None, "grad_clip": 1.0,
        "augment": True, "augment_options": {}, "num_workers": 0, "num_processes": 1,
        "accelerate_config": None}


def test_train_config_takes_its_recipe_defaults_from_the_schedule():
    """The disagreement this replaces: train_and_evaluate's lr 1e-3 beside TrainConfig's 1e-4."""
    config, built = TrainConfig(), Schedule().train_config()
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & set(Schedule.keys())
    assert shared == {"epochs", "lr", "weight_decay", "warmup_epochs", "min_lr", "ema_decay",
                      "early_stopping_patience", "grad_clip"}
    assert all(getattr(config, key) == getattr(Schedule(), key) for key in shared)
    assert built == config


def test_train_config_gets_the_recipe_and_the_run_settings():
    schedule = Schedule(epochs=3, lr=5e-4, min_lr=1e-5, ema_decay=0.99, grad_clip=None,
                        batch_size=8, num_workers=2)
    config = schedule.train_config(seed=7, checkpoint_dir="runs/x", cpu=True)
    assert (config.epochs, config.lr, config.min_lr, config.ema_decay, config.grad_clip) == (
        3, 5e-4, 1e-5, 0.99, None)
    assert (config.seed, config.checkpoint_dir, config.cpu) == (7, "runs/x", True)


@pytest.mark.parametrize("changes, words", [
    ({"ema_decay": 0.0}, r"ema_decay must lie in \(0, 1\) or be None \(off\)"),
    ({"early_stopping_patience": 0}, r"early_stopping_patience must be at least 1 or None \(off\)"),
    ({"grad_clip": 0.0}, r"grad_clip must be positive or None \(off\)"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
])
def test_off_is_none_and_zero_is_refused(changes, words):
    """0 does not mean "off": an EMA of decay 0, a patience of 0 epochs and a clip at norm 0 (which
    zeroes every gradient) are refused, naming None as the way to turn each off."""
    with pytest.raises(ValueError, match=words):
        Schedule(**changes)
    off = Schedule(ema_decay=None, early_stopping_patience=None, grad_clip=None).train_config()
    assert (off.ema_decay, off.early_stopping_patience, off.grad_clip) == (None, None, None)


def test_augmentation_is_built_from_the_flag_and_its_options():
    assert Schedule(augment=False, augment_options={"blur_p": 0.4}).augmenter(seed=0) is None
    plain = Schedule().augmenter(seed=3)
    assert isinstance(plain, BatchAugment)
    recipe = Schedule(augment_options={"elastic_p": 0.6, "blur_p": 0.4}).augmenter(seed=3)
    assert (recipe.elastic_p, recipe.blur_p) == (0.6, 0.4)
    assert (plain.elastic_p, plain.blur_p) != (0.6, 0.4)
    with pytest.raises(ValueError, match="unknown augmentation keys"):
        Schedule(augment_options={"elastc_p": 0.6})
    with pytest.raises(TypeError, match="augment_options"):
        Schedule(augment={"elastic_p": 0.6})  # the old bool-or-dict spelling


def test_a_notebook_builds_its_schedule_from_its_parameters():
    parameters = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.025,
                  "warmup_epochs": 0, "min_lr": 1e-6, "ema_decay": None,
                  "early_stopping_patience": None, "grad_clip": 1.0, "augment": True,
                  "augment_options": {}, "num_workers": 0, "num_processes": 1,
                  "accelerate_config": None, "seed": 5, "models": ["resnet18"]}
    schedule = Schedule.from_parameters(parameters)
    assert (schedule.epochs, schedule.batch_size, schedule.lr, schedule.warmup_epochs) == (
        2, 16, 1e-3, 0)
    assert schedule.replace(epochs=7).epochs == 7 and schedule.epochs == 2
    del parameters["min_lr"], parameters["grad_clip"]
    with pytest.raises(KeyError, match=r"\['min_lr', 'grad_clip'\]"):
        Schedule.from_parameters(parameters)


def test_every_training_notebook_declares_the_whole_schedule():
    from conftest import REPO

    specs = discover_notebooks(REPO / "notebooks")
    for name in TRAINING_NOTEBOOKS:
        missing = set(Schedule.keys()) - set(specs[name].defaults)
        assert not missing, f"{name} does not declare {sorted(missing)}"
        Schedule.from_parameters(specs[name].defaults)  # and its defaults make a valid one


@pytest.mark.parametrize("profile", ["tiny", "sample", "default", "paper"])
def test_one_override_reaches_every_training_notebook(profile):
    """``cxrstudy run 03 -p min_lr=1e-5``: the key reaches every training notebook's schedule (it
    once reached only 02 and 03, the two that declared it)."""
    from conftest import REPO

    specs = discover_notebooks(REPO / "notebooks")
    resolved = resolve_parameters(profile, ["min_lr=1e-5", "ema_decay=0.999"], specs,
                                  REPO / "params")
    for name in TRAINING_NOTEBOOKS:
        schedule = Schedule.from_parameters(resolved[name])
        assert (schedule.min_lr, schedule.ema_decay) == (1e-5, 0.999), name


@pytest.mark.parametrize("override, words", [
    ("ema_decay=0", "turned off with null"),
    ("grad_clip=0", "turned off with null"),
    ("early_stopping_patience=2.5", "must be int or null"),
    ("ema_decay=high", "must be float or null"),
])
def test_off_spelled_zero_is_refused_before_any_notebook_starts(override, words):
    from conftest import REPO

    with pytest.raises(ConfigError, match=words):
        resolve_parameters("tiny", [override], discover_notebooks(REPO / "notebooks"),
                           REPO / "params")


def test_the_schedule_describes_itself_in_one_line():
    """What a training notebook prints under the cell that builds its schedule."""
    line = Schedule(epochs=4, batch_size=128, lr=0.001, weight_decay=0.025, warmup_epochs=1,
                    min_lr=1e-6, grad_clip=1.0).describe()
    assert line == ("Schedule: 4 epochs of batch 128, AdamW lr 0.001 (weight decay 0.025), 1 warm-up "
                    "epoch(s) then cosine to 1e-06; EMA off, early stopping off, gradient clip 1, "
                    "augmentation on")
    assert "EMA 0.999, early stopping after 2 epochs" in Schedule(ema_decay=0.999,
                                                                  early_stopping_patience=2).describe()
