"""Stand-ins for the pretrained weights the paper profile asks for: random tensors of the real
shapes, written where and how the real loaders look, so the real loading code runs.

- timm's ImageNet weights (05_glori's ``backbone_weights: pretrained``; 06's two CAN networks,
  ``pretrained: true``): a ``model.safetensors`` in the Hugging Face hub cache layout
  (``models--timm--<name>/blobs/<sha256>``, a
  ``snapshots/<revision>/model.safetensors`` link to it and ``refs/main``), which
  :func:`cxrstudy.models.pretrained.find_cached_weights` finds through ``huggingface_hub``.
- torchxrayvision's ``densenet121-res224-chex`` (03's teacher): the pickled whole model xrv's
  ``DenseNet`` ``torch.load``s, under the file name of its release URL in
  ``~/.torchxrayvision/models_data/`` (so ``HOME`` points the cache elsewhere).

The revision is a fixed made-up commit id; nothing here is downloaded.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

STAND_IN_REVISION = hashlib.sha1(b"cxrstudy rehearsal weight stand-in").hexdigest()
TIMM_WEIGHTS = ("vit_small_patch16_224",)  # what params/paper.yaml loads from timm's cache
CAN_TIMM_WEIGHTS = ("resnet18", "densenet121")  # 06_cross_attention's backbones, pretrained
TXV_WEIGHTS = ("densenet121-res224-chex",)  # what params/paper.yaml loads from xrv's cache


def _seeded(build, seed: int):
    """A model built by its own constructor under a fixed seed: random tensors of the real shapes
    that are still valid weights (batch-norm variances positive, as a trained file's are; a
    plain redraw of every tensor makes them negative and the teacher's outputs NaN)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build()
    finally:
        torch.random.set_rng_state(state)


def write_timm_standin(timm_name: str, hf_cache, seed: int = 0) -> Path:
    """``model.safetensors`` for ``timm_name``'s default pretrained tag in ``hf_cache`` (the hub
    cache folder, i.e. ``$HF_HOME/hub``); returns the snapshot path the loader resolves."""
    import timm
    import timm.models
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm has no Hugging Face hub weights for {timm_name!r}")
    repo = cfg.hf_hub_id.split("@")[0]
    # the released shapes: three input channels, timm's 1000 ImageNet classes
    model = _seeded(lambda: timm.create_model(timm_name, pretrained=False), seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = Path(hf_cache) / ("models--" + repo.replace("/", "--"))
    name = cfg.hf_hub_filename or "model.safetensors"
    blobs = folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    staging = blobs / f".{name}.incomplete"
    save_file(state, str(staging), metadata={"format": "pt"})
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    blob = blobs / digest
    os.replace(staging, blob)
    snapshot = folder / "snapshots" / STAND_IN_REVISION / name
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.is_symlink() or snapshot.exists():
        snapshot.unlink()
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(STAND_IN_REVISION)
    return snapshot


def write_txv_standin(weights: str, cache_dir, seed: int = 0) -> Path:
    """xrv's weight file for ``weights`` in ``cache_dir`` (xrv's ``models_data`` folder): a
    pickled ``xrv.models.DenseNet`` with one output per slot of the real weights."""
    import torchxrayvision as xrv

    entry = xrv.models.model_urls[weights]
    model = _seeded(lambda: xrv.models.DenseNet(num_classes=len(entry["labels"])), seed)
    path = Path(cache_dir) / os.path.basename(entry["weights_url"])
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".incomplete")
    torch.save(model, staging)
    os.replace(staging, path)
    return path


def write_weight_standins(home, hf_cache) -> list[Path]:
    """Every stand-in the paper profile needs: timm's under ``hf_cache``, xrv's under
    ``home``/.torchxrayvision/models_data."""
    timm_names = dict.fromkeys(TIMM_WEIGHTS + CAN_TIMM_WEIGHTS)  # each once, in order
    written = [write_timm_standin(name, hf_cache) for name in timm_names]
    txv_cache = Path(home) / ".torchxrayvision" / "models_data"
    written += [write_txv_standin(name, txv_cache) for name in TXV_WEIGHTS]
    return written


__all__ = ["write_timm_standin", "write_txv_standin", "write_weight_standins",
           "STAND_IN_REVISION", "TIMM_WEIGHTS", "CAN_TIMM_WEIGHTS", "TXV_WEIGHTS"]
