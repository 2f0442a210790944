"""GLoRI (CheXFound, arXiv 2502.05142): one frozen class query per disease reads the image's
patch tokens through cross-attention; its attention is that disease's map.

Tokens. For a timm ViT, the patch tokens of the last ``n_blocks`` (4) blocks, each passed through
the backbone's final norm (``norm_blocks=True``, as DINOv2's intermediate layers are read), are
concatenated on the channel axis: M₀ ∈ R^{B×T×(n·D)}. For any other timm model (a CNN, or
EfficientViT) there are no blocks of tokens: the last stage's feature map [B, D, h, w] is
flattened to T = h·w tokens and ``n_blocks`` plays no part. Then

    M  = ReLU(M₀ W_in + b_in)                       [B, T, d]     d = ``decoder_dim`` (768)
    Q  ∈ R^{C×d}, random N(0, 1), frozen            one query per class (a buffer: saved in
                                                    state dicts and checkpoints, never trained)

then one decoder layer, cross-attention only (8 heads, ``decoder_heads``; dropout 0.1; no
self-attention among the queries), FFN = Lin(d→2048) → ReLU → Drop → Lin(2048→d) → Drop.
``decoder_norm="post"`` (default) is the official code's layer (CheXFound's GLoRI keeps
ML-Decoder's post-norm layer, including the dropout of the queries added to themselves):

    X₀ = LN₁(Q + Drop(Q))
    X₁ = LN₂(X₀ + Drop(CrossAttn(X₀, M)))
    O  = LN₃(X₁ + FFN(X₁))                          [B, C, d]

``decoder_norm="pre"`` is a pre-norm reading of the paper's list (LayerNorm → cross-attention
→ LayerNorm → FFN → LayerNorm) that the study used before it followed the code: the queries are
the residual stream, each sub-layer sees a normalised input, a final LayerNorm closes it:

    H₁ = Q + Drop(CrossAttn(LN₁(Q), M));  H₂ = H₁ + FFN(LN₂(H₁));  O = LN₃(H₂)

Both share one set of parameters (same state-dict keys). Keys and values are M as projected.

Global features (``use_cls=True``): g = the CLS token of each of the same blocks, concatenated
(n·D; mean of the patch tokens for a ViT without CLS token; the map's spatial mean for a CNN),
is appended to every class output: O'_c = [O_c ; g]. Logits come from a group linear layer,
a weight vector and bias of its own per class:

    z_c = w_cᵀ O'_c + b_c          w_c ~ N(0, 2/(C + F)) (the code's Xavier normal), b_c = 0

Attention maps. A_c = (1/heads) Σ_h softmax(q_{h,c} K_hᵀ / √d_h) ∈ R^T (before attention dropout,
so each sums to 1 over the tokens). After every forward ``model.last_attention`` [B, C, T]
(detached) and ``model.last_grid`` (h, w) hold them; ``model.attention_maps()`` gives
[B, C, h, w] to draw on the images. :meth:`GLoRI.forward_with_attention` returns them with a
gradient.

Backbone. ``freeze_backbone=True`` (the paper's setting: GLoRI on a frozen foundation model)
turns off its gradients, keeps it in eval mode whatever ``model.train()`` says (BatchNorm
statistics and dropout stay as pretrained) and runs it under ``no_grad``; False fine-tunes it.
The official GLoRI command trains with masked BCE; its ``--focal-loss`` flag adds the
asymmetric loss (:mod:`cxrstudy.methods.glori.study` chooses among them, ``glori_loss``).

Also here: :class:`LinearProbe`, the frozen-backbone + linear-head arm to compare against. As in
the official probe it reads the CLS tokens of the last ``n_blocks`` (4) blocks, the very global
features GLoRI appends; ``n_blocks=None`` reads timm's pooled features (the last block's CLS).

>>> create_model("glori", 14, image_size=224, backbone="deit_small", pretrained=True)
>>> create_model("glori", 3, image_size=32, backbone="deit_tiny", patch_size=4, decoder_dim=64)
>>> create_model("linear_probe", 14, image_size=224, backbone="deit_small", pretrained=True)
>>> create_model("linear_probe", 14, image_size=224, backbone="deit_small", n_blocks=None)
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import nn

from ...models.factory import headless_backbone
from ...models.registry import register_model


# ---- tokens out of a timm backbone ------------------------------------------------------------
class BackboneTokens(NamedTuple):
    """Tokens [B, T, D], global features [B, G] and the (h, w) grid the T tokens lie on."""

    tokens: torch.Tensor
    global_: torch.Tensor
    grid: tuple[int, int]


def is_token_vit(model: nn.Module) -> bool:
    """A timm VisionTransformer-like model: blocks of tokens behind a patch embedding."""
    return all(hasattr(model, name) for name in
               ("forward_intermediates", "blocks", "patch_embed", "num_prefix_tokens"))


def token_width(model: nn.Module, n_blocks: int = 4) -> int:
    """Channels of the concatenated tokens (and of the global features) :func:`read_tokens`
    gives for ``model``."""
    if is_token_vit(model):
        return int(model.embed_dim) * int(n_blocks)
    return int(model.num_features)


def read_tokens(model: nn.Module, x: torch.Tensor, n_blocks: int = 4,
                norm_blocks: bool = True) -> BackboneTokens:
    """Patch tokens of the last ``n_blocks`` blocks (ViT) or the last map (others); see the
    module docstring."""
    if is_token_vit(model):
        depth = len(model.blocks)
        if not 1 <= n_blocks <= depth:
            raise ValueError(f"n_blocks must lie in [1, {depth}] for this ViT, got {n_blocks}")
        outputs = model.forward_intermediates(x, indices=int(n_blocks), norm=norm_blocks,
                                              return_prefix_tokens=True, output_fmt="NLC",
                                              intermediates_only=True)
        tokens = torch.cat([patches for patches, _ in outputs], dim=-1)
        if getattr(model, "has_class_token", model.num_prefix_tokens > 0):
            global_ = torch.cat([prefix[:, 0] for _, prefix in outputs], dim=-1)
        else:
            global_ = torch.cat([patches.mean(dim=1) for patches, _ in outputs], dim=-1)
        grid = tuple(int(g) for g in model.patch_embed.dynamic_feat_size(x.shape[-2:]))
        return BackboneTokens(tokens, global_, grid)
    features = model.forward_features(x)
    if features.ndim != 4:
        raise TypeError(f"{type(model).__name__}.forward_features gave {tuple(features.shape)}; "
                        f"GLoRI needs a timm ViT (blocks of tokens) or a [B, D, h, w] feature map")
    return BackboneTokens(features.flatten(2).transpose(1, 2), features.mean(dim=(2, 3)),
                          (int(features.shape[2]), int(features.shape[3])))


class _FrozenBackboneMixin:
    """Keeps a frozen ``self.backbone`` in eval mode and out of autograd."""

    backbone: nn.Module
    freeze_backbone: bool

    def _set_backbone_frozen(self, frozen: bool) -> None:
        self.freeze_backbone = bool(frozen)
        self.backbone.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def _backbone_context(self):
        return torch.no_grad() if self.freeze_backbone else contextlib.nullcontext()


# ---- the head ---------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, C, d] over tokens [B, T, d].

    Returns the attended values [B, C, d] and the head-averaged probabilities [B, C, T] taken
    before attention dropout (each row sums to 1).
    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [B, h, L, dh]

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._heads(self.q(queries)), self._heads(self.k(tokens)), self._heads(
            self.v(tokens))
        probs = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)
        attended = (self.attn_drop(probs) @ v).transpose(1, 2).flatten(2)
        return self.proj(attended), probs.mean(dim=1)


DECODER_NORMS = ("post", "pre")


class ClassQueryDecoderLayer(nn.Module):
    """Class queries read the tokens: cross-attention, then an FFN (module docstring).

    ``norm="post"`` (the official layer): X₀ = LN₁(Q + Drop(Q)); X₁ = LN₂(X₀ + Drop(A(X₀, M)));
    O = LN₃(X₁ + FFN(X₁)). ``norm="pre"``: H₁ = Q + Drop(A(LN₁(Q), M)); H₂ = H₁ + FFN(LN₂(H₁));
    O = LN₃(H₂). Returns O [B, C, d] and the head-averaged attention [B, C, T].
    """

    def __init__(self, dim: int, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
                 norm: str = "post"):
        super().__init__()
        if norm not in DECODER_NORMS:
            raise ValueError(f"norm must be one of {DECODER_NORMS}, got {norm!r}")
        self.norm = norm
        self.norm_query = nn.LayerNorm(dim)
        self.drop_query = nn.Dropout(dropout)  # post only: Q + Drop(Q)
        self.cross_attention = CrossAttention(dim, num_heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim), nn.Dropout(dropout))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm == "post":
            hidden = self.norm_query(queries + self.drop_query(queries))
            attended, attention = self.cross_attention(hidden, tokens)
            hidden = self.norm_ffn(hidden + self.drop(attended))
            return self.norm_out(hidden + self.ffn(hidden)), attention
        attended, attention = self.cross_attention(self.norm_query(queries), tokens)
        hidden = queries + self.drop(attended)
        hidden = hidden + self.ffn(self.norm_ffn(hidden))
        return self.norm_out(hidden), attention

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}"


class GroupLinear(nn.Module):
    """z_c = w_cᵀ h_c + b_c: one linear classifier per class, on that class's own feature."""

    def __init__(self, num_groups: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_groups, in_features))
        self.bias = nn.Parameter(torch.zeros(num_groups))
        # the official code's Xavier normal on its [C, F, 1] weight: std √(2 / (F + C))
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (num_groups + in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, F] → [B, C]
        return torch.einsum("bcf,cf->bc", x, self.weight) + self.bias

    def extra_repr(self) -> str:
        return f"num_groups={self.weight.shape[0]}, in_features={self.weight.shape[1]}"


