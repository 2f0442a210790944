"""Training checkpoints: one file each, written atomically, readable with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled
classes), so loading it never runs code from the file. It is first written to a temporary
file in the same folder and then moved over the old one with ``os.replace``: a crash while
saving leaves the previous checkpoint intact, never a half-written one.

Beside each checkpoint, ``<name>.pt.sha256`` records its SHA-256 in ``sha256sum``'s format
(``sha256sum -c`` checks it too); loading verifies it, so a corrupted file is refused by name
instead of being evaluated. The old digest is removed before a checkpoint is replaced, so an
interruption between the two writes leaves a checkpoint without a digest (loaded with a warning),
never one with a wrong digest.

Keys: ``format``, ``version``, ``kind`` ("last"/"best"), ``epoch`` (completed epochs),
``model`` and ``ema`` (state dicts; ``ema`` None when off), ``optimizer``, ``scheduler``,
``history`` (list of per-epoch dicts), ``rng`` (see :mod:`cxrstudy.train.seeding`),
``loader_rng`` (states of data-loader generators), ``augment`` (the augmentation's state when
it has one), ``model_config`` (``model.cxr_config``),
``class_names``, ``train_config``, ``best_val_macro_auc``, ``best_epoch``,
``epochs_without_improvement``, ``stopped_early``.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_path
from ..models import create_model
from ..models.pretrained import load_exact

CHECKPOINT_FORMAT = "cxrstudy-checkpoint"
CHECKPOINT_VERSION = 1
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
DIGEST_SUFFIX = ".sha256"


class CheckpointIntegrityError(ValueError):
    """A checkpoint's bytes are not those whose SHA-256 was recorded when it was written."""

_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size)


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the key of anything ``weights_only`` loading would refuse."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str/int")
            check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}; a checkpoint "
                    f"holds only tensors, numbers, strings, None, lists and dicts")


def to_cpu(value: Any) -> Any:
    """Tensors (nested in dicts/lists) moved to the CPU so a checkpoint loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


def digest_path(path) -> Path:
    """The file beside checkpoint ``path`` that records its SHA-256 (``best.pt.sha256``)."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(payload: dict, path) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file + ``os.replace``), then its
    SHA-256 to :func:`digest_path` (atomically too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **to_cpu(payload)}
    check_plain(payload, str(path))
    digest_file = digest_path(path)
    with atomic_path(path, sync=True) as temp:
        with open(temp, "wb") as stream:
            torch.save(payload, stream)
        digest = file_sha256(temp)  # of the bytes on disk, as a later load reads them
        digest_file.unlink(missing_ok=True)  # never leave the old digest beside the new file
    with atomic_path(digest_file) as temp:
        temp.write_text(f"{digest}  {path.name}\n")
    return path


def remove_checkpoint(path) -> None:
    """Delete checkpoint ``path`` and its digest file (either may already be gone)."""
    Path(path).unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


def verify_checkpoint(path) -> bool:
    """Check ``path`` against its recorded SHA-256: True when it matches, False when no digest
    was recorded (checkpoints of older runs); a mismatch raises
    :class:`CheckpointIntegrityError`."""
    path = Path(path)
    digest_file = digest_path(path)
    if not digest_file.is_file():
        return False
    fields = digest_file.read_text().split()
    expected = fields[0].lower() if fields else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise CheckpointIntegrityError(f"{digest_file} does not hold a SHA-256 hex digest "
                                       f"(found {digest_file.read_text()[:80]!r})")
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointIntegrityError(
            f"checkpoint {path} is corrupt: its SHA-256 is {actual}, but {digest_file.name} "
            f"recorded {expected} when it was written; retrain, or restore the file")
    return True


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` after checking its recorded SHA-256
    (:func:`verify_checkpoint`); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verified = verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cxrstudy checkpoint (no format={CHECKPOINT_FORMAT!r}); "
                         f"for bare weights use create_model(..., pretrained=path)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {payload['version']}, newer than this "
                         f"cxrstudy understands ({CHECKPOINT_VERSION})")
    if not verified:
        warnings.warn(f"checkpoint {path} has no {digest_path(path).name} (written before "
                      f"checkpoints recorded their SHA-256, or interrupted): its integrity is "
                      f"not checked", stacklevel=2)
    return payload


def existing_checkpoints(directory) -> list[Path]:
    """The checkpoint files already in ``directory`` (last.pt, best.pt)."""
    directory = Path(directory)
    return [directory / name for name in (LAST_NAME, BEST_NAME) if (directory / name).is_file()]


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a run folder's best.pt (last.pt when no best.pt was written)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST_NAME, LAST_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds neither {BEST_NAME} nor {LAST_NAME}")
    return path


def load_model_from_checkpoint(path, map_location="cpu", use_ema: bool = True
                               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as and load its weights (eval mode).

    EMA weights are used when the run kept them (they are what validation selected),
    unless ``use_ema=False``. ``meta`` holds the checkpoint's path, kind, epoch, class names,
    model and training configs, history, best validation AUC and which weights were loaded.
    """
    path = checkpoint_file(path)
    payload = load_checkpoint(path, map_location=map_location)
    config = payload.get("model_config") or {}
    needed = ("name", "num_classes", "in_chans", "image_size")
    missing = [k for k in needed if k not in config]
    if missing:
        raise ValueError(f"{path}: model_config lacks {missing}; the model was not built with "
                         f"cxrstudy.models.create_model, so it cannot be rebuilt")
    model = create_model(config["name"], config["num_classes"], in_chans=config["in_chans"],
                         image_size=config["image_size"], pretrained=False,
                         input_norm=config.get("input_norm"),  # None (older runs): from scratch
                         **dict(config.get("kwargs") or {}))
    model.cxr_config = dict(config)
    weights = "ema" if use_ema and payload.get("ema") is not None else "model"
    load_exact(model, payload[weights], source=f"weights in {path}")
    model.eval()
    meta = {
        "path": str(path), "kind": payload.get("kind"), "epoch": payload.get("epoch"),
        "class_names": payload.get("class_names"), "model_config": dict(config),
        "train_config": payload.get("train_config"), "history": payload.get("history", []),
        "best_val_macro_auc": payload.get("best_val_macro_auc"),
        "best_epoch": payload.get("best_epoch"), "weights": weights,
    }
    return model, meta


__all__ = ["save_checkpoint", "load_checkpoint", "verify_checkpoint", "remove_checkpoint",
           "digest_path", "file_sha256", "CheckpointIntegrityError", "DIGEST_SUFFIX", "existing_checkpoints", "check_plain", "to_cpu",
           "checkpoint_file", "load_model_from_checkpoint", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION", "LAST_NAME", "BEST_NAME"]
