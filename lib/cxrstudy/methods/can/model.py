"""CAN: two networks that attend through each other (Ma, Wang & Hoi, MICCAI 2019, "Multi-label
Thoracic Disease Image Classification with Cross-Attention Networks").

The paper's exact formulas are not public; this is the clearest reading, every choice a
parameter. Two timm backbones (same or different architectures) see the same image and give
feature maps f₁ [B, D₁, h₁, w₁] and f₂ [B, D₂, h₂, w₂] (``forward_features``). Then

    p_i = P_i(f_i)                   1×1 conv to K channels (``channels``; None: identity when
                                     D₁ = D₂, else both to min(D₁, D₂)); p₂ is resized
                                     (bilinear) to p₁'s h₁×w₁ when the grids differ
    a_i = σ(W_i * (p₁ ⊙ p₂) + b_i)   W_i a 1×1 conv: K→1 (``attention="spatial"``, a [B,1,h,w]
                                     map) or K→K (``"channel"``, one weight per channel and
                                     position); one conv per branch, or one for both
                                     (``shared_attention=True``, then a₁ = a₂)
    g_i = p_i ⊙ a_i  (+ p_i when ``residual=True``: p_i ⊙ (1 + a_i), residual attention, so a
                     weak map cannot switch a branch's features off)
    z_i = head_i(Drop(AvgPool(g_i)))  a Linear per branch
    z   = (z₁ + z₂) / 2              the prediction; ``forward`` returns it in both modes

The Hadamard product is where the networks meet: a position lights up in a branch's attention
only where both networks respond, which is what each learns from the other.

``model.last_attention`` holds (a₁, a₂) of the last forward (detached) and
``model.attention_maps()`` [B, 2, h, w] (channel mode: the channel mean) for drawing (with the
attention off: the held, flat maps).

``cross_attention=False`` switches the attention off and keeps everything else: the gate becomes
the identity, g_i = p_i (the map held at the value that passes p through: a = 0 in the residual
form p (1 + a), a = 1 in the plain form p a), so the networks no longer see each other. The
projections, the resizing, the heads and z are unchanged, and the attention convs are still
built (same parameter count and state-dict keys, so the model starts from the very weights a
CAN with attention draws under the same seed) but frozen: nothing reads them, so they get no
gradient (and data-parallel training, which refuses parameters without one, still runs). This
is the control that isolates the attention (notebook 06's ``can_no_attention``): against CAN
only the gate and the attention loss differ, where :class:`LogitEnsemble` also differs in the
projections and heads.

Training is :class:`cxrstudy.methods.can.training.CANTrainer` (a plain :class:`~cxrstudy.train.Trainer`
also works on z alone); its loss, with the attention term, is written out there.

Two controls take CAN apart. :class:`LogitEnsemble` (``"logit_ensemble"``): the same two
networks, each with its own classifier (no projections, no CAN heads), no attention between
them, z = (z₁ + z₂)/2, trained by the same CANTrainer loss (no attention term: there are no
maps); and CAN with ``cross_attention=False`` (above), which differs from CAN in the attention
alone.

>>> create_model("can", 14, image_size=224, backbones=("resnet18", "densenet121"))
>>> create_model("can", 14, image_size=224, backbones=("resnet18", "densenet121"),
...              cross_attention=False)
>>> create_model("logit_ensemble", 14, image_size=224, backbones=("resnet18", "densenet121"))
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...models.factory import headless_backbone
from ...models.registry import register_model

ATTENTION_MODES = ("spatial", "channel")


class CANOutput(NamedTuple):
    """Mean logits [B, C], the two branches' logits and attention maps [B, 1 or K, h, w]
    (None where no attention acts: :class:`LogitEnsemble`, or CAN with ``cross_attention=False``;
    the trainer then has no attention term)."""

    logits: torch.Tensor
    branch_logits: tuple[torch.Tensor, torch.Tensor]
    attention: tuple[torch.Tensor, torch.Tensor] | None


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


class CrossAttentionNetwork(nn.Module):
    """Two backbones with cross attention from their feature maps' product (module docstring).

    State-dict keys: ``backbones.{0,1}.*``, ``projections.{0,1}.*`` (when projecting),
    ``attention_convs.{0[,1]}.*``, ``heads.{0,1}.*``.
    """

    def __init__(self, backbone_1: nn.Module, backbone_2: nn.Module, num_classes: int,
                 channels: int | None = None, attention: str = "spatial",
                 shared_attention: bool = False, residual: bool = True, dropout: float = 0.0,
                 cross_attention: bool = True):
        super().__init__()
        self.attention_mode = _choice("attention", attention, ATTENTION_MODES)
        if not isinstance(cross_attention, bool):
            raise TypeError(f"cross_attention must be True or False, got {cross_attention!r}")
        self.cross_attention = cross_attention
        self.shared_attention, self.residual = bool(shared_attention), bool(residual)
        self.num_classes = int(num_classes)
        self.backbones = nn.ModuleList([backbone_1, backbone_2])
        widths = [int(b.num_features) for b in self.backbones]
        if channels is None:
            width = widths[0] if widths[0] == widths[1] else min(widths)
            project = widths[0] != widths[1]
        else:
            width, project = int(channels), True
        self.num_features = width
        self.projections = nn.ModuleList(
            [nn.Conv2d(w, width, 1) if project else nn.Identity() for w in widths])
        out = 1 if self.attention_mode == "spatial" else width
        self.attention_convs = nn.ModuleList(
            [nn.Conv2d(width, out, 1) for _ in range(1 if self.shared_attention else 2)])
        if not self.cross_attention:  # built for the same parameters and draws, never read
            self.attention_convs.requires_grad_(False)
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleList([nn.Linear(width, self.num_classes) for _ in range(2)])
        self.last_attention: tuple[torch.Tensor, torch.Tensor] | None = None
        self.output_branches = False

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p₁, p₂ on one K-channel grid (the first backbone's)."""
        maps = []
        for backbone, projection in zip(self.backbones, self.projections):
            features = backbone.forward_features(x)
            if features.ndim != 4:
                raise TypeError(f"{type(backbone).__name__}.forward_features gave "
                                f"{tuple(features.shape)}; CAN needs [B, D, h, w] feature maps")
            maps.append(projection(features))
        if maps[1].shape[-2:] != maps[0].shape[-2:]:
            maps[1] = F.interpolate(maps[1], size=maps[0].shape[-2:], mode="bilinear",
                                    align_corners=False)
        return maps[0], maps[1]

    def forward_branches(self, x: torch.Tensor) -> CANOutput:
        maps = self.feature_maps(x)
        if not self.cross_attention:
            return self._forward_without_attention(maps)
        product = maps[0] * maps[1]
        attention = tuple(torch.sigmoid(self.attention_convs[0 if self.shared_attention else i](
            product)) for i in range(2))
        logits = []
        for head, features, weight in zip(self.heads, maps, attention):
            attended = features * (1 + weight) if self.residual else features * weight
            logits.append(head(self.drop(attended.mean(dim=(2, 3)))))
        self.last_attention = tuple(a.detach().float() for a in attention)
        return CANOutput((logits[0] + logits[1]) / 2, tuple(logits), attention)

    def _forward_without_attention(self, maps: tuple[torch.Tensor, torch.Tensor]) -> CANOutput:
        """The identity gate, g_i = p_i; ``last_attention`` holds the map value that gives it."""
        logits = [head(self.drop(features.mean(dim=(2, 3))))
                  for head, features in zip(self.heads, maps)]
        first = maps[0]
        held = first.new_full((first.shape[0], self.attention_convs[0].out_channels,
                               *first.shape[-2:]), 0.0 if self.residual else 1.0)
        self.last_attention = (held.detach().float(), held.detach().float())
        return CANOutput((logits[0] + logits[1]) / 2, tuple(logits), None)

    def forward(self, x: torch.Tensor):
        """Mean logits [B, C]; the whole :class:`CANOutput` while ``output_branches`` is set
        (CANTrainer sets it around its own training calls)."""
        out = self.forward_branches(x)
        return out if self.output_branches else out.logits

    def attention_maps(self) -> torch.Tensor:
        """[B, 2, h, w]: both branches' maps of the last forward (channel mode: channel mean)."""
        if self.last_attention is None:
            raise RuntimeError("no attention yet: run the model on a batch first")
        return torch.cat([a.mean(dim=1, keepdim=True) for a in self.last_attention], dim=1)

    def no_weight_decay(self) -> set[str]:
        return _no_weight_decay_of("backbones", self.backbones)


