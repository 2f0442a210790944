"""MLCAK: multilevel collaborative attention knowledge for low-resolution ViT students
(arXiv 2405.13370) — the global label, the loss and the trainer.

A ViT teacher at 224 px passes on its outputs and its attention to ViT students at 112/56/28 px
(patch 8/4/2, the same 14×14 token grid; :mod:`cxrstudy.models.attention_maps`). Both sides
have two tasks (:mod:`cxrstudy.methods.mlcak.model`): local findings z [B, C] and a global
abnormal logit g [B]. With labels y, label mask m (1 = known), and pairs (s_k, t_k) of student
and teacher blocks:

    L      = L_cls + α·MSE(z_s, z_t) + β·MSE(g_s, g_t) + γ·Σ_k MSE(A_s^{s_k}, A_t^{t_k})
    L_cls  = class_loss(z_s, y, m) + masked BCE(g_s, y_global, m_global)
    A      = (1/H) Σ_i softmax_i                 head-averaged post-softmax attention [B, T, T]

Every MSE is a mean over its entries (images × classes, images, images × queries × keys); the
logit and attention terms ignore the label mask — the teacher gives a target for every image.
The teacher's maps are aligned to the student's layout first (same grid: as they are; else
resized, rows kept summing to 1; ``prefix``: CLS kept or dropped).

Coefficients. The paper's values are not public; each is a parameter. α = β = 1 and
γ = 1000 (:data:`DEFAULT_GAMMA`: the default here and in notebook 04, whose
``distillation`` table gives each arm its α, β, γ). Why 1000: entries of
A are about 1/T (T = 197 at 224 px), so the attention MSE is tiny — some 1e-5 between trained
ViTs, 1e-6 measured on the tiny profile (7×7 grid, a one-epoch teacher, near-uniform maps) —
while the logit MSEs are of order 0.1..1. With γ = 1 the attention term could not move the
student and MLCAK would train like logit KD; γ = 1000 lifts it three orders of magnitude,
towards the logit terms. The trainer keeps the terms of its last step in ``last_terms`` to see
where a run stands. Arms, all with the same two-task L_cls: student alone (``teacher=None``),
logit KD (γ = 0) and MLCAK (γ > 0).

Global label (normal vs abnormal), ``global_label`` rule (:func:`dataset_global_labels`):

* ``"no_finding"`` — the release's own "No finding" label where the adapter exposes one (a
  ``no_finding`` column in ``records``: NIH and VinDr-CXR): abnormal = not "No finding". On
  VinDr it differs from any rule over the local classes: a reader may mark only a global
  impression, and under majority voting no local class may reach a majority while the readers
  agree that the image is not normal. Datasets without such a label fall back to the next rule.
* ``"any_finding"`` — from the local labels over the *finding* columns F (all classes but
  :data:`NOT_FINDINGS`):

      abnormal (1, known)  if some finding is known positive
      normal   (0, known)  if every finding is known and negative
      unknown  (mask 0)    otherwise (some finding unknown, none positive)

  This is the rule for ChestMNIST (no label of its own; its all-zero rows are NIH's "No
  Finding"), the synthetic data and CheXpert. CheXpert's "No Finding" column is not used as
  the global label on purpose: the CheXpert labeller derives it from the other observations
  (positive when no pathology is positive or uncertain), so it is a function of the local
  labels under another uncertainty policy, not an independent reading; it stays a local class.

Teacher input (``teacher_input``):

* ``"high_res"`` (default) — the paper's reading: the teacher sees the *same rows* at its own
  resolution, read from ``teacher_data`` (the training split at ``teacher_image_size``; the
  preprocessing cache holds every size), and the batch augmentation applies one random draw to
  both resolutions (:meth:`cxrstudy.data.augment.BatchAugment.paired`: the same geometry in
  normalised coordinates, the same intensity change), so the teacher's attention describes the
  image the student sees, only sharper.
* ``"upsampled_lr"`` — the student's (augmented) low-resolution batch upsampled to the
  teacher's size (bilinear, antialiased): the teacher never sees more detail than the student,
  so what it passes on is its reading of a blurred image (what a deployment that only has the
  small image could offer).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.augment import resize_square
from ...data.labels import canonical
from ...models.attention_maps import (AttentionRecorder, TokenLayout, align_attention,
                                     attention_modules, check_alignment, normalise_layers,
                                     student_view, token_layout)
from .model import MultiTaskOutput, is_multitask
from ...train.losses import masked_bce
from ...train.trainer import TrainConfig, Trainer, freeze

NOT_FINDINGS = ("No Finding", "Support Devices")
TEACHER_INPUTS = ("high_res", "upsampled_lr")
GLOBAL_LABEL_RULES = ("no_finding", "any_finding")
DEFAULT_GAMMA = 1000.0


# ---- the global task ----------------------------------------------------------------------------
def finding_columns(class_names: Sequence[str], exclude: Sequence[str] = NOT_FINDINGS
                    ) -> torch.Tensor:
    """Bool [C]: the classes that count as abnormal findings (``exclude`` matched by
    :func:`~cxrstudy.data.labels.canonical` name)."""
    excluded = {canonical(name) for name in exclude}
    columns = torch.tensor([canonical(name) not in excluded for name in class_names])
    if not columns.any():
        raise ValueError(f"no finding column left among {list(class_names)}")
    return columns


def global_labels(target: torch.Tensor, mask: torch.Tensor | None = None,
                  findings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(global target [B], global mask [B]) from local labels [B, C] (module docstring rule)."""
    if mask is None:
        mask = torch.ones_like(target)
    if mask.shape != target.shape or target.ndim != 2:
        raise ValueError(f"target {tuple(target.shape)} and mask {tuple(mask.shape)} must be "
                         f"the same [B, C]")
    known = mask > 0
    columns = (torch.ones(target.shape[-1], dtype=torch.bool, device=target.device)
               if findings is None else torch.as_tensor(findings, device=target.device).bool())
    if columns.shape != target.shape[-1:] or not columns.any():
        raise ValueError(f"findings must be a bool [C={target.shape[-1]}] with one True at least")
    abnormal = ((target > 0.5) & known & columns).any(dim=-1)
    all_known = (known | ~columns).all(dim=-1)
    return abnormal.to(target.dtype), (abnormal | all_known).to(target.dtype)


