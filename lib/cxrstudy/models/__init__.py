"""Models: :func:`create_model` over the study's registry and timm.

>>> model = create_model("efficientvit_m5", num_classes=14, in_chans=1, image_size=224)
>>> model.cxr_config   # what a checkpoint needs to rebuild it
>>> student = create_model("efficientvit_m5_mxa", num_classes=14, image_size=224, distilled=True)
"""
from .attention_maps import AttentionRecorder, TokenLayout, patch_size_for, token_layout
from .distill import DistilledClassifier, DistilledOutput, add_distillation_head, is_distilled
from .can import CrossAttentionNetwork
from .factory import count_parameters, create_model
from .glori import GLoRI, LinearProbe
from .multitask import MultiTaskClassifier, MultiTaskOutput, add_global_head, is_multitask
from .pretrained import PretrainedWeightsUnavailable, find_cached_weights, read_state_dict
from .registry import ALIASES, STUDY_TIMM_MODELS, list_models, register_model, unregister_model

from . import can, glori  # noqa: E402,F401  (registers can, glori, linear_probe)
from . import multitask  # noqa: E402,F401  (registers deit_tiny_mt, deit_small_mt, vit_small_mt, multitask)
from . import mxa  # noqa: E402,F401  (registers efficientvit_m0_mxa … efficientvit_m5_mxa)
from .sigmoid_output import SigmoidOutput  # noqa: E402  (registers sigmoid_output)

__all__ = ["create_model", "count_parameters", "register_model", "unregister_model",
           "list_models", "ALIASES", "STUDY_TIMM_MODELS", "PretrainedWeightsUnavailable",
           "find_cached_weights", "read_state_dict", "DistilledClassifier", "DistilledOutput",
           "add_distillation_head", "is_distilled", "mxa", "AttentionRecorder", "TokenLayout",
           "patch_size_for", "token_layout", "MultiTaskClassifier", "MultiTaskOutput",
           "add_global_head", "is_multitask", "multitask", "glori", "can", "GLoRI", "LinearProbe",
           "CrossAttentionNetwork", "SigmoidOutput"]
