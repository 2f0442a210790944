"""The CAN study (Ma, Wang & Hoi, MICCAI 2019): each network alone, the two together (logits
averaged), the two cross-attending, and CAN's balance loss against the usual remedies for class
imbalance on the same two-network model. The mechanism is :mod:`cxrstudy.methods.can.model` (trained by
:mod:`cxrstudy.methods.can.training`); the losses are :mod:`cxrstudy.train.imbalance_losses`.

"CAN beats one network" mixes several changes: a second network and the two-network loss,
CAN's projections and heads, and the attention between the networks. The arms separate them
(:func:`comparisons` lists which pair isolates what). The design itself, arm → class loss and
the pairs compared, is written in notebook 06 and passed in (:func:`ordered_arms`' ``design``,
:func:`train_arm`'s ``loss``, :func:`comparisons`' ``pairs``):

* ``single`` / ``single_second`` — the first / the second network alone (BCE);
* ``ensemble`` — both networks, each with its own classifier, logits averaged, no attention
  (:class:`~cxrstudy.methods.can.model.LogitEnsemble`), trained on the same loss as ``can_bce``
  (ℓ(z) + λ_b·½Σℓ(z_i) with BCE);
* ``can_no_attention`` — CAN's own model (projections, heads) and ``can_bce``'s loss with the
  attention switched off (``cross_attention=False``: the gate passes p through, no attention
  term), built from the same seeded draws as ``can_bce``: against ``can_bce`` only the
  attention differs;
* ``can_*`` — the same CAN, only the class loss ℓ changes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from .model import CrossAttentionNetwork
    from ...experiment import StudyData
    from ...outputs import Outputs
    from ...train import Schedule

#: The arm that is CAN with ``cross_attention=False`` (no attention maps to show).
NO_ATTENTION_ARM = "can_no_attention"

def ordered_arms(arms: Sequence[str], design: Mapping[str, str]) -> list[str]:
    """``arms`` in the order of ``design`` (the notebook's arm → class loss, written in the
    order the tables read); an arm the design lacks is refused."""
    unknown = [arm for arm in arms if arm not in design]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(design)}")
    return [arm for arm in design if arm in set(arms)]


def arm_with_maps(runs: Mapping[str, object]) -> str | None:
    """The arm whose attention maps the notebook shows: ``can_balance`` (CAN as published, with
    its balance loss), else ``can_bce``, else the first CAN arm that ran with its attention on;
    None when none did (only CAN has attention maps; ``can_no_attention``'s are held flat)."""
    preferred = [arm for arm in ("can_balance", "can_bce") if arm in runs]
    can_arms = [arm for arm in runs if arm.startswith("can_") and arm != NO_ATTENTION_ARM]
    return (preferred or can_arms or [None])[0]


def arm_loss(name: str, data: StudyData, max_weight: float | None = 50.0):
    """The class loss ℓ registered as ``name`` (:func:`cxrstudy.train.make_loss`); class-weighted
    BCE takes its weights from the training prevalence, capped at ``max_weight``."""
    from ...train import make_loss

    if name == "weighted_bce":
        prevalence = np.nanmean(np.asarray(data.train.labels, dtype=float), axis=0)
        return make_loss(name, prevalence=prevalence, max_weight=max_weight)
    return make_loss(name)


def train_arm(arm: str, data: StudyData, out: Outputs, schedule: Schedule | None = None, *,
              loss: str, backbones: Sequence[str] = ("resnet18", "densenet121"),
              can_options: dict | None = None, branch_weight: float = 1.0,
              attention_weight: float = 0.1, attention_loss: str = "agree",
              max_weight: float | None = 50.0, **train_kwargs):
    """Train and test one arm with :func:`cxrstudy.experiment.train_and_evaluate` on ``schedule``,
    with the class loss ``loss`` (a name for :func:`arm_loss`: the notebook's design says which).

    ``single``/``single_second``: ``backbones[0]``/``backbones[1]`` alone (plain trainer);
    ``ensemble``: ``"logit_ensemble"`` over both, and every ``can_*`` arm ``"can"``, both with
    :class:`~cxrstudy.methods.can.training.CANTrainer` (``branch_weight`` applies to both; the attention
    settings only to CAN; ``can_no_attention`` is ``"can"`` with ``cross_attention=False``, the
    rest of ``can_options`` as for the other CAN arms). ``train_kwargs`` (``seed``, ``n_boot``,
    ``pretrained``, ...) reach :func:`~cxrstudy.experiment.train_and_evaluate` for every arm."""
    from ...experiment import train_and_evaluate
    from .training import CANTrainer

    loss = arm_loss(loss, data, max_weight)
    if arm in ("single", "single_second"):
        network = backbones[0 if arm == "single" else 1]
        return train_and_evaluate(network, data, out, schedule, tag=arm, loss=loss,
                                  **train_kwargs)
    ensemble = arm == "ensemble"
    model_kwargs = dict({} if ensemble else (can_options or {}), backbones=tuple(backbones))
    if arm == NO_ATTENTION_ARM:
        model_kwargs["cross_attention"] = False
    return train_and_evaluate(
        "logit_ensemble" if ensemble else "can", data, out, schedule, tag=arm, loss=loss,
        model_kwargs=model_kwargs,
        trainer_cls=CANTrainer, trainer_kwargs=dict(branch_weight=branch_weight,
                                                    attention_weight=attention_weight,
                                                    attention_loss=attention_loss),
        **train_kwargs)


def comparisons(runs: Mapping[str, object], pairs: Sequence[tuple[str, str, str]]
                ) -> pd.DataFrame:
    """One row per ``(arm, against, what differs)`` of ``pairs`` (the notebook's, read top to
    bottom) whose two arms both ran: what the pair isolates,
    the differences in macro and micro AUC (arm − against) and DeLong's p on the pooled micro
    pairs (optimistic: see :func:`cxrstudy.metrics.pooled_delong_p`)."""
    from ...metrics import pooled_delong_p

    rows = []
    for arm, against, isolates in pairs:
        if arm not in runs or against not in runs:
            continue
        a, b = runs[arm], runs[against]
        if not np.array_equal(a.targets, b.targets):
            raise ValueError(f"arms {arm!r} and {against!r} were tested on different images")

        def difference(key):
            x, y = a.overall.get(key), b.overall.get(key)
            return np.nan if x is None or y is None else float(x) - float(y)

        rows.append({"comparison": f"{arm} − {against}", "isolates": isolates,
                     "Δ macro AUC": difference("macro_auc"),
                     "Δ micro AUC": difference("micro_auc"),
                     "DeLong p (micro)": pooled_delong_p(b.targets, a.probs, b.probs, b.masks)})
    return pd.DataFrame(rows, columns=["comparison", "isolates", "Δ macro AUC", "Δ micro AUC",
                                       "DeLong p (micro)"])


# ---- the mechanism on one batch ---------------------------------------------------------------
def attention_by_hand(model: CrossAttentionNetwork, p1: torch.Tensor, p2: torch.Tensor,
                      branch: int, image: int, row: int, column: int) -> float:
    """a_i at one position, written out in float64 from p₁ and p₂ (not from the module's
    product): σ(Σ_k W_i[0, k]·p₁[k]·p₂[k] + b_i[0]), the equation the module claims to compute
    (channel mode: its first channel)."""
    conv = model.attention_convs[0 if model.shared_attention else branch]
    weight, bias = conv.weight[0, :, 0, 0].detach().double(), conv.bias[0].detach().double()
    here = p1[image, :, row, column].double() * p2[image, :, row, column].double()
    return float(1 / (1 + torch.exp(-(weight @ here + bias))))


def balance_loss_by_hand(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         gamma: float = 2.0) -> float:
    """CAN's balance loss from its terms, in float64: Σ m·w·(1 − p_t)^γ·BCE / Σ m, with
    w = w⁺_c = T_c/(2P_c) on a positive and w⁻_c = T_c/(2N_c) on a negative (P_c, N_c the
    batch's known positives and negatives of class c, T_c = P_c + N_c; a class lacking either
    keeps w = 1), p_t = p on a positive and 1 − p on a negative, BCE = −log p_t (labels 0 or 1)."""
    z, y, m = logits.double(), target.double(), mask.double()
    positives, negatives = (m * y).sum(0), (m * (1 - y)).sum(0)
    both = (positives > 0) & (negatives > 0)
    total = positives + negatives
    w_pos = torch.where(both, total / (2 * positives.clamp_min(1)), torch.ones_like(total))
    w_neg = torch.where(both, total / (2 * negatives.clamp_min(1)), torch.ones_like(total))
    p = 1 / (1 + torch.exp(-z))
    p_t = y * p + (1 - y) * (1 - p)
    weight = y * w_pos + (1 - y) * w_neg
    bce = -torch.log(p_t)
    return float((m * weight * (1 - p_t) ** gamma * bce).sum() / m.sum().clamp_min(1))


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(str(n) for n in tensor.shape)


@torch.no_grad()
def one_batch_cross_attention(model: CrossAttentionNetwork, batch: dict, gamma: float = 2.0
                              ) -> dict:
    """CAN's equations on one batch (``image``, ``target``, ``mask``), in eval mode: each
    network's feature map f_i, the projected p_i, their Hadamard product p₁ ⊙ p₂ and the
    attention a_i = σ(W_i * (p₁ ⊙ p₂) + b_i) it gives, with a_i at the grid's centre of the
    first image recomputed by hand (:func:`attention_by_hand`), and the balance loss of the mean
    logits z on the batch from its terms (:func:`balance_loss_by_hand`) beside the library's
    ``can_balance``. The model's attention must be on (a CAN with ``cross_attention=False``
    has no a_i).

    Returns ``table`` (one row per quantity: shape, min, max, and by hand / library / their
    difference where there is a check) and ``maps``: the channel means of p₁ and p₂ and the
    channel-mean a₁, a₂, each [B, h, w] scaled to [0, 1] per image, for drawing."""
    from ...models.attention_maps import minmax_per_image
    from ...train import make_loss

    if not getattr(model, "cross_attention", False):
        raise ValueError("one_batch_cross_attention needs a CAN with its attention on")
    model.eval()
    images = batch["image"]
    features = [backbone.forward_features(images) for backbone in model.backbones]
    p1, p2 = model.feature_maps(images)
    product = p1 * p2
    out = model.forward_branches(images)
    a1, a2 = out.attention
    row, column = p1.shape[-2] // 2, p1.shape[-1] // 2
    rows = [{"quantity": name, "shape": _shape(value), "min": float(value.min()),
             "max": float(value.max())}
            for name, value in (("f₁ (network 1's feature map)", features[0]),
                                ("f₂ (network 2's feature map)", features[1]),
                                ("p₁ (f₁ projected)", p1),
                                ("p₂ (f₂ projected, on p₁'s grid)", p2),
                                ("p₁ ⊙ p₂", product),
                                ("a₁ = σ(W₁ * (p₁ ⊙ p₂) + b₁)", a1),
                                ("a₂ = σ(W₂ * (p₁ ⊙ p₂) + b₂)", a2),
                                ("z (mean logits)", out.logits))]
    for branch, attention in enumerate((a1, a2)):
        library = float(attention[0, 0, row, column])
        hand = attention_by_hand(model, p1, p2, branch, 0, row, column)
        rows.append({"quantity": f"a{'₁₂'[branch]} at image 0, position ({row}, {column})",
                     "shape": "1", "by hand": hand, "library": library,
                     "|hand − library|": abs(hand - library)})
    target, mask = batch["target"], batch["mask"]
    library = float(make_loss("can_balance", gamma=gamma)(out.logits, target, mask))
    hand = balance_loss_by_hand(out.logits, target, mask, gamma)
    rows.append({"quantity": f"balance loss ℓ_bal(z), γ = {gamma:g}", "shape": "1",
                 "by hand": hand, "library": library, "|hand − library|": abs(hand - library)})
    table = pd.DataFrame(rows, columns=["quantity", "shape", "min", "max", "by hand", "library",
                                        "|hand − library|"])
    maps = {"mean p₁": p1.mean(dim=1), "mean p₂": p2.mean(dim=1), "a₁": a1.mean(dim=1),
            "a₂": a2.mean(dim=1)}
    return {"table": table,
            "maps": {name: minmax_per_image(value.float()).numpy() for name, value in maps.items()}}


__all__ = ["NO_ATTENTION_ARM", "ordered_arms", "arm_with_maps", "arm_loss",
           "train_arm", "comparisons", "attention_by_hand", "balance_loss_by_hand",
           "one_batch_cross_attention"]