class GlobalLabels(NamedTuple):
    """The global (abnormal) label of every row of a dataset and the rule that made it."""

    target: np.ndarray   # float32 [N], 1 = abnormal
    mask: np.ndarray     # float32 [N], 1 = known
    rule: str            # "no_finding" (the release's own label) or "any_finding"


def dataset_global_labels(dataset, rule: str = "no_finding") -> GlobalLabels:
    """Global labels of ``dataset``'s rows by ``rule`` (module docstring). ``"no_finding"``
    uses the ``no_finding`` column of ``dataset.records`` (1/0, NaN = unknown) where the
    adapter has one and falls back to ``"any_finding"`` elsewhere; ``.rule`` says which ran."""
    if rule not in GLOBAL_LABEL_RULES:
        raise ValueError(f"global_label must be one of {', '.join(GLOBAL_LABEL_RULES)}, "
                         f"got {rule!r}")
    records = dataset.records
    if rule == "no_finding" and "no_finding" in records.columns:
        no_finding = records["no_finding"].to_numpy(dtype=np.float64)
        known = ~np.isnan(no_finding)
        return GlobalLabels((known & (no_finding < 0.5)).astype(np.float32),
                            known.astype(np.float32), "no_finding")
    target, mask = global_labels(torch.from_numpy(np.asarray(dataset.targets, np.float32)),
                                 torch.from_numpy(np.asarray(dataset.masks, np.float32)),
                                 finding_columns(dataset.classes))
    return GlobalLabels(target.numpy(), mask.numpy(), "any_finding")


# ---- the loss -----------------------------------------------------------------------------------
class LossTerms(NamedTuple):
    """The weighted total and its unweighted parts (scalars)."""

    total: torch.Tensor
    local: torch.Tensor
    global_: torch.Tensor
    local_kd: torch.Tensor
    global_kd: torch.Tensor
    attention: torch.Tensor


