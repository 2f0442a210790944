"""Explainability: CAM target layers for every architecture, grad-cam maps, localization against
boxes, and the models a profile trained (notebook 07)."""
from .cams import METHODS, class_maps
from .discovery import TrainedModel, find_trained_models
from .evidence import own_evidence
from .images import at_size, select_items
from .localization import box_mask, localize, summarize
from .study import Explanations, explain_models
from .target_layers import CAMTarget, LogitsModel, TokenReshape, cam_target, register_target

__all__ = ["METHODS", "class_maps", "TrainedModel", "find_trained_models", "own_evidence",
           "at_size", "select_items", "box_mask", "localize", "summarize", "Explanations",
           "explain_models", "CAMTarget", "LogitsModel", "TokenReshape", "cam_target",
           "register_target"]