class LogitEnsemble(nn.Module):
    """Two networks, each a whole classifier, whose logits are averaged: z = (z₁ + z₂) / 2.

    Two networks without CAN's additions, so that "CAN against one network" can be split into
    what a second network adds (this model against each network alone) and what CAN adds on top
    (CAN against this model: same networks, same loss, but CAN also projects and resizes the
    maps and puts its own heads on them; the attention alone is CAN against CAN with
    ``cross_attention=False``). Each branch is the timm classifier itself (global pool and its
    own linear head), so the ensemble has exactly the parameters of the two networks trained
    alone. ``forward`` returns z; with ``output_branches`` set, a :class:`CANOutput` with
    ``attention=None`` (what CANTrainer reads for its branch term). State-dict keys:
    ``networks.{0,1}.*``.
    """

    def __init__(self, network_1: nn.Module, network_2: nn.Module):
        super().__init__()
        self.networks = nn.ModuleList([network_1, network_2])
        classes = [getattr(network, "num_classes", None) for network in self.networks]
        if None not in classes and classes[0] != classes[1]:
            raise ValueError(f"the two networks give {classes[0]} and {classes[1]} logits; an "
                             f"ensemble needs the same classes")
        self.num_classes = classes[0]
        self.output_branches = False

    def forward_branches(self, x: torch.Tensor) -> CANOutput:
        logits = tuple(network(x) for network in self.networks)
        return CANOutput((logits[0] + logits[1]) / 2, logits, None)

    def forward(self, x: torch.Tensor):
        out = self.forward_branches(x)
        return out if self.output_branches else out.logits

    def no_weight_decay(self) -> set[str]:
        return _no_weight_decay_of("networks", self.networks)