def attention_loss(student_maps: Sequence[torch.Tensor],
                   teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k MSE(A_s^k, A_t^k) over paired maps already in one layout (float32)."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"{len(student_maps)} student maps but {len(teacher_maps)} teacher maps")
    total = None
    for a_s, a_t in zip(student_maps, teacher_maps):
        if a_s.shape != a_t.shape:
            raise ValueError(f"attention maps {tuple(a_s.shape)} and {tuple(a_t.shape)} differ: "
                             f"align the teacher's maps to the student's layout first")
        term = F.mse_loss(a_s.float(), a_t.detach().float())
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def check_weights(alpha: float, beta: float, gamma: float) -> None:
    for label, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not float(value) >= 0.0:
            raise ValueError(f"{label} must be a non-negative number, got {value}")


def mlcak_loss(student: MultiTaskOutput, target: torch.Tensor, mask: torch.Tensor | None,
               teacher: MultiTaskOutput | None = None,
               student_maps: Sequence[torch.Tensor] = (), teacher_maps: Sequence[torch.Tensor] = (),
               alpha: float = 1.0, beta: float = 1.0, gamma: float = DEFAULT_GAMMA,
               findings: torch.Tensor | None = None, class_loss: Callable = masked_bce,
               global_target: torch.Tensor | None = None,
               global_mask: torch.Tensor | None = None) -> LossTerms:
    """L = L_cls + α·MSE(z_s, z_t) + β·MSE(g_s, g_t) + γ·Σ MSE(A_s, A_t) (module docstring).

    Without a teacher only L_cls is computed. A term whose weight is 0 is not computed (it is
    reported as 0), so a teacher without a global head works with β = 0. The global task's
    labels are ``global_target``/``global_mask`` [B] when given (e.g. the release's own "No
    finding"), else the any-finding rule over ``findings`` (:func:`global_labels`).
    """
    check_weights(alpha, beta, gamma)
    if not isinstance(student, MultiTaskOutput):
        raise TypeError(f"expected the student's MultiTaskOutput, got {type(student).__name__}")
    if global_target is None:
        g_target, g_mask = global_labels(target, mask, findings)
    else:
        g_target = global_target.to(student.global_.dtype)
        g_mask = (torch.ones_like(g_target) if global_mask is None
                  else global_mask.to(g_target.dtype))
        if g_target.shape != student.global_.shape or g_mask.shape != g_target.shape:
            raise ValueError(f"global_target {tuple(g_target.shape)} and global_mask "
                             f"{tuple(g_mask.shape)} must be [B] = {tuple(student.global_.shape)}")
    local = class_loss(student.local, target, mask)
    global_ = masked_bce(student.global_, g_target, g_mask)
    zero = local.new_zeros(())
    local_kd = global_kd = attention = zero
    if teacher is not None:
        if alpha > 0:
            local_kd = F.mse_loss(student.local.float(), teacher.local.detach().float())
        if beta > 0:
            if teacher.global_ is None:
                raise ValueError("beta > 0 needs a teacher with a global head "
                                 "(cxrstudy.methods.mlcak.model)")
            global_kd = F.mse_loss(student.global_.float(), teacher.global_.detach().float())
        if gamma > 0:
            attention = attention_loss(student_maps, teacher_maps).to(zero.device)
    total = (local + global_ + float(alpha) * local_kd + float(beta) * global_kd
             + float(gamma) * attention)
    return LossTerms(total, local, global_, local_kd, global_kd, attention)


def default_layer_pairs(student_depth: int, teacher_depth: int, count: int = 3
                        ) -> list[tuple[int, int]]:
    """``count`` evenly spaced levels ending at the last block of each model: block
    ⌊(j+1)·D/count⌋ − 1 for j < count (12 blocks, 3 levels: 3, 7, 11)."""
    count = max(1, min(int(count), int(student_depth), int(teacher_depth)))
    level = lambda depth, j: (j + 1) * int(depth) // count - 1  # noqa: E731
    return [(level(student_depth, j), level(teacher_depth, j)) for j in range(count)]


def _image_size(model: nn.Module) -> int | None:
    size = (getattr(model, "cxr_config", None) or {}).get("image_size")
    if size is None:
        for module in model.modules():
            img = getattr(getattr(module, "patch_embed", None), "img_size", None)
            if img is not None:
                size = img[0] if isinstance(img, (tuple, list)) else img
                break
    return None if size is None else int(size)


# ---- the trainer --------------------------------------------------------------------------------
class RowReader:
    """Images of chosen rows of ``dataset`` as float32 [B, 1, S, S] in [0, 1] (CPU): one memmap
    read per call when the preprocessing cache is attached (as the training loader reads),
    else item by item."""

    def __init__(self, dataset):
        from ...data.loader import BatchLoader

        self.dataset = dataset
        cached = getattr(dataset, "cache", None) is not None
        self._loader = BatchLoader(dataset, 1) if cached else None

    def __call__(self, rows) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if self._loader is not None:
            return self._loader.cached_batch(rows)["image"]
        return torch.stack([self.dataset[int(i)]["image"] for i in rows])


class MLCAKTrainer(Trainer):
    """:class:`Trainer` for two-task students with optional MLCAK distillation.

    ``model``: a :class:`~cxrstudy.methods.mlcak.model.MultiTaskClassifier` (e.g.
    ``create_model("deit_tiny_mt", 14, image_size=56, patch_size=4)``). ``teacher``: None
    (student alone: L_cls only; α, β, γ are recorded as 0), or a trained model — two-task for
    β > 0, a timm ViT for γ > 0 — frozen (eval, no gradients, ``no_grad``), moved to the device
    and kept out of checkpoints.

    ``teacher_input`` (module docstring): ``"high_res"`` reads each batch's rows (its
    ``index``) from ``teacher_data`` — the *training* split at the teacher's ``image_size``,
    row for row the training loader's dataset (checked in :meth:`fit`) — and augments both
    resolutions with one draw (the augmentation must offer ``paired``, as
    :class:`~cxrstudy.data.augment.BatchAugment` does); ``"upsampled_lr"`` resizes the
    augmented student batch to the teacher's ``image_size``; a callable maps the augmented
    student batch to the teacher's input.

    ``global_label``: the training split's :class:`GlobalLabels` (looked up by the batch's
    ``index``), e.g. :func:`dataset_global_labels`; None derives them from each batch's local
    labels (the any-finding rule). ``findings``: class names (or a bool [C]) counting towards
    "abnormal" in that rule; default all classes but :data:`NOT_FINDINGS`.

    ``layer_pairs``: ``[(student_block, teacher_block), …]`` (negative counts from the end),
    default :func:`default_layer_pairs` with ``attention_levels`` levels. ``align``/``prefix``:
    see :mod:`cxrstudy.models.attention_maps`. The settings are saved under
    ``train_config["mlcak"]`` and a resumed run must share them. Validation and predict use the
    local logits (the model's eval output).
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None,
                 loss_fn: Callable | str = masked_bce, augment: Callable | None = None,
                 class_names: list[str] | None = None, *, teacher: nn.Module | None = None,
                 alpha: float = 1.0, beta: float = 1.0, gamma: float = DEFAULT_GAMMA,
                 layer_pairs: Sequence[Sequence[int]] | None = None, attention_levels: int = 3,
                 align: str = "interpolate", prefix: str = "keep",
                 teacher_input: str | Callable = "high_res", teacher_data=None,
                 global_label: GlobalLabels | None = None, findings=None):
        check_weights(alpha, beta, gamma)
        if not is_multitask(model):
            raise TypeError(f"{type(model).__name__} has no global head: build the student as "
                            f"'<vit>_mt' / 'multitask' or wrap it with add_global_head")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        if teacher is model:
            raise ValueError("the teacher must be another model than the student")
        if not callable(teacher_input) and teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"teacher_input must be one of {', '.join(TEACHER_INPUTS)} or a "
                             f"callable, got {teacher_input!r}")
        if teacher is None:
            alpha = beta = gamma = 0.0
        elif beta > 0 and not is_multitask(teacher):
            raise ValueError("beta > 0 needs a teacher with a global head; wrap it with "
                             "add_global_head and train it, or set beta=0")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.align, self.prefix = align, prefix
        self.layer_pairs: list[tuple[int, int]] = []
        if teacher is not None and self.gamma > 0:
            s_depth, t_depth = len(attention_modules(model)), len(attention_modules(teacher))
            pairs = (default_layer_pairs(s_depth, t_depth, attention_levels)
                     if layer_pairs is None else [tuple(p) for p in layer_pairs])
            if not pairs or any(len(p) != 2 for p in pairs):
                raise ValueError(f"layer_pairs must be (student_block, teacher_block) pairs, "
                                 f"got {layer_pairs!r}")
            s_layers = normalise_layers([p[0] for p in pairs], s_depth)
            t_layers = normalise_layers([p[1] for p in pairs], t_depth)
            self.layer_pairs = list(zip(s_layers, t_layers))
            self.student_layout, self.teacher_layout = token_layout(model), token_layout(teacher)
            check_alignment(self.teacher_layout, self.student_layout, align, prefix)
        super().__init__(model, config, loss_fn=loss_fn, augment=augment, class_names=class_names)
        self.findings = self._findings(findings)
        self.teacher = None if teacher is None else freeze(teacher).to(self.device)
        self.teacher_image_size = None if teacher is None else _image_size(teacher)
        self._set_teacher_input(teacher_input, teacher_data)
        self.global_label = global_label
        self._global = None
        if global_label is not None:
            if global_label.rule not in GLOBAL_LABEL_RULES:
                raise ValueError(f"unknown global label rule {global_label.rule!r}")
            self._global = (torch.as_tensor(np.asarray(global_label.target, np.float32),
                                            device=self.device),
                            torch.as_tensor(np.asarray(global_label.mask, np.float32),
                                            device=self.device))
        self.last_terms: dict[str, torch.Tensor] = {}

    def _set_teacher_input(self, teacher_input, teacher_data) -> None:
        self.teacher_data = None
        self.teacher_input = None          # callable on the augmented student batch
        if self.teacher is None:
            self.teacher_input_name = None
            return
        if callable(teacher_input):
            self.teacher_input_name = getattr(teacher_input, "__name__", "custom")
            self.teacher_input = teacher_input
            return
        self.teacher_input_name = teacher_input
        if teacher_input == "upsampled_lr":
            if self.teacher_image_size is None:
                raise ValueError("teacher_input='upsampled_lr' needs the teacher's image_size "
                                 "(cxr_config or patch_embed.img_size)")
            self.teacher_input = functools.partial(resize_square, size=self.teacher_image_size)
            return
        if teacher_data is None:
            raise ValueError("teacher_input='high_res' feeds the teacher the batch's rows at its "
                             "own resolution: pass teacher_data (the training split at "
                             "teacher_image_size), or choose teacher_input='upsampled_lr'")
        size = int(getattr(teacher_data, "image_size", 0))
        if self.teacher_image_size is not None and size != self.teacher_image_size:
            raise ValueError(f"teacher_data holds {size} px images but the teacher takes "
                             f"{self.teacher_image_size} px")
        if self.augment is not None and not hasattr(self.augment, "paired"):
            raise TypeError(f"teacher_input='high_res' augments both resolutions with one draw: "
                            f"{type(self.augment).__name__} has no paired(); use BatchAugment, "
                            f"augment=None or teacher_input='upsampled_lr'")
        self.teacher_data = teacher_data
        self._teacher_rows = RowReader(teacher_data)

    def _findings(self, findings) -> torch.Tensor | None:
        if findings is None:
            return None if self.class_names is None else finding_columns(self.class_names).to(
                self.device)
        if all(isinstance(name, str) for name in findings):
            if self.class_names is None:
                raise ValueError("findings given by name need class_names")
            wanted = {canonical(name) for name in findings}
            columns = torch.tensor([canonical(c) in wanted for c in self.class_names])
        else:
            columns = torch.as_tensor(findings).bool().flatten()
        if not columns.any():
            raise ValueError(f"findings {findings!r} select no class")
        return columns.to(self.device)

    @property
    def teacher_name(self) -> str | None:
        if self.teacher is None:
            return None
        name = getattr(self.teacher, "teacher_name", None)
        return str(name or (getattr(self.teacher, "cxr_config", None) or {}).get("name")
                   or type(self.teacher).__name__)

    @property
    def global_label_rule(self) -> str:
        return "any_finding" if self.global_label is None else self.global_label.rule

    def mlcak_settings(self) -> dict:
        """What defines the arm (saved with the run, compared on resume)."""
        findings = None if self.findings is None else (
            [c for c, f in zip(self.class_names, self.findings.tolist()) if f]
            if self.class_names is not None else [int(i) for i in self.findings.nonzero()])
        return {"teacher": self.teacher_name, "teacher_image_size": self.teacher_image_size,
                "teacher_input": self.teacher_input_name,
                "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "layer_pairs": [list(p) for p in self.layer_pairs],
                "align": self.align, "prefix": self.prefix, "findings": findings,
                "global_label": self.global_label_rule}

    def method_settings(self) -> dict[str, dict]:
        return {"mlcak": self.mlcak_settings()}

    def check_rows(self, dataset) -> None:
        """Refuse a training set whose rows are not those of ``teacher_data``/``global_label``
        (both are looked up by the batch's ``index``)."""
        if dataset is None or not hasattr(dataset, "records"):
            return
        if self.teacher_data is not None:
            ours = dataset.records["image_id"].astype(str).to_numpy()
            theirs = self.teacher_data.records["image_id"].astype(str).to_numpy()
            if not np.array_equal(ours, theirs):
                raise ValueError(f"teacher_data's rows are not the training set's ({len(theirs)} "
                                 f"vs {len(ours)} images, or another order): pass the training "
                                 f"split at the teacher's resolution")
        if self.global_label is not None and len(self.global_label.target) != len(dataset):
            raise ValueError(f"global_label has {len(self.global_label.target)} rows, the "
                             f"training set {len(dataset)}")

    def fit(self, train_loader, val_loader=None):
        self.check_rows(getattr(train_loader, "dataset", None))
        return super().fit(train_loader, val_loader)

    @property
    def uses_attention(self) -> bool:
        return self.teacher is not None and self.gamma > 0

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student images, teacher images or None) of one training batch, augmented.

        ``high_res``: the batch's rows read from ``teacher_data`` and augmented with the
        student's draw; ``upsampled_lr`` (or a callable): the augmented student batch mapped
        to the teacher's input. The student's images are the same in both (one draw each).
        """
        images = batch["image"]
        if self.teacher is not None and self.teacher_data is not None:
            rows = batch["index"].detach().cpu().numpy()
            high = self._teacher_rows(rows).to(device=images.device, dtype=images.dtype)
            if self.augment is not None:
                images, high = self.augment.paired(images, high)
            return images, high
        if self.augment is not None:
            images = self.augment(images)
        if self.teacher is None:
            return images, None
        return images, (self.teacher_input(images) if self.teacher_input is not None
                        else images)

    @torch.no_grad()
    def teacher_outputs(self, inputs: torch.Tensor
                        ) -> tuple[MultiTaskOutput, list[torch.Tensor]]:
        """The frozen teacher's logits (float32) on its ``inputs`` and its maps aligned to the
        student's layout."""
        if self.teacher.training:  # someone switched it back; BatchNorm must not learn
            self.teacher.eval()
        recorder = (AttentionRecorder(self.teacher, [t for _, t in self.layer_pairs])
                    if self.uses_attention else contextlib.nullcontext())
        with recorder, self.accelerator.autocast():
            if is_multitask(self.teacher):
                out = self.teacher.forward_tasks(inputs)
            else:
                out = MultiTaskOutput(self.teacher(inputs), None)
        out = MultiTaskOutput(out.local.float(),
                              None if out.global_ is None else out.global_.float())
        maps = []
        if self.uses_attention:
            maps = [align_attention(a.float(), self.teacher_layout, self.student_layout,
                                    self.align, self.prefix) for a in recorder.ordered()]
        return out, maps

    def training_step(self, batch: dict) -> torch.Tensor:
        images, teacher_images = self.inputs(batch)
        recorder = (AttentionRecorder(self.unwrapped_model, [s for s, _ in self.layer_pairs])
                    if self.uses_attention else contextlib.nullcontext())
        with recorder:
            out = self.model(images)
        if not isinstance(out, MultiTaskOutput):
            raise TypeError(f"the student returned {type(out).__name__} in training mode, not a "
                            f"MultiTaskOutput")
        teacher_out, teacher_maps, student_maps = None, [], []
        if self.teacher is not None:
            teacher_out, teacher_maps = self.teacher_outputs(teacher_images)
        if self.uses_attention:
            student_maps = [student_view(a, self.student_layout, self.prefix)
                            for a in recorder.ordered()]
        g_target = g_mask = None
        if self._global is not None:
            rows = batch["index"].to(self.device).long()
            g_target, g_mask = self._global[0][rows], self._global[1][rows]
        terms = mlcak_loss(out, batch["target"], batch["mask"], teacher_out, student_maps,
                           teacher_maps, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                           findings=self.findings, class_loss=self.loss_fn,
                           global_target=g_target, global_mask=g_mask)
        self.last_terms = {name: value.detach() for name, value in terms._asdict().items()}
        return terms.total


__all__ = ["NOT_FINDINGS", "TEACHER_INPUTS", "GLOBAL_LABEL_RULES", "DEFAULT_GAMMA",
           "finding_columns", "global_labels", "GlobalLabels", "dataset_global_labels",
           "LossTerms", "attention_loss", "mlcak_loss", "default_layer_pairs", "check_weights",
           "RowReader", "MLCAKTrainer"]
