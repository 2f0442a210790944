"""Every model a profile trained: ``results/<profile>/<notebook>/checkpoints/<tag>/``.

Each run folder holds ``best.pt`` (the epoch validation chose) or, without validation AUC,
``last.pt``; :func:`cxrstudy.train.checkpoint.load_model_from_checkpoint` rebuilds the model from the
recipe it stores. Nothing is guessed from folder names: architecture, classes and image size come
from the checkpoint.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..train.checkpoint import BEST_NAME, LAST_NAME


@dataclass(frozen=True)
class TrainedModel:
    """One run folder: where it came from and the checkpoint file to load."""

    notebook: str
    tag: str
    checkpoint: Path

    @property
    def key(self) -> str:
        """``<notebook>/<tag>``: unique within a profile (tags repeat across notebooks)."""
        return f"{self.notebook}/{self.tag}"


def checkpoint_file(folder: Path) -> Path | None:
    for name in (BEST_NAME, LAST_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def find_trained_models(results_root: Path, notebooks: Sequence[str],
                        include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
                        ) -> list[TrainedModel]:
    """Run folders of ``notebooks`` under ``results_root`` (``results/<profile>``), in notebook
    then tag order, whose ``<notebook>/<tag>`` matches an ``include`` pattern and no ``exclude``
    pattern (``fnmatch``). A listed notebook that has not run is an error, naming it."""
    results_root = Path(results_root)
    found = []
    for notebook in notebooks:
        folder = results_root / notebook / "checkpoints"
        if not (results_root / notebook).is_dir():
            raise FileNotFoundError(f"{results_root / notebook} does not exist: run {notebook} "
                                    f"with this profile (into the same results folder) first")
        for run in sorted(p for p in folder.glob("*") if p.is_dir()):
            path = checkpoint_file(run)
            if path is None:
                continue
            model = TrainedModel(notebook, run.name, path)
            if any(fnmatch.fnmatch(model.key, p) for p in include) and \
                    not any(fnmatch.fnmatch(model.key, p) for p in exclude):
                found.append(model)
    return found


def seen_splits(results_root: Path, notebook: str) -> pd.Series:
    """image_id → split of ``notebook``'s ``splits.csv`` (empty when it wrote none)."""
    path = Path(results_root) / notebook / "splits.csv"
    if not path.is_file():
        return pd.Series(dtype=str)
    table = pd.read_csv(path, dtype={"image_id": str})
    return table.drop_duplicates("image_id").set_index("image_id")["split"]


__all__ = ["TrainedModel", "checkpoint_file", "find_trained_models", "seen_splits"]
