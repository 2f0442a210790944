"""Where a notebook writes its figures, tables and metrics, in one layout every notebook shares.

``results/<profile>/<notebook>/``: ``figures/`` (PNG + SVG), ``tables/`` (CSV + Markdown),
``metrics.json`` (merged key by key, so several cells can each add their part), ``splits.csv``,
``checkpoints/<tag>/``, ``predictions/<tag>.npz``, ``backbones/<tag>.pt``, ``provenance.json``
(the runner's record) and the executed notebook. :class:`Outputs` is the only code that spells
these names; training, the runner, the report, the explanations and the CLI ask it for paths.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import files


def plain_json(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to None, DataFrames to records (how
    metrics.json and provenance.json are written, sorted, with :func:`files.write_json_atomic`)."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return plain_json(value.to_dict(orient="records"))
    if isinstance(value, np.ndarray):
        return plain_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: A parameter value ``run:<notebook>/<tag>`` names what another notebook of the same profile
#: wrote (03's ``teacher: run:01_baseline/densenet121``): the runner runs that notebook first, and
#: the notebook reads the run from its folder.
RUN_REFERENCE = "run:"


def parse_run_reference(value: Any) -> tuple[str, str] | None:
    """``"run:<notebook>/<tag>"`` → ``(notebook, tag)`` (tag ``""`` when absent); any other value
    → None. The one reader of the syntax, for the runner's dependency order and the notebooks."""
    if not (isinstance(value, str) and value.startswith(RUN_REFERENCE)):
        return None
    notebook, _, tag = value[len(RUN_REFERENCE):].partition("/")
    return notebook, tag


def dropped_summary(dropped: dict[str, str], shown: int = 3) -> str:
    """``"2 (a.png, b.png)"`` for the images a run left out as unreadable; "" when none."""
    if not dropped:
        return ""
    names = ", ".join(list(dropped)[:shown]) + (", ..." if len(dropped) > shown else "")
    return f"{len(dropped)} ({names})"


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); pipes in cells are escaped."""
    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "\\|")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def profile_dir(results_dir: str | os.PathLike, profile: str) -> Path:
    """``<results>/<profile>``: every notebook run with ``profile`` writes one folder in it."""
    return Path(results_dir) / profile


def _read_json(path: Path) -> dict:
    """A JSON file's contents ({} when there is none); an unreadable one is an error naming it."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


