"""Pretrained weights without surprises: local caches first, and a fast, explained failure.

timm fetches ImageNet weights from the Hugging Face hub. Offline, or behind a firewall, a plain
``timm.create_model(..., pretrained=True)`` either fails with a bare hub error or sits in
connection retries. Here the local caches (Hugging Face hub cache, torch hub checkpoints) are
looked up first; when the weights are not there and the hub is offline or unreachable,
:class:`PretrainedWeightsUnavailable` says at once which weights, where we looked and how to get
them. A local file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, or one of our checkpoints)
can be given instead.

Loaded weights come with their input convention (:mod:`cxrstudy.models.input_adapter`): the
stem keeps its pretrained channels and the grey image is repeated and normalised with the
weights' mean and std before it. With ``input_norm="none"`` timm instead adapts ImageNet's first
convolution to one channel by summing its RGB kernels, and the [0, 1] image goes in as it is.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .input_adapter import (attach_input_adapter, building_input_norm, check_input_norm,
                            pretrained_channels)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRUE = {"1", "on", "yes", "true"}


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable right now."""


# ---- where weights live -------------------------------------------------------------------
def hub_offline() -> bool:
    """True when the Hugging Face hub is switched off (``HF_HUB_OFFLINE``, read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the hub library would resolve it from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def torch_hub_checkpoint_dir() -> Path:
    """Where ``torch.hub`` (and old timm releases) keep downloaded checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _pretrained_cfg(timm_name: str):
    import timm.models

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.has_weights:
        raise PretrainedWeightsUnavailable(
            f"timm has no pretrained weights for {timm_name!r}; use pretrained=False or give a "
            f"weight file: pretrained='path/to/weights.safetensors'")
    return cfg


def weight_locations(timm_name: str) -> list[Path]:
    """Every local path where the pretrained weights of ``timm_name`` would be found."""
    cfg = _pretrained_cfg(timm_name)
    places: list[Path] = []
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        folder = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        places += [folder / "snapshots" / "<revision>" / name for name in names]
    if cfg.url and isinstance(cfg.url, str) and cfg.url.endswith(WEIGHT_SUFFIXES):
        places.append(torch_hub_checkpoint_dir() / os.path.basename(urlparse(cfg.url).path))
    if cfg.file:
        places.append(Path(cfg.file))
    return places