class GLoRI(_FrozenBackboneMixin, nn.Module):
    """``backbone`` (timm, no classifier) + the GLoRI head (module docstring).

    State-dict keys: ``backbone.*``, ``input_proj.*``, ``class_queries`` (frozen buffer),
    ``decoder.*``, ``classifier.*``. ``forward`` returns logits [B, C] in both modes.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dim: int = 768, num_heads: int = 8,
                 ffn_dim: int = 2048, dropout: float = 0.1, use_cls: bool = True,
                 n_blocks: int = 4, norm_blocks: bool = True, freeze_backbone: bool = True,
                 decoder_norm: str = "post"):
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.n_blocks, self.norm_blocks, self.use_cls = int(n_blocks), bool(norm_blocks), bool(
            use_cls)
        width = token_width(backbone, self.n_blocks)
        self.input_proj = nn.Sequential(nn.Linear(width, dim), nn.ReLU())
        self.register_buffer("class_queries", torch.randn(self.num_classes, dim))
        self.decoder = ClassQueryDecoderLayer(dim, num_heads, ffn_dim, dropout, decoder_norm)
        self.classifier = GroupLinear(self.num_classes, dim + (width if self.use_cls else 0))
        self.num_features = dim
        self.last_attention: torch.Tensor | None = None
        self.last_grid: tuple[int, int] | None = None
        self._set_backbone_frozen(freeze_backbone)

    def tokens(self, x: torch.Tensor) -> BackboneTokens:
        with self._backbone_context():
            return read_tokens(self.backbone, x, self.n_blocks, self.norm_blocks)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and per-class attention [B, C, T] (with gradient)."""
        found = self.tokens(x)
        memory = self.input_proj(found.tokens)
        queries = self.class_queries.to(memory.dtype).expand(x.shape[0], -1, -1)
        outputs, attention = self.decoder(queries, memory)
        if self.use_cls:
            glob = found.global_.to(outputs.dtype)[:, None].expand(-1, outputs.shape[1], -1)
            outputs = torch.cat([outputs, glob], dim=-1)
        self.last_attention, self.last_grid = attention.detach().float(), found.grid
        return self.classifier(outputs), attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]

    def attention_maps(self, attention: torch.Tensor | None = None) -> torch.Tensor:
        """Per-class attention [B, C, h, w] on the token grid (default: the last forward's)."""
        attention = self.last_attention if attention is None else attention
        if attention is None or self.last_grid is None:
            raise RuntimeError("no attention yet: run the model on a batch first")
        return attention.unflatten(-1, self.last_grid)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def no_weight_decay(self) -> set[str]:
        own = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
        return {f"backbone.{name}" for name in own}


