"""Knowledge distillation for multi-label classifiers, DeiT style: the KD loss and its trainer.

The student (usually wrapped by :func:`cxrstudy.models.distill.add_distillation_head`) gives
class-head logits z_cls and distillation-head logits z_dist; a frozen teacher gives logits t
for the same (augmented) images. With labels y, label mask m and teacher mask w (1 for the
classes the teacher predicts):

    L      = (1 − α) · L_cls + α · L_dist
    L_cls  = Σ_{n,c} m_nc · BCE(z_cls_nc, y_nc) / Σ_{n,c} m_nc            (masked BCE)
    L_dist = Σ_{n,c} w_c · BCE(z_dist_nc, q_nc) / (N · Σ_c w_c)
    q_nc   = σ(t_nc / τ)          soft mode (τ > 0 softens the teacher; τ = 1: its probabilities)
    q_nc   = 1[σ(t_nc) > 0.5]     hard mode (the teacher's decisions; τ plays no part)

Which entries the distillation term averages over: every image × every class the teacher
covers. The label mask does not apply to it — the teacher gives a target for every image, also
where the label is unknown, which is part of what the student gains from it. Classes the
teacher does not predict (``teacher_mask`` 0, e.g. CheXpert "Support Devices" for the
torchxrayvision teacher) are left out, so the head is not pulled towards a made-up 0.5.
Only the teacher's logits are divided by τ (the authors' code ignores τ; here it is a real
parameter, default 1) and there is no τ² factor: each term is a per-entry BCE mean.

A student without a distillation head (plain logits) gets classic KD on its only head: both
terms then act on the same logits.

``kd`` is not put in the loss registry: registered losses are ``loss(logits, target, mask)``
and cannot see the teacher; :class:`DistillationTrainer` owns the teacher and calls
:func:`kd_loss`. The class term is the trainer's ``loss_fn`` (masked BCE by default, so a
``pos_weight`` BCE from ``make_loss`` carries over).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...models.distill import DistilledOutput
from ...train.losses import masked_bce
from ...train.trainer import TrainConfig, Trainer, freeze

KD_MODES = ("soft", "hard")


def check_kd_settings(alpha: float, tau: float, mode: str) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not float(tau) > 0.0:
        raise ValueError(f"tau must be positive, got {tau}")
    if mode not in KD_MODES:
        raise ValueError(f"mode must be one of {KD_MODES}, got {mode!r}")


def teacher_targets(teacher_logits: torch.Tensor, tau: float = 1.0,
                    mode: str = "soft") -> torch.Tensor:
    """q = σ(t / τ) (soft) or 1[σ(t) > 0.5] as float (hard), without gradient."""
    check_kd_settings(0.0, tau, mode)
    t = teacher_logits.detach().float()
    if mode == "hard":
        return (torch.sigmoid(t) > 0.5).float()
    return torch.sigmoid(t / float(tau))


def distillation_bce(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
                     mode: str = "soft", teacher_mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """L_dist: BCE of the distillation head against the teacher, averaged over all images and
    the classes with ``teacher_mask`` 1 (0 when the teacher covers no class)."""
    if dist_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(dist_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the teacher must predict the "
                         f"student's classes in the student's order")
    target = teacher_targets(teacher_logits, tau, mode)
    per_entry = F.binary_cross_entropy_with_logits(dist_logits.float(), target, reduction="none")
    if teacher_mask is None:
        return per_entry.mean()
    weights = torch.as_tensor(teacher_mask, dtype=per_entry.dtype, device=per_entry.device)
    if weights.shape != per_entry.shape[-1:]:
        raise ValueError(f"teacher_mask has shape {tuple(weights.shape)}, expected "
                         f"({per_entry.shape[-1]},): one entry per class")
    weights = weights.expand_as(per_entry)
    return (per_entry * weights).sum() / weights.sum().clamp_min(1.0)


def kd_loss(out: DistilledOutput | torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
            teacher_logits: torch.Tensor, alpha: float = 0.5, tau: float = 1.0,
            mode: str = "soft", teacher_mask: torch.Tensor | None = None,
            class_loss: Callable = masked_bce) -> torch.Tensor:
    """L = (1 − α) · class_loss(z_cls, y, m) + α · L_dist (module docstring).

    ``out``: a :class:`DistilledOutput`, or plain logits (both terms then use them).
    """
    check_kd_settings(alpha, tau, mode)
    if isinstance(out, DistilledOutput):
        cls_logits, dist_logits = out.cls, out.dist
    elif isinstance(out, torch.Tensor):
        cls_logits = dist_logits = out
    else:
        raise TypeError(f"expected a DistilledOutput or a logits tensor, got {type(out).__name__}")
    label_term = class_loss(cls_logits, target, mask)
    teacher_term = distillation_bce(dist_logits, teacher_logits, tau, mode, teacher_mask)
    return (1.0 - float(alpha)) * label_term + float(alpha) * teacher_term


class DistillationTrainer(Trainer):
    """:class:`Trainer` whose step is ``kd_loss`` against a frozen ``teacher``.

    ``teacher(images) -> logits [B, C]`` in the student's class order; it is frozen (eval mode,
    ``requires_grad`` False), moved to the trainer's device, runs under ``no_grad`` on the same
    augmented images as the student (after ``teacher_input``, e.g. resizing or the
    torchxrayvision intensity range, when given) and is kept out of checkpoints: it is not part
    of the model, so the checkpoint holds the student alone. ``teacher_mask`` [C] defaults to
    the teacher's own ``teacher_mask`` attribute (see :mod:`cxrstudy.teachers`), else all
    classes. The distillation settings are saved under ``train_config["distillation"]`` and a
    resumed run must share them. Validation and :meth:`predict` use the student in evaluation
    mode, i.e. the average of its two heads.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None,
                 loss_fn: Callable | str = masked_bce, augment: Callable | None = None,
                 class_names: list[str] | None = None, *, teacher: nn.Module,
                 alpha: float = 0.5, tau: float = 1.0, mode: str = "soft",
                 teacher_mask=None, teacher_input: Callable | None = None):
        check_kd_settings(alpha, tau, mode)
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise ValueError("the teacher must be another model than the student")
        super().__init__(model, config, loss_fn=loss_fn, augment=augment, class_names=class_names)
        self.alpha, self.tau, self.mode = float(alpha), float(tau), mode
        self.teacher_input = teacher_input
        self.teacher = freeze(teacher).to(self.device)
        if teacher_mask is None:
            teacher_mask = getattr(teacher, "teacher_mask", None)
        self.teacher_mask = None
        if teacher_mask is not None:
            self.teacher_mask = torch.as_tensor(teacher_mask, dtype=torch.float32).detach().to(
                self.device).flatten()
            if self.class_names is not None and len(self.teacher_mask) != len(self.class_names):
                raise ValueError(f"teacher_mask has {len(self.teacher_mask)} entries but there "
                                 f"are {len(self.class_names)} classes")

    @property
    def teacher_name(self) -> str:
        return str(getattr(self.teacher, "teacher_name", type(self.teacher).__name__))

    def distillation_settings(self) -> dict:
        """What defines the distillation (saved with the run, compared on resume)."""
        return {"teacher": self.teacher_name, "alpha": self.alpha, "tau": self.tau,
                "mode": self.mode,
                "teacher_mask": None if self.teacher_mask is None
                else [float(v) for v in self.teacher_mask.cpu()]}

    def method_settings(self) -> dict[str, dict]:
        return {"distillation": self.distillation_settings()}

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits [B, C] (float32) for a batch of student images."""
        if self.teacher.training:  # someone switched it back; BatchNorm must not learn
            self.teacher.eval()
        inputs = self.teacher_input(images) if self.teacher_input is not None else images
        with self.accelerator.autocast():
            logits = self.teacher(inputs)
        if isinstance(logits, DistilledOutput):  # a distilled teacher left in training mode
            logits = (logits.cls + logits.dist) / 2
        return logits.float()

    def training_step(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        if self.augment is not None:
            images = self.augment(images)
        out = self.model(images)
        return kd_loss(out, batch["target"], batch["mask"], self.teacher_logits(images),
                       alpha=self.alpha, tau=self.tau, mode=self.mode,
                       teacher_mask=self.teacher_mask, class_loss=self.loss_fn)


__all__ = ["kd_loss", "distillation_bce", "teacher_targets", "check_kd_settings",
           "DistillationTrainer", "KD_MODES"]
