"""Resolving a teacher by name: torchxrayvision weights (``"txv-<weights>"``) or one of our runs.

The teacher modules themselves are :mod:`cxrstudy.models.teachers`; reading a run's checkpoint is
training's business (:mod:`cxrstudy.train.checkpoint`), so the lookup that needs both lives here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torch import nn

from ..models.teachers import CheckpointTeacher, TXVTeacher, TXV_PREFIX, TXV_TEACHER_NAME
from .checkpoint import load_model_from_checkpoint


def load_teacher(name_or_checkpoint, num_classes: int, class_names: Sequence[str] | None = None,
                 *, cache_dir=None, download: bool = False, calibrated: bool = False,
                 use_ema: bool = True) -> nn.Module:
    """A teacher for a student with ``num_classes`` outputs named ``class_names``.

    ``"txv-densenet121-res224-chex"`` (or ``"txv-<other xrv weights>"``) → :class:`TXVTeacher`;
    a cxrstudy checkpoint file or run folder → :class:`CheckpointTeacher` (the checkpoint's own
    class names are matched to ``class_names``; its EMA weights when it has them).
    """
    if class_names is not None and len(class_names) != int(num_classes):
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    key = os.fspath(name_or_checkpoint)
    if key.startswith(TXV_PREFIX):
        if class_names is None:
            raise ValueError("a torchxrayvision teacher needs class_names to map its outputs")
        return TXVTeacher.from_pretrained(key[len(TXV_PREFIX):], class_names, cache_dir=cache_dir,
                                          download=download, calibrated=calibrated)
    path = Path(key).expanduser()
    if not path.exists():
        raise ValueError(f"unknown teacher {key!r}: give {TXV_TEACHER_NAME!r} (or 'txv-' + "
                         f"another torchxrayvision weight name) or the path of a cxrstudy "
                         f"checkpoint or run folder; {path} does not exist")
    model, meta = load_model_from_checkpoint(path, use_ema=use_ema)
    config = meta["model_config"]
    teacher_classes = meta.get("class_names")
    if teacher_classes is None or class_names is None:
        if int(config["num_classes"]) != int(num_classes):
            raise ValueError(f"{meta['path']} predicts {config['num_classes']} classes, the "
                             f"student {num_classes}, and without class names on both sides "
                             f"they cannot be matched")
        teacher_classes = teacher_classes or class_names or [str(i) for i in range(num_classes)]
        class_names = class_names or teacher_classes
    name = f"checkpoint:{config['name']}:{Path(meta['path']).parent.name}/{Path(meta['path']).name}"
    return CheckpointTeacher(model, teacher_classes, class_names,
                             image_size=config.get("image_size"), name=name)


__all__ = ["load_teacher"]