def find_cached_weights(timm_name: str) -> Path | None:
    """The first locally cached weight file for ``timm_name``, or None. Touches no network."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _pretrained_cfg(timm_name)
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=hf_cache_dir(),
                                           revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    for place in weight_locations(timm_name):
        if "<revision>" not in place.parts and place.is_file():
            return place
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint: tells 'no network' apart in seconds, not minutes.

    Runs in a helper thread so a hanging name lookup (not covered by socket timeouts) cannot
    block longer than ``timeout`` either.
    """
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((endpoint.hostname, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def _unavailable_message(timm_name: str, why: str) -> str:
    cfg = _pretrained_cfg(timm_name)
    source = cfg.hf_hub_id or cfg.url or "timm"
    looked = "\n".join(f"  - {p}" for p in weight_locations(timm_name))
    return (
        f"Pretrained weights for {timm_name!r} ({source}) are not in the local cache and "
        f"{why}.\nLooked in:\n{looked}\n"
        f"To get them: run once with network access and HF_HUB_OFFLINE=0 (for example "
        f"`HF_HUB_OFFLINE=0 python -c \"import timm; timm.create_model('{timm_name}', "
        f"pretrained=True)\"`), which stores them in {hf_cache_dir()}; or copy the weight file "
        f"there; or pass pretrained='path/to/weights.safetensors'; or use pretrained=False."
    )


# ---- reading weight files -------------------------------------------------------------------
def read_state_dict(path, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: a bare state dict, a training checkpoint, or safetensors.

    Checkpoints are unwrapped (EMA weights first when ``prefer_ema`` and present, then
    ``state_dict``/``model``) and a DDP ``module.`` prefix is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        content: Any = load_file(str(path), device="cpu")
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read weight file {path}: {exc}") from exc
    if isinstance(content, dict) and not all(isinstance(v, torch.Tensor) for v in content.values()):
        ema_keys = ("ema", "model_ema", "state_dict_ema") if prefer_ema else ()
        keys = ema_keys + ("state_dict", "model")
        for key in keys:
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not content or \
            not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{path} holds no state dict of tensors (looked at the top level and "
                         f"under ema/state_dict/model)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in content.items()}


def state_dict_matches(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> bool:
    """True when ``state_dict`` has exactly the model's keys with the same shapes."""
    own = model.state_dict()
    return own.keys() == state_dict.keys() and all(
        own[k].shape == state_dict[k].shape for k in own)


def load_exact(model: nn.Module, state_dict: dict[str, torch.Tensor],
               source: str = "weights") -> None:
    """Load strictly, naming missing, unexpected and mis-shaped keys when it does not fit."""
    own = model.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    shaped = sorted(k for k in own.keys() & state_dict.keys()
                    if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shaped:
        detail = "; ".join(f"{label}: {keys[:5]}{' …' if len(keys) > 5 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape differs", shaped)) if keys)
        raise ValueError(f"{source} do not fit {type(model).__name__}: {detail}")
    model.load_state_dict(state_dict, strict=True)


# ---- timm models ----------------------------------------------------------------------------
def timm_model_kwargs(timm_name: str, num_classes: int, in_chans: int, image_size: int,
                      **kwargs) -> dict[str, Any]:
    """Constructor arguments; ``img_size`` only for architectures built for one input size
    (ViTs, EfficientViT), whose position embeddings / attention biases depend on it."""
    import timm.models

    out = dict(num_classes=int(num_classes), in_chans=int(in_chans), **kwargs)
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is not None and cfg.fixed_input_size:
        out.setdefault("img_size", int(image_size))
    return out


def _forget_in_memory_weights(model: nn.Module, source: str) -> None:
    """timm keeps the overlay (our state dict) in ``model.pretrained_cfg``: drop it, keep the
    file name."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.pop("state_dict", None)
    cfg["file"] = source
    model.pretrained_cfg = model.default_cfg = cfg


def _create_from_file(timm_name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """Build with weights from a local file, letting timm adapt them (first conv, classifier,
    position embeddings, attention-bias tables) to this model.

    timm decides what to adapt from the pretrained config; the config is overlaid with what
    the file really holds (its class count and input channels), so a file of our own with
    the same head keeps its head.
    """
    import timm
    import timm.models

    state_dict = read_state_dict(path)
    cfg = timm.models.get_pretrained_cfg(timm_name)
    overlay: dict[str, Any] = {"state_dict": state_dict}
    classifier = cfg.classifier if cfg is not None else None
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    if classifier and f"{classifier}.weight" in state_dict:
        overlay["num_classes"] = int(state_dict[f"{classifier}.weight"].shape[0])
    first_conv = cfg.first_conv if cfg is not None else None
    first_conv = first_conv[0] if isinstance(first_conv, (tuple, list)) else first_conv
    weight = state_dict.get(f"{first_conv}.weight") if first_conv else None
    if weight is not None and weight.ndim == 4 and cfg.input_size:
        overlay["input_size"] = (int(weight.shape[1]),) + tuple(cfg.input_size[1:])
    model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    _forget_in_memory_weights(model, str(path))
    return model


def create_timm_model(timm_name: str, num_classes: int, in_chans: int = 1, image_size: int = 224,
                      pretrained: bool | str | os.PathLike = False, input_norm: str | None = None,
                      **kwargs) -> nn.Module:
    """A timm model with logits ``[B, num_classes]`` for ``in_chans × image_size²`` inputs.

    ``pretrained``: False (random init), True (timm's default weights: from the local cache,
    else downloaded when the hub is online and reachable, else an immediate
    :class:`PretrainedWeightsUnavailable`), or a path to a weight file.
    ``input_norm`` (see :mod:`cxrstudy.models.input_adapter`): ``"pretrained"`` keeps the
    pretrained stem's channels and puts an adapter before it (grey repeated, normalised with the
    weights' mean and std); ``"none"`` takes ``in_chans`` channels as they are. None: the
    enclosing ``create_model`` call's choice, else ``"pretrained"`` exactly when weights are
    loaded (from a file: when its first convolution has the pretrained channel count; a
    one-channel file was trained on our [0, 1] input).
    """
    norm = check_input_norm(input_norm) or building_input_norm()
    if norm is None:
        if pretrained is False or pretrained is None:
            norm = "none"
        elif pretrained is True:
            norm = "pretrained"
        else:
            norm = _file_input_norm(timm_name, Path(pretrained))
    if norm == "pretrained":
        in_chans = pretrained_channels(timm_name)
    model = _timm_model_with_weights(timm_name, num_classes, in_chans, image_size, pretrained,
                                     **kwargs)
    if norm == "pretrained":
        attach_input_adapter(model)
    return model


def _file_input_norm(timm_name: str, path: Path) -> str:
    """"pretrained" when the file's first convolution takes the pretrained channel count."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(timm_name)
    first = getattr(cfg, "first_conv", None) if cfg is not None else None
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    weight = read_state_dict(path).get(f"{first}.weight") if first else None
    if weight is None or weight.ndim != 4 or not getattr(cfg, "mean", None):
        return "none"
    return "pretrained" if int(weight.shape[1]) == len(cfg.mean) else "none"


def _timm_model_with_weights(timm_name: str, num_classes: int, in_chans: int, image_size: int,
                             pretrained: bool | str | os.PathLike, **kwargs) -> nn.Module:
    import timm

    kwargs = timm_model_kwargs(timm_name, num_classes, in_chans, image_size, **kwargs)
    if pretrained is False or pretrained is None:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    if pretrained is not True:
        return _create_from_file(timm_name, Path(pretrained), kwargs)

    cached = find_cached_weights(timm_name)
    if cached is not None:
        return _create_from_file(timm_name, cached, kwargs)
    if hub_offline():
        raise PretrainedWeightsUnavailable(
            _unavailable_message(timm_name, "the hub is switched off (HF_HUB_OFFLINE=1)"))
    if not hub_reachable():
        raise PretrainedWeightsUnavailable(
            _unavailable_message(timm_name, "the Hugging Face hub cannot be reached (no network)"))
    try:
        return timm.create_model(timm_name, pretrained=True, cache_dir=hf_cache_dir(), **kwargs)
    except Exception as exc:
        raise PretrainedWeightsUnavailable(
            _unavailable_message(timm_name, f"downloading them failed ({exc})")) from exc


__all__ = ["PretrainedWeightsUnavailable", "hub_offline", "hf_cache_dir",
           "torch_hub_checkpoint_dir", "weight_locations", "find_cached_weights", "hub_reachable",
           "read_state_dict", "state_dict_matches", "load_exact", "timm_model_kwargs",
           "create_timm_model"]
