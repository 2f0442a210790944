"""The CAN study (Ma, Wang & Hoi, MICCAI 2019): each network alone, the two together (logits
averaged), the two cross-attending, and CAN's balance loss against the usual remedies for class
imbalance on the same two-network model. The mechanism is :mod:`cxrstudy.models.can` (trained by
:mod:`cxrstudy.train.can`); the losses are :mod:`cxrstudy.train.imbalance_losses`.

"CAN beats one network" mixes two effects: a second network, and the attention between them.
The arms separate them (:func:`comparisons` lists which pair isolates what):

* ``single`` / ``single_second`` — the first / the second network alone (BCE);
* ``ensemble`` — both networks, logits averaged, no attention (:class:`~cxrstudy.models.can.
  LogitEnsemble`), trained on the same loss as ``can_bce`` (ℓ(z) + λ_b·½Σℓ(z_i) with BCE);
* ``can_*`` — the same CAN, only the class loss ℓ changes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from ..experiment import StudyData
    from ..outputs import Outputs
    from ..train import Schedule

#: Arm → class loss, in the order the tables read: each network alone, the two together, the
#: two cross-attending (every ``can_*`` arm is the same CAN, only the loss differs).
ARMS = {"single": "bce", "single_second": "bce", "ensemble": "bce", "can_bce": "bce",
        "can_weighted_bce": "weighted_bce", "can_focal": "focal", "can_asl": "asl",
        "can_balance": "can_balance"}

#: (arm, against, what the difference isolates), read top to bottom.
COMPARISONS = (
    ("single_second", "single", "the network: the second architecture against the first, each "
                                "alone"),
    ("ensemble", "single", "a second network: the first network joined by the second, logits "
                           "averaged, no attention"),
    ("ensemble", "single_second", "a second network: the second network joined by the first"),
    ("can_bce", "ensemble", "the cross-attention: the same two networks and loss, with and "
                            "without attention between them"),
    ("can_bce", "single", "what 'CAN beats one network' measures: a second network and the "
                          "cross-attention together"),
    ("can_weighted_bce", "can_bce", "the loss (class-weighted BCE) on the same CAN"),
    ("can_focal", "can_bce", "the loss (focal) on the same CAN"),
    ("can_asl", "can_bce", "the loss (asymmetric) on the same CAN"),
    ("can_balance", "can_bce", "the loss (CAN's balance loss) on the same CAN"),
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
    its balance loss), else ``can_bce``, else the first CAN arm that ran; None when none did
    (only CAN has attention maps)."""
    preferred = [arm for arm in ("can_balance", "can_bce") if arm in runs]
    can_arms = [arm for arm in runs if arm.startswith("can_")]
    return (preferred or can_arms or [None])[0]


def arm_loss(arm: str, data: StudyData, max_weight: float | None = 50.0):
    """The arm's loss; class-weighted BCE takes its weights from the training prevalence."""
    from ..train import make_loss

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
    :class:`~cxrstudy.train.can.CANTrainer` (``branch_weight`` applies to both; the attention
    settings only to CAN)."""
    from ..experiment import train_and_evaluate
    from ..train.can import CANTrainer

    loss = arm_loss(arm, data, max_weight)
    if arm in ("single", "single_second"):
        network = backbones[0 if arm == "single" else 1]
        return train_and_evaluate(network, data, out, schedule, tag=arm, loss=loss,
                                  **train_kwargs)
    ensemble = arm == "ensemble"
    return train_and_evaluate(
        "logit_ensemble" if ensemble else "can", data, out, schedule, tag=arm, loss=loss,
        model_kwargs=dict({} if ensemble else (can_options or {}), backbones=tuple(backbones)),
        trainer_cls=CANTrainer, trainer_kwargs=dict(branch_weight=branch_weight,
                                                    attention_weight=attention_weight,
                                                    attention_loss=attention_loss),
        **train_kwargs)


def comparisons(runs: Mapping[str, object]) -> pd.DataFrame:
    """One row per pair of :data:`COMPARISONS` whose two arms both ran: what the pair isolates,
    the differences in macro and micro AUC (arm − against) and DeLong's p on the pooled micro
    pairs (optimistic: see :func:`cxrstudy.metrics.pooled_delong_p`)."""
    from ..metrics import pooled_delong_p

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


__all__ = ["ARMS", "COMPARISONS", "ordered_arms", "arm_with_maps", "arm_loss", "train_arm",
           "comparisons"]
