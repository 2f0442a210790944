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

from ..outputs import Outputs
from ..train.checkpoint import checkpoint_file


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


def find_trained_models(results_root: Path, notebooks: Sequence[str],
                        include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
                        ) -> list[TrainedModel]:
    """Run folders of ``notebooks`` under ``results_root`` (``results/<profile>``), in notebook
    then tag order, whose ``<notebook>/<tag>`` matches an ``include`` pattern and no ``exclude``
    pattern (``fnmatch``). A listed notebook that has not run is an error, naming it."""
    found = []
    for notebook in notebooks:
        outputs = Outputs.of_notebook(results_root, notebook)
        if not outputs.root.is_dir():
            raise FileNotFoundError(f"{outputs.root} does not exist: run {notebook} "
                                    f"with this profile (into the same results folder) first")
        for run in outputs.checkpoint_dirs():
            try:
                path = checkpoint_file(run)
            except FileNotFoundError:  # a run that has not finished its first epoch
                continue
            model = TrainedModel(notebook, run.name, path)
            if any(fnmatch.fnmatch(model.key, p) for p in include) and \
                    not any(fnmatch.fnmatch(model.key, p) for p in exclude):
                found.append(model)
    return found


def seen_splits(results_root: Path, notebook: str) -> pd.Series:
    """image_id → split of ``notebook``'s ``splits.csv`` (empty when it wrote none)."""
    table = Outputs.of_notebook(results_root, notebook).load_splits()
    if table is None:
        return pd.Series(dtype=str)
    return table.drop_duplicates("image_id").set_index("image_id")["split"]


__all__ = ["TrainedModel", "find_trained_models", "seen_splits"]
