"""Models: :func:`create_model` over the study's registry and timm.

>>> model = create_model("efficientvit_m5", num_classes=14, in_chans=1, image_size=224)
>>> model.cxr_config   # what a checkpoint needs to rebuild it
>>> student = create_model("efficientvit_m5_mxa", num_classes=14, image_size=224, distilled=True)

This package holds the shared building blocks (registry, factory, heads, pretrained weights,
input adapter, attention maps). Each paper's own model lives with the rest of that paper in
:mod:`cxrstudy.methods`; like timm's ``models/__init__``, this file imports those modules so
that every registered name is known to :func:`create_model` as soon as ``cxrstudy.models`` is
imported. It imports them for their registration only: read a paper's classes from its home
(e.g. ``cxrstudy.methods.glori.model.GLoRI``).
"""
from .attention_maps import AttentionRecorder, TokenLayout, patch_size_for, token_layout
from .distill import DistilledClassifier, DistilledOutput, add_distillation_head, is_distilled
from .factory import count_parameters, create_model
from .pretrained import PretrainedWeightsUnavailable, find_cached_weights, read_state_dict
from .registry import ALIASES, STUDY_TIMM_MODELS, list_models, register_model, unregister_model

# The papers' models register themselves on import (last, so that a paper module imported first
# finds this package's own names already defined).
from ..methods.can import model as _can  # noqa: E402,F401  (can, logit_ensemble)
from ..methods.glori import model as _glori  # noqa: E402,F401  (glori, linear_probe)
from ..methods.mlcak import model as _mlcak  # noqa: E402,F401  (deit_tiny_mt, deit_small_mt, vit_small_mt, multitask)
from ..methods.mxa import model as _mxa  # noqa: E402,F401  (efficientvit_m0_mxa … efficientvit_m5_mxa)
from ..methods.mxa import sigmoid_output as _sigmoid_output  # noqa: E402,F401  (sigmoid_output)

__all__ = ["create_model", "count_parameters", "register_model", "unregister_model",
           "list_models", "ALIASES", "STUDY_TIMM_MODELS", "PretrainedWeightsUnavailable",
           "find_cached_weights", "read_state_dict", "DistilledClassifier", "DistilledOutput",
           "add_distillation_head", "is_distilled", "AttentionRecorder", "TokenLayout",
           "patch_size_for", "token_layout"]
