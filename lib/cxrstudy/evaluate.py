"""Evaluate a saved checkpoint on any dataset split, matching label spaces by name.

A model trained on NIH knows "Effusion"; CheXpert calls it "Pleural Effusion"; VinDr has
findings NIH never labelled. Classes are paired by :func:`cxrstudy.data.labels.match_classes`
(case, separators and a small synonym table); a class on one side only is listed under
``unmatched_model_classes`` / ``unmatched_dataset_classes`` and left out — never guessed.
Metrics (per-class AUC with patient-bootstrap CIs, macro/micro AUC, AP, F1) come from
:func:`cxrstudy.metrics.summarize` on the matched classes.

Command line: ``cxrstudy evaluate runs/nih/best.pt --dataset chexpert --split test``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .display import format_ci
from .files import write_json_atomic
from .models import create_model
from .models.pretrained import load_exact
from .outputs import Outputs
from .train.checkpoint import checkpoint_file, load_checkpoint, load_model_from_checkpoint
from .train.predict import Predictions, predict_batches


def predict_probabilities(model: nn.Module, loader, device=None, progress: bool = True,
                          desc: str = "evaluate") -> Predictions:
    """A checkpoint's or a teacher's probabilities with targets, masks and indices, on one
    device (the training loop's own :func:`~cxrstudy.train.predict.predict_batches`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc=desc, disable=not progress, leave=False)
    return predict_batches(model.to(device), bar, to_device=lambda batch: {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()})


def training_patients_in(dataset, checkpoint_path) -> int | None:
    """How many patients of ``dataset`` the checkpoint's run trained or validated on, from the
    run's ``splits.csv`` (``<run>/checkpoints/<tag>/best.pt`` → ``<run>/splits.csv``); None when
    no such file is there. A non-zero count means the scores are optimistic: it is warned."""
    import warnings

    run = Outputs.of_checkpoint(checkpoint_path)
    splits = None if run is None else run.load_splits()
    if splits is None or not {"patient_id", "split"} <= set(splits.columns):
        return None
    overlap = run.trained_on("patient_id") & {str(p) for p in dataset.patient_ids}
    if overlap:
        warnings.warn(f"{len(overlap)} patients of the evaluated split were in the checkpoint's "
                      f"training or validation split ({run.splits_file}); its scores are "
                      f"optimistic. Pass the seed it was trained with (--seed) or another split.",
                      stacklevel=2)
    return len(overlap)


def evaluate_checkpoint(checkpoint, dataset_name: str, root=None, split: str = "test",
                        image_size: int | None = None, out=None, batch_size: int = 64,
                        n_boot: int = 1000, *, seed: int | None = None, class_names=None,
                        overwrite: bool = False, use_ema: bool = True, device=None,
                        num_workers: int = 0, progress: bool = True, **dataset_options) -> dict:
    """Metrics of ``checkpoint`` on ``dataset_name``'s ``split``, written to ``out`` (JSON).

    ``image_size`` defaults to the size the model was trained at. ``class_names`` overrides
    the checkpoint's (needed only for checkpoints saved without them). ``dataset_options``
    go to :func:`cxrstudy.data.load_dataset` (e.g. ``uncertainty``, ``cache=True``).
    An existing ``out`` is replaced only with ``overwrite=True``.

    The patient-level split is drawn with ``seed``; by default the seed the checkpoint was
    trained with, so a model is scored on the split it was tested on, not partly on its own
    training images. When the run's ``splits.csv`` sits beside its checkpoints, the evaluated
    rows are checked against its training and validation patients, and any overlap is counted
    in ``training_patients_in_split`` and warned about.
    """
    from .data import load_dataset
    from .data.labels import match_classes
    from .data.loader import BatchLoader
    from .metrics import json_ready, summarize

    out = None if out is None else Path(out)
    if out is not None and out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) or another --out")
    model, meta = load_model_from_checkpoint(checkpoint, use_ema=use_ema)
    model_classes = list(class_names) if class_names is not None else meta["class_names"]
    if not model_classes:
        raise ValueError(f"{meta['path']} stores no class names, so its outputs cannot be "
                         f"matched to a dataset's labels by name; pass class_names=[...]")
    if len(model_classes) != meta["model_config"]["num_classes"]:
        raise ValueError(f"{len(model_classes)} class names for a model with "
                         f"{meta['model_config']['num_classes']} outputs")
    size = int(image_size or meta["model_config"]["image_size"])
    trained_seed = (meta.get("train_config") or {}).get("seed")
    split_seed = int(seed if seed is not None else trained_seed if trained_seed is not None else 0)
    dataset = load_dataset(dataset_name, root=root, split=split, image_size=size, seed=split_seed,
                           progress=progress, **dataset_options)
    seen = training_patients_in(dataset, meta["path"])
    pairs, only_model, only_dataset = match_classes(model_classes, dataset.classes)
    if not pairs:
        raise ValueError(f"no class of the model ({model_classes}) matches a class of "
                         f"{dataset_name} ({list(dataset.classes)}) by name")

    loader = BatchLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    outputs = predict_probabilities(model, loader, device=device, progress=progress,
                                    desc=f"{dataset_name}/{split}")
    model_columns = [model_classes.index(m) for m, _ in pairs]
    dataset_columns = [list(dataset.classes).index(d) for _, d in pairs]
    rows = outputs.indices
    per_class, overall = summarize(
        outputs.targets[:, dataset_columns], outputs.probs[:, model_columns],
        classes=[d for _, d in pairs], mask=outputs.masks[:, dataset_columns],
        patient_ids=dataset.patient_ids[rows], n_boot=n_boot, seed=split_seed, progress=progress)
    per_class.insert(1, "model_class", [m for m, _ in pairs])

    result = json_ready({
        "checkpoint": meta["path"], "checkpoint_kind": meta["kind"],
        "checkpoint_epoch": meta["epoch"], "weights": meta["weights"],
        "model": meta["model_config"]["name"], "model_config": meta["model_config"],
        "dataset": dataset_name, "root": None if root is None else str(root), "split": split,
        "image_size": size, "n_images": int(len(rows)),
        "split_seed": split_seed, "split_seed_from": ("--seed" if seed is not None else
                                                      "checkpoint" if trained_seed is not None
                                                      else "default 0"),
        "training_patients_in_split": seen,
        "matched_classes": [{"model": m, "dataset": d} for m, d in pairs],
        "unmatched_model_classes": list(only_model),
        "unmatched_dataset_classes": list(only_dataset),
        "overall": overall,
        "per_class": per_class.to_dict(orient="records"),
    })
    if out is not None:
        write_json_atomic(out, result, allow_nan=False)
        result["out"] = str(out)
    return result


