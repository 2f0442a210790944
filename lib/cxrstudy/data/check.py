"""Data check: does a dataset folder parse, and does every image it lists decode?

Run before a long training job (``cxrstudy data check nih --root /data``): it reads every image
once through the adapter, so a missing or truncated file is found now, named, rather than hours
into an epoch. Nothing is written.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .base import CorruptImageError
from .splits import describe_leak, shared_patients
from ..pipeline.arguments import add_check_arguments

CHUNK = 256


@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``ok`` is False when anything is wrong."""

    name: str
    root: str | None
    images: int = 0
    patients: int = 0
    classes: list[str] = field(default_factory=list)
    prevalence: pd.DataFrame = field(default_factory=pd.DataFrame)
    views: dict[str, int] = field(default_factory=dict)
    image_shapes: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    missing: list[str] = field(default_factory=list)   # "image_id: path" of absent files
    corrupt: list[str] = field(default_factory=list)   # "image_id: reason" of undecodable files
    problems: list[str] = field(default_factory=list)  # anything else that makes the data unusable
    notes: list[str] = field(default_factory=list)     # worth knowing, not wrong

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.problems) and self.images > 0

    def to_text(self, max_listed: int = 50) -> str:
        status = "OK" if self.ok else "PROBLEMS FOUND"
        lines = [f"Data check of {self.name!r} at {self.root}: {status}",
                 f"  images: {self.images}   patients: {self.patients}   "
                 f"decoded: {self.checked - len(self.missing) - len(self.corrupt)}"
                 f"/{self.checked}"]
        if self.views:
            lines.append("  views: " + ", ".join(f"{k} {v}" for k, v in self.views.items()))
        if self.image_shapes:
            lines.append("  image sizes (h×w): " + ", ".join(
                f"{k} {v}" for k, v in self.image_shapes.items()))
        if len(self.prevalence):
            lines.append("  labels per class:")
            table = self.prevalence.to_string(index=False, float_format=lambda v: f"{v:.4f}")
            lines.extend("    " + row for row in table.splitlines())
        for title, entries in (("missing files", self.missing), ("corrupt files", self.corrupt),
                               ("problems", self.problems), ("notes", self.notes)):
            if entries:
                lines.append(f"  {title} ({len(entries)}):")
                lines.extend(f"    {entry}" for entry in entries[:max_listed])
                if len(entries) > max_listed:
                    lines.append(f"    ... and {len(entries) - max_listed} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _read_one(dataset, i: int):
    """(shape, None) when image ``i`` decodes, else (None, (kind, description))."""
    image_id = str(dataset.records.at[i, "image_id"])
    try:
        image = dataset.read_image(i)
    except FileNotFoundError as exc:
        return None, ("missing", f"{image_id}: {exc.filename or exc}")
    except CorruptImageError as exc:
        return None, ("corrupt", f"{image_id}: {exc}")
    except OSError as exc:
        return None, ("corrupt", f"{image_id}: cannot read ({exc})")
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8 or image.size == 0:
        return None, ("problem", f"{image_id}: the adapter decoded it to shape {image.shape} "
                                 f"{image.dtype}, not a 2-D uint8 image")
    return image.shape, None


def _summarise_tables(report: CheckReport, dataset) -> None:
    records = dataset.records
    report.images = len(dataset)
    report.patients = int(records["patient_id"].nunique())
    report.classes = list(dataset.classes)
    report.prevalence = dataset.describe()
    views = records["view"].fillna("unknown").astype(str).value_counts()
    report.views = {str(k): int(v) for k, v in views.items()}
    duplicated = records["image_id"][records["image_id"].duplicated()].astype(str).unique()
    if len(duplicated):
        report.problems.append(f"{len(duplicated)} image ids are listed more than once, e.g. "
                               + ", ".join(duplicated[:5]))
    if report.images == 0:
        report.problems.append("the label files list no images")
    if "official_split" in records.columns:
        # Training would refuse this split (splits.assign_splits); say so before it starts.
        leaked = shared_patients(records["patient_id"], records["official_split"])
        if leaked:
            report.problems.append(describe_leak(leaked, "the official split"))
    for class_name, positives in zip(report.prevalence["class"], report.prevalence["positives"]):
        if positives == 0:
            report.notes.append(f"class {class_name} has no positive image")
    unlabelled = int(np.isnan(dataset.labels).all(axis=1).sum()) if dataset.labels.size else 0
    if unlabelled:
        report.notes.append(f"{unlabelled} images have no known label at all")
    if getattr(dataset, "synthetic", False):
        report.notes.append("this dataset is SYNTHETIC (generated images, not radiographs)")
    boxes = getattr(dataset, "boxes", None)
    if boxes is not None and len(boxes):
        stray = set(boxes["image_id"].astype(str)) - set(records["image_id"].astype(str))
        if stray:
            report.notes.append(f"{len(stray)} box rows name images not in the label file")


def check_dataset(name: str, root=None, image_size: int | None = None, progress: bool = True,
                  workers: int | None = None) -> CheckReport:
    """Parse dataset ``name`` at ``root`` and decode every image; collect what is wrong.

    Errors while building the adapter (a missing or malformed label file) are caught into
    ``problems`` so the report always comes back.
    """
    from . import dataset_class, resolve_name

    report = CheckReport(name=name, root=None if root is None else str(root))
    try:
        options = {} if image_size is None else {"image_size": int(image_size)}
        adapter_name, adapter_root = resolve_name(name, root)
        dataset = dataset_class(adapter_name)(root=adapter_root, strict=False, **options)
    except Exception as exc:  # report any failure to parse, whatever its type
        report.problems.append(f"cannot load dataset {name!r} from {root}: "
                               f"{exc.__class__.__name__}: {exc}")
        return report

    _summarise_tables(report, dataset)
    shapes: Counter = Counter()
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    n = len(dataset)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=n, desc=f"checking {name}", unit="img", disable=not progress,
                 leave=False) as bar:
        for start in range(0, n, CHUNK):
            rows = range(start, min(n, start + CHUNK))
            for shape, failure in pool.map(lambda i: _read_one(dataset, i), rows):
                if failure is None:
                    shapes[f"{shape[0]}x{shape[1]}"] += 1
                else:
                    kind, text = failure
                    {"missing": report.missing, "corrupt": report.corrupt,
                     "problem": report.problems}[kind].append(text)
            bar.update(len(rows))
    report.checked = n
    report.image_shapes = dict(shapes.most_common())
    return report


def main_check(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Print the check report; exit status 0 when all is well, 1 when anything is wrong."""
    if args is None or isinstance(args, (list, tuple)):
        parser = add_check_arguments(argparse.ArgumentParser(prog="cxrstudy data check"))
        args = parser.parse_args(args)
    report = check_dataset(args.name, root=getattr(args, "root", None),
                           image_size=getattr(args, "image_size", None),
                           progress=getattr(args, "progress", True))
    print(report.to_text())
    return 0 if report.ok else 1


__all__ = ["CheckReport", "check_dataset", "main_check", "add_check_arguments"]
