"""Class activation maps with the ``grad-cam`` package (``pytorch_grad_cam``), one class per image.

For a layer with activations A^k (channel k) and the logit y^c of class c:

* Grad-CAM:   L = ReLU(Σ_k α_k A^k),  α_k = mean_{i,j} ∂y^c/∂A^k_{ij};
* Grad-CAM++: α_k = Σ_{ij} w^k_{ij} ReLU(∂y^c/∂A^k_{ij}) with the second/third-order weights
  w = g² / (2g² + Σ_{ij}A^k_{ij} g³) (g the gradient);
* EigenCAM:   the projection of the (centred) activations on their first principal component —
  class-agnostic, no gradient (the same map for every class);
* ScoreCAM:   α_k = softmax_k y^c(x ⊙ norm(up(A^k))) — one forward per channel, no gradient.

grad-cam upsamples each map to the input size and min–max scales it per image to [0, 1] (a
constant map becomes all zeros). ScoreCAM's cost is channels × images forwards, in batches of
``score_cam_batch_size``.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .target_layers import CAMTarget, LogitsModel, cam_target

METHODS = ("gradcam", "gradcam++", "eigencam", "scorecam")
LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM",
          "scorecam": "ScoreCAM"}


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM,
               "scorecam": ScoreCAM}
    if method not in classes:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
    return classes[method]


@contextlib.contextmanager
def _quiet_score_cam():
    """ScoreCAM opens a tqdm bar per image; keep notebooks' output readable."""
    from functools import partial

    import tqdm
    from pytorch_grad_cam import score_cam

    original = score_cam.tqdm
    score_cam.tqdm = SimpleNamespace(tqdm=partial(tqdm.tqdm, disable=True))
    try:
        yield
    finally:
        score_cam.tqdm = original


def class_maps(model: nn.Module, images: torch.Tensor, classes: Sequence[int],
               method: str = "gradcam", target: CAMTarget | None = None,
               batch_size: int = 16, score_cam_batch_size: int = 64) -> np.ndarray:
    """Maps [N, H, W] in [0, 1] of ``images`` [N, C, H, W], image k explained for class
    ``classes[k]`` (an index into the model's logits). ``target`` defaults to the registry's."""
    if len(classes) != len(images):
        raise ValueError(f"{len(images)} images but {len(classes)} classes")
    if len(images) == 0:
        return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    target = target or cam_target(model, images.shape[-1])
    model.eval()
    wrapped = LogitsModel(model).eval()
    device = next(model.parameters()).device
    cam = _cam_class(method)(wrapped, target.layers, reshape_transform=target.reshape_transform)
    if method == "scorecam":
        cam.batch_size = int(score_cam_batch_size)
    out = []
    try:
        with _quiet_score_cam() if method == "scorecam" else contextlib.nullcontext():
            for start in range(0, len(images), int(batch_size)):
                chunk = images[start:start + int(batch_size)].to(device)
                targets = [ClassifierOutputTarget(int(c)) for c in classes[start:start + len(chunk)]]
                out.append(np.asarray(cam(input_tensor=chunk, targets=targets), dtype=np.float32))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return np.concatenate(out)


__all__ = ["METHODS", "LABELS", "class_maps"]