def main_evaluate(args) -> int:
    """``cxrstudy evaluate``: print the headline numbers, write the JSON; 2 on bad input."""
    from .paths import DataNotFoundError

    try:
        result = evaluate_checkpoint(
            args.checkpoint, args.dataset, root=getattr(args, "root", None),
            split=getattr(args, "split", "test"), image_size=getattr(args, "image_size", None),
            out=getattr(args, "out", None), batch_size=getattr(args, "batch_size", 64),
            n_boot=getattr(args, "n_boot", 1000), seed=getattr(args, "seed", None),
            overwrite=getattr(args, "overwrite", False),
            progress=not getattr(args, "quiet", False))
    except (FileNotFoundError, FileExistsError, DataNotFoundError, ValueError, KeyError) as exc:
        print(f"cxrstudy evaluate: {exc}", file=sys.stderr)
        return 2
    overall = result["overall"]
    auc = format_ci(overall["macro_auc"], overall["macro_auc_low"], overall["macro_auc_high"],
                    digits=4, label="95% CI ")
    print(f"{result['model']} on {result['dataset']}/{result['split']} "
          f"({result['n_images']} images, {len(result['matched_classes'])} matched classes): "
          f"macro AUC {auc or 'n/a'}")
    if result["unmatched_model_classes"]:
        print("  model classes without a dataset label: "
              + ", ".join(result["unmatched_model_classes"]))
    if result["unmatched_dataset_classes"]:
        print("  dataset classes the model does not predict: "
              + ", ".join(result["unmatched_dataset_classes"]))
    print(f"  split drawn with seed {result['split_seed']} ({result['split_seed_from']})")
    if result.get("training_patients_in_split"):
        print(f"  warning: {result['training_patients_in_split']} of these patients were in the "
              f"checkpoint's training/validation split: the scores are optimistic")
    if result.get("out"):
        print(f"  metrics written to {result['out']}")
    return 0


__all__ = ["load_model_from_checkpoint", "evaluate_checkpoint", "predict_probabilities",
           "main_evaluate"]
