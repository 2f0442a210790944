"""The rehearsal's only departure from params/paper.yaml: scale. One list, in one place.

Every notebook runs with the paper profile's datasets, resolutions, models, arms, teacher and
pretrained settings; these overrides (``-p key=value`` on top of the profile) change only how
much is computed: images, epochs, batch size, bootstrap draws, the learning rates 05 searches
(and on which arm) and the number of images the explanation notebook draws maps for. The report names them
(:func:`scale_note`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PROFILE = "paper"

#: key → value, applied to every notebook that declares the key (``-p key=value``).
#: ``max_images`` stays the paper's null: the releases on disk are already miniature (their size
#: is :data:`RELEASE_SIZES`), written so that every class has positives in train and test, as in
#: the real releases. A random cap on top would drop rare classes from training, which the
#: paper's data never does (06's class-balanced losses refuse a class without positives).
SCALE_OVERRIDES: dict[str, object] = {
    "epochs": 1,
    "teacher_epochs": 1,
    "batch_size": 16,
    "n_boot": 20,
    "max_boxed_images": 2,     # 07: boxed images scored per model (ScoreCAM: a forward per channel)
    "n_figure_images": 2,
    "score_cam_batch_size": 64,
    "lr_grid": [0.0005, 0.001],  # 05: two of the paper grid's six rates (its lr and one more)
    "lr_sweep_arms": ["linear_probe"],  # 05: the search on one arm (its machinery, CI's minutes)
}

#: Images written per release (about; whole patients, every class covered first).
RELEASE_SIZES = {"nih": 120, "chexpert": 120, "vindr": 100}

NOTE = ("REHEARSAL — every number on this page comes from SYNTHETIC PIXELS (generated phantoms "
        "in the real releases' layouts and label files) and random stand-in weights, scaled "
        "down from the paper profile; it shows that the paper path runs, nothing about the "
        "methods. Scale overrides: {overrides}.")


def override_arguments(overrides: dict[str, object] | None = None) -> list[str]:
    """``key=value`` strings for the runner (values as JSON, which its YAML parser reads)."""
    overrides = SCALE_OVERRIDES if overrides is None else overrides
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def scale_note(overrides: dict[str, object] | None = None) -> str:
    """The sentence the report shows on its page (08_report's ``profile_note``)."""
    return NOTE.format(overrides=", ".join(override_arguments(overrides)))


def rehearsal_environment(folder, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a rehearsal run: data root, preprocessing cache and every weight
    cache inside ``folder`` (``HOME`` too: torchxrayvision's cache is ``~/.torchxrayvision``), the
    hub offline. The user's own caches are never read or written."""
    folder = Path(folder).resolve()
    home = folder / "home"
    env = dict(os.environ if base is None else base)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(variable, None)
    env.update({
        "CXRSTUDY_DATA_ROOT": str(folder / "data"),
        "CXRSTUDY_CACHE_DIR": str(folder / "cache"),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "TORCH_HOME": str(home / ".cache" / "torch"),
        "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
        "HF_HUB_OFFLINE": "1",
    })
    return env


def hf_hub_cache(folder) -> Path:
    """The hub cache a rehearsal run resolves (``$HF_HOME/hub``)."""
    return Path(rehearsal_environment(folder, base={})["HF_HOME"]) / "hub"


__all__ = ["PROFILE", "SCALE_OVERRIDES", "RELEASE_SIZES", "override_arguments", "scale_note",
           "rehearsal_environment", "hf_hub_cache"]