class LinearProbe(_FrozenBackboneMixin, nn.Module):
    """Frozen backbone, global features and one trainable Linear, initialised N(0, 0.01²), bias 0.

    ``n_blocks`` (4, the official probe): the CLS tokens of the last ``n_blocks`` blocks, each
    after the final norm, concatenated (n·D), the same global features GLoRI appends
    (:func:`read_tokens`; a CNN's spatial mean, whatever ``n_blocks``). ``n_blocks=None``: timm's
    own pooled features (a ViT's last-block CLS after the final norm, a CNN's global average).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, n_blocks: int | None = 4,
                 norm_blocks: bool = True):
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.n_blocks = None if n_blocks is None else int(n_blocks)
        self.norm_blocks = bool(norm_blocks)
        self.num_features = (int(backbone.num_features) if self.n_blocks is None
                             else token_width(backbone, self.n_blocks))
        self.head = nn.Linear(self.num_features, self.num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self._set_backbone_frozen(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with self._backbone_context():
            if self.n_blocks is None:
                return self.backbone(x)
            return read_tokens(self.backbone, x, self.n_blocks, self.norm_blocks).global_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.head


# ---- registered names -------------------------------------------------------------------------
@register_model("glori")
def build_glori(num_classes, in_chans, image_size, pretrained=False, *,
                backbone: str = "deit_small", decoder_dim: int = 768, decoder_heads: int = 8,
                decoder_ffn_dim: int = 2048, decoder_dropout: float = 0.1, use_cls: bool = True,
                n_blocks: int = 4, norm_blocks: bool = True, freeze_backbone: bool = True,
                decoder_norm: str = "post", **backbone_kwargs) -> GLoRI:
    """GLoRI on ``backbone`` (any timm ViT or CNN name). The head's settings carry a
    ``decoder_`` prefix (``decoder_norm``: "post", the official layer, or "pre");
    ``pretrained`` and the remaining keyword arguments (e.g. ``patch_size``, ``num_heads``,
    ``drop_path_rate``) go to the backbone."""
    inner = headless_backbone(backbone, num_classes, in_chans, image_size, pretrained,
                              **backbone_kwargs)
    return GLoRI(inner, num_classes, dim=decoder_dim, num_heads=decoder_heads,
                 ffn_dim=decoder_ffn_dim, dropout=decoder_dropout, use_cls=use_cls,
                 n_blocks=n_blocks, norm_blocks=norm_blocks, freeze_backbone=freeze_backbone,
                 decoder_norm=decoder_norm)


@register_model("linear_probe")
def build_linear_probe(num_classes, in_chans, image_size, pretrained=False, *,
                       backbone: str = "deit_small", n_blocks: int | None = 4,
                       norm_blocks: bool = True, **backbone_kwargs) -> LinearProbe:
    """A linear probe on the frozen ``backbone`` (the baseline arm for GLoRI): the CLS tokens of
    the last ``n_blocks`` blocks, or timm's pooled features with ``n_blocks=None``."""
    inner = headless_backbone(backbone, num_classes, in_chans, image_size, pretrained,
                              **backbone_kwargs)
    return LinearProbe(inner, num_classes, n_blocks=n_blocks, norm_blocks=norm_blocks)


__all__ = ["BackboneTokens", "is_token_vit", "token_width", "read_tokens",
           "CrossAttention", "DECODER_NORMS", "ClassQueryDecoderLayer", "GroupLinear", "GLoRI",
           "LinearProbe", "build_glori", "build_linear_probe"]