class Outputs:
    """One notebook's results folder, ``results/<profile>/<notebook>/``, and the one place that
    knows its layout: every module that reads or writes a run's files asks it for the path.

    ``Outputs(output_dir, synthetic=data.synthetic)`` is built once the data is loaded, so
    every artefact made from synthetic data says so; it creates the folder on first write.
    :meth:`read_only` opens an existing folder (another notebook's, the runner's, the report's)
    without the right to write into it.
    """

    METRICS = "metrics.json"
    PROVENANCE = "provenance.json"
    SPLITS = "splits.csv"
    CHECKPOINTS = "checkpoints"
    PREDICTIONS = "predictions"
    BACKBONES = "backbones"
    FIGURES = "figures"
    TABLES = "tables"
    PREVIOUS = "_previous"  # in the profile folder: earlier outputs moved aside before a rerun

    def __init__(self, output_dir: str | os.PathLike, synthetic: bool = False):
        self.root = Path(output_dir)
        self.figures = self.root / self.FIGURES
        self.tables = self.root / self.TABLES
        self._synthetic: bool | None = bool(synthetic)
        self.writable = True

    @classmethod
    def read_only(cls, output_dir: str | os.PathLike) -> "Outputs":
        """An existing (or missing) results folder to read: writing through it is refused, and
        :attr:`synthetic` is what its run recorded in ``metrics.json``."""
        view = cls(output_dir)
        view._synthetic, view.writable = None, False
        return view

    @classmethod
    def of_notebook(cls, profile_dir: str | os.PathLike, notebook: str) -> "Outputs":
        """``notebook``'s results folder in ``profile_dir`` (``results/<profile>``), read-only."""
        return cls.read_only(Path(profile_dir) / notebook)

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike) -> "Outputs | None":
        """The results folder a checkpoint belongs to (``<run>/checkpoints/<tag>/best.pt`` or the
        ``<tag>`` folder itself), read-only; None when ``path`` is not laid out that way."""
        path = Path(path).resolve()
        run_folder = path if path.is_dir() else path.parent
        if run_folder.parent.name != cls.CHECKPOINTS:
            return None
        return cls.read_only(run_folder.parent.parent)

    # --- what the folder is --------------------------------------------------------------------
    @property
    def synthetic(self) -> bool:
        """True when the run's data was synthetic: set at construction, never changed later."""
        if self._synthetic is None:
            return bool(self.load_metrics().get("synthetic_data", False))
        return self._synthetic

    @property
    def name(self) -> str:
        """The notebook this folder belongs to (``01_baseline``)."""
        return self.root.name

    @property
    def profile_dir(self) -> Path:
        """``results/<profile>``: the folder every notebook of the profile writes into."""
        return self.root.parent

    def sibling(self, notebook: str) -> "Outputs":
        """Another notebook's results folder of the same profile, read-only."""
        return Outputs.of_notebook(self.profile_dir, notebook)

    # --- the layout ----------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.root / self.METRICS

    @property
    def provenance_file(self) -> Path:
        """What the runner records of the run (parameters, fingerprint, status)."""
        return self.root / self.PROVENANCE

    @property
    def splits_file(self) -> Path:
        """Every image the notebook loaded with its patient and split."""
        return self.root / self.SPLITS

    @property
    def executed_notebook(self) -> Path:
        return self.root / f"{self.name}.ipynb"

    @property
    def lock_file(self) -> Path:
        """``results/<profile>/.<notebook>.lock``: beside the folder, so it survives archiving."""
        return self.profile_dir / f".{self.name}.lock"

    def archive_dir(self, stamp: str) -> Path:
        """Where earlier outputs go before a rerun: ``results/<profile>/_previous/<notebook>-<stamp>``."""
        return self.profile_dir / self.PREVIOUS / f"{self.name}-{stamp}"

    def checkpoint_dir(self, tag: str) -> Path:
        """The folder of one trained model's ``best.pt`` / ``last.pt``."""
        return self.root / self.CHECKPOINTS / tag

    def checkpoint_dirs(self) -> list[Path]:
        """Every trained model's folder, in tag order (empty when none was trained)."""
        return sorted(p for p in (self.root / self.CHECKPOINTS).glob("*") if p.is_dir())

    def predictions_file(self, tag: str) -> Path:
        """One model's test-set predictions (``.npz``)."""
        return self.root / self.PREDICTIONS / f"{tag}.npz"

    def backbone_file(self, tag: str) -> Path:
        """A fine-tuned backbone's bare weights, for ``create_model(pretrained=...)``."""
        return self.root / self.BACKBONES / f"{tag}.pt"

    def figure_files(self) -> list[Path]:
        return sorted(self.figures.glob("*.png"))

    def table_files(self) -> list[Path]:
        return sorted(self.tables.glob("*.csv"))

    # --- reading -------------------------------------------------------------------------------
    def load_metrics(self) -> dict:
        """``metrics.json`` ({} when the notebook wrote none)."""
        return _read_json(self.metrics_file)

    def load_provenance(self) -> dict:
        """``provenance.json`` ({} when the runner did not run the notebook)."""
        return _read_json(self.provenance_file)

    def dropped_images(self) -> dict[str, str]:
        """The images the run left out as unreadable (``dropped_images`` of its metrics); {}
        also when its metrics cannot be read (a run killed mid-write)."""
        try:
            metrics = self.load_metrics()
        except (OSError, ValueError):
            return {}
        return dict(metrics.get("dropped_images") or {}) if isinstance(metrics, dict) else {}

    def load_splits(self) -> pd.DataFrame | None:
        """``splits.csv`` (ids as strings), or None when the notebook wrote none."""
        if not self.splits_file.is_file():
            return None
        return pd.read_csv(self.splits_file, dtype={"image_id": str, "patient_id": str})

    def trained_on(self, column: str = "image_id") -> set[str]:
        """The ``column`` values (image or patient ids) of the run's train and val splits: what
        its models saw in training. Empty when it wrote no ``splits.csv``."""
        splits = self.load_splits()
        if splits is None or not {column, "split"} <= set(splits.columns):
            return set()
        return set(splits.loc[splits["split"].isin(["train", "val"]), column])

    # --- writing -------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.root} was opened read-only (Outputs.read_only); "
                                  f"only its own notebook writes there")

    def _caption(self, caption: str | None) -> str | None:
        if self.synthetic:
            note = "SYNTHETIC DATA (procedural phantom, not radiographs)"
            return f"{caption} — {note}" if caption else note
        return caption

    def save_splits(self, table: pd.DataFrame) -> Path:
        """Write ``splits.csv`` (image_id, patient_id, split), atomically."""
        self._check_writable()
        with files.atomic_path(self.splits_file) as temp:
            table.to_csv(temp, index=False)
        return self.splits_file

    def save_figure(self, fig, name: str, caption: str | None = None) -> Path:
        """Save ``fig`` as ``figures/<name>.png`` and ``.svg``, and ``caption`` (one sentence
        on what it shows; the report puts it under the figure) as ``figures/<name>.txt``;
        returns the PNG path."""
        self._check_writable()
        self.figures.mkdir(parents=True, exist_ok=True)
        caption = self._caption(caption)
        if caption and self.synthetic:
            fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, color="crimson")
        png = self.figures / f"{name}.png"
        fig.savefig(png, dpi=120, bbox_inches="tight")
        fig.savefig(self.figures / f"{name}.svg", bbox_inches="tight")
        text = self.figure_caption_file(png)
        if caption:
            with files.atomic_path(text) as temp:
                temp.write_text(caption.strip() + "\n")
        else:  # no caption now: an earlier one of this name would describe another figure
            text.unlink(missing_ok=True)
        return png

    @staticmethod
    def figure_caption_file(png: str | os.PathLike) -> Path:
        """Where :meth:`save_figure` keeps a figure's caption: beside it, ``<name>.txt``."""
        return Path(png).with_suffix(".txt")

    @classmethod
    def figure_caption(cls, png: str | os.PathLike) -> str | None:
        """The caption saved with the figure ``png``, or None when it has none."""
        text = cls.figure_caption_file(png)
        caption = text.read_text().strip() if text.is_file() else ""
        return caption or None

    def save_table(self, table: pd.DataFrame, name: str, caption: str | None = None,
                   digits: int = 3) -> Path:
        """Save ``tables/<name>.csv`` (full precision) and ``.md`` (``digits`` decimals, learning
        rates and tiny numbers in e-notation, with caption; a value and its numeric 95% CI
        columns shown as one ``value (low–high)`` cell)."""
        self._check_writable()
        self.tables.mkdir(parents=True, exist_ok=True)
        csv = self.tables / f"{name}.csv"
        table.to_csv(csv, index=False)
        from .display import fold_ci, format_numbers

        shown = format_numbers(fold_ci(table, digits), digits)
        caption = self._caption(caption)
        text = (f"{caption}\n\n" if caption else "") + markdown_table(shown) + "\n"
        (self.tables / f"{name}.md").write_text(text)
        return csv

    def save_metrics(self, **entries: Any) -> Path:
        """Merge ``entries`` into ``metrics.json`` (keys already there are replaced, others kept)."""
        self._check_writable()
        current = self.load_metrics()
        current.update(plain_json(entries))
        if self.synthetic:
            current["synthetic_data"] = True
        files.write_json_atomic(self.metrics_file, plain_json(current), sort_keys=True)
        return self.metrics_file


__all__ = ["Outputs", "RUN_REFERENCE", "dropped_summary", "markdown_table", "parse_run_reference",
           "plain_json", "profile_dir"]
