"""The CAN study (Ma, Wang & Hoi, MICCAI 2019): each network alone, the two together (logits
averaged), the two cross-attending, and CAN's balance loss against the usual remedies for class
imbalance on the same two-network model. The mechanism is :mod:`cxrstudy.methods.can.model` (trained by
:mod:`cxrstudy.methods.can.training`); the losses are :mod:`cxrstudy.train.imbalance_losses`.

"CAN beats one network" mixes several changes: a second network and the two-network loss,
CAN's projections and heads, and the attention between the networks. The arms separate them
(:func:`comparisons` lists which pair isolates what):

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

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from ...experiment import StudyData
    from ...outputs import Outputs
    from ...train import Schedule

#: Arm → class loss, in the order the tables read: each network alone, the two together, CAN
#: with its attention off, the two cross-attending (every other ``can_*`` arm is the same CAN,
#: only the loss differs).
ARMS = {"single": "bce", "single_second": "bce", "ensemble": "bce", "can_no_attention": "bce",
        "can_bce": "bce", "can_weighted_bce": "weighted_bce", "can_focal": "focal",
        "can_asl": "asl", "can_balance": "can_balance"}

#: The arm that is CAN with ``cross_attention=False`` (no attention maps to show).
NO_ATTENTION_ARM = "can_no_attention"

#: (arm, against, what differs between the two), read top to bottom. ℓ is the class loss; the
#: two-network loss is ℓ(z) + λ_b·½(ℓ(z₁) + ℓ(z₂)) (CANTrainer), CAN's adds λ_a·L_att.
COMPARISONS = (
    ("single_second", "single", "the network: the second architecture against the first, each "
                                "alone, same loss"),
    ("ensemble", "single", "a second network and the two-network loss: the first network joined "
                           "by the second, logits averaged, trained on ℓ(z) + λ_b·½Σℓ(z_i) "
                           "where the network alone trains on ℓ; no attention"),
    ("ensemble", "single_second", "a second network and the two-network loss: the second "
                                  "network joined by the first (as the row above)"),
    ("can_no_attention", "ensemble", "CAN's architecture without its attention: 1×1 projections "
                                     "(when the widths differ), the second map resized to the "
                                     "first's grid (when the grids differ) and a CAN head per "
                                     "branch, against each network's own classifier; same two "
                                     "networks and loss, no attention in either"),
    ("can_bce", "can_no_attention", "the cross-attention alone: the same CAN (projections, "
                                    "heads, starting weights) and class loss, with the gate "
                                    "p(1 + a) and the attention loss λ_a·L_att against the "
                                    "gate held open (g = p) and no attention loss"),
    ("can_bce", "ensemble", "CAN's whole addition to the two networks: the cross-attention "
                            "with its attention loss, plus CAN's projections and heads; same "
                            "networks and class loss"),
    ("can_bce", "single", "what 'CAN beats one network' measures: a second network, the "
                          "two-network loss, CAN's projections and heads and the "
                          "cross-attention, all at once"),
    ("can_weighted_bce", "can_bce", "the loss: class-weighted BCE for ℓ in every term, on the "
                                    "same CAN"),
    ("can_focal", "can_bce", "the loss: focal for ℓ in every term, on the same CAN"),
    ("can_asl", "can_bce", "the loss: asymmetric for ℓ in every term, on the same CAN"),
    ("can_balance", "can_bce", "the loss: CAN's balance loss for ℓ in every term, on the same "
                               "CAN"),
)


def ordered_arms(arms: Sequence[str]) -> list[str]:
    """``arms`` in the order of :data:`ARMS` (the tables' reading order); unknown arms refused."""
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(ARMS)}")
    return [arm for arm in ARMS if arm in set(arms)]


def arm_with_maps(runs: Mapping[str, object]) -> str | None:
    """The arm whose attention maps the notebook shows: ``can_balance`` (CAN as published, with
    its balance loss), else ``can_bce``, else the first CAN arm that ran with its attention on;
    None when none did (only CAN has attention maps; ``can_no_attention``'s are held flat)."""
    preferred = [arm for arm in ("can_balance", "can_bce") if arm in runs]
    can_arms = [arm for arm in runs if arm.startswith("can_") and arm != NO_ATTENTION_ARM]
    return (preferred or can_arms or [None])[0]


def arm_loss(arm: str, data: StudyData, max_weight: float | None = 50.0):
    """The arm's loss; class-weighted BCE takes its weights from the training prevalence."""
    from ...train import make_loss

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    name = ARMS[arm]
    if name == "weighted_bce":
        prevalence = np.nanmean(np.asarray(data.train.labels, dtype=float), axis=0)
        return make_loss(name, prevalence=prevalence, max_weight=max_weight)
    return make_loss(name)


def train_arm(arm: str, data: StudyData, out: Outputs, schedule: Schedule | None = None, *,
              backbones: Sequence[str] = ("resnet18", "densenet121"),
              can_options: dict | None = None, branch_weight: float = 1.0,
              attention_weight: float = 0.1, attention_loss: str = "agree",
              max_weight: float | None = 50.0, **train_kwargs):
    """Train and test one arm with :func:`cxrstudy.experiment.train_and_evaluate` on ``schedule``.

    ``single``/``single_second``: ``backbones[0]``/``backbones[1]`` alone (plain trainer);
    ``ensemble``: ``"logit_ensemble"`` over both, and every ``can_*`` arm ``"can"``, both with
    :class:`~cxrstudy.methods.can.training.CANTrainer` (``branch_weight`` applies to both; the attention
    settings only to CAN; ``can_no_attention`` is ``"can"`` with ``cross_attention=False``, the
    rest of ``can_options`` as for the other CAN arms). ``train_kwargs`` (``seed``, ``n_boot``,
    ``pretrained``, ...) reach :func:`~cxrstudy.experiment.train_and_evaluate` for every arm."""
    from ...experiment import train_and_evaluate
    from .training import CANTrainer

    loss = arm_loss(arm, data, max_weight)
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


def comparisons(runs: Mapping[str, object]) -> pd.DataFrame:
    """One row per pair of :data:`COMPARISONS` whose two arms both ran: what the pair isolates,
    the differences in macro and micro AUC (arm − against) and DeLong's p on the pooled micro
    pairs (optimistic: see :func:`cxrstudy.metrics.pooled_delong_p`)."""
    from ...metrics import pooled_delong_p

    rows = []
    for arm, against, isolates in COMPARISONS:
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


__all__ = ["ARMS", "NO_ATTENTION_ARM", "COMPARISONS", "ordered_arms", "arm_with_maps",
           "arm_loss", "train_arm", "comparisons"]