def _no_weight_decay_of(prefix: str, modules: nn.ModuleList) -> set[str]:
    """The members' own no-weight-decay parameter names (timm's hook), under ``prefix.i.``."""
    names = set()
    for i, module in enumerate(modules):
        own = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
        names |= {f"{prefix}.{i}.{name}" for name in own}
    return names


# ---- registered name --------------------------------------------------------------------------
def _pair(value: Any, name: str) -> list:
    if isinstance(value, (list, tuple)) and len(value) == 2 and not isinstance(value, str):
        return list(value)
    if isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be one value or two, got {value!r}")
    return [value, value]


@register_model("can")
def build_can(num_classes, in_chans, image_size, pretrained=False, *,
              backbones: Sequence[str] = ("resnet18", "densenet121"),
              channels: int | None = None, attention: str = "spatial",
              shared_attention: bool = False, residual: bool = True, dropout: float = 0.0,
              cross_attention: bool = True,
              backbone_kwargs: dict | Sequence[dict] | None = None) -> CrossAttentionNetwork:
    """CAN over two timm backbones. ``pretrained`` True loads both backbones' default weights;
    a weight file must be CAN weights that fit this model exactly (the factory loads those
    before calling here, so a file that reaches this builder is refused).
    ``cross_attention=False``: the same model with the attention off (module docstring).
    ``backbone_kwargs``: one dict for both backbones or a pair of dicts."""
    names = _pair(backbones, "backbones")
    extras = _pair(backbone_kwargs or {}, "backbone_kwargs")
    if pretrained is not None and not isinstance(pretrained, bool):
        raise ValueError(f"{pretrained} does not fit this CAN model exactly (other backbones, "
                         f"channels or classes?); pass pretrained=True for the backbones' own "
                         f"weights")
    built = [headless_backbone(name, num_classes, in_chans, image_size, bool(pretrained),
                               **dict(extra or {})) for name, extra in zip(names, extras)]
    return CrossAttentionNetwork(built[0], built[1], num_classes, channels=channels,
                                 attention=attention, shared_attention=shared_attention,
                                 residual=residual, dropout=dropout,
                                 cross_attention=cross_attention)


@register_model("logit_ensemble")
def build_logit_ensemble(num_classes, in_chans, image_size, pretrained=False, *,
                         backbones: Sequence[str] = ("resnet18", "densenet121"),
                         backbone_kwargs: dict | Sequence[dict] | None = None) -> LogitEnsemble:
    """:class:`LogitEnsemble` of two networks, each ``create_model(name, ...)`` with its own
    classifier. ``pretrained`` as for :func:`build_can`: True loads both networks' default
    weights; a weight file must be ensemble weights (loaded by the factory), others are refused.
    ``backbone_kwargs``: one dict for both networks or a pair of dicts."""
    from ...models.factory import create_model

    names = _pair(backbones, "backbones")
    extras = _pair(backbone_kwargs or {}, "backbone_kwargs")
    if pretrained is not None and not isinstance(pretrained, bool):
        raise ValueError(f"{pretrained} does not fit this ensemble exactly (other networks or "
                         f"classes?); pass pretrained=True for the networks' own weights")
    built = []
    for name, extra in zip(names, extras):
        network = create_model(name, num_classes, in_chans=in_chans, image_size=image_size,
                               pretrained=bool(pretrained), **dict(extra or {}))
        network.__dict__.pop("cxr_config", None)  # the ensemble's own config rebuilds it
        built.append(network)
    return LogitEnsemble(built[0], built[1])


__all__ = ["ATTENTION_MODES", "CANOutput", "CrossAttentionNetwork", "LogitEnsemble", "build_can",
           "build_logit_ensemble"]
