"""The GLoRI study (CheXFound, arXiv 2502.05142) on our datasets: the four arms on one backbone,
the long tail as prevalence buckets, label efficiency, and per-disease attention maps.

Arms: ``fine_tune`` (the backbone and a linear head trained end to end), then on that backbone
frozen: ``linear_probe`` (a linear head on the CLS tokens of the last 4 blocks: the global
features ``glori_cls`` appends, as the official probe reads them), ``linear_probe_last`` (on the
last block's CLS only), ``glori`` (class queries over patch tokens) and ``glori_cls`` (plus the
CLS/global features). So ``glori_cls`` against ``linear_probe`` measures what the class queries
add to the same global features, not 4× more of them. The paper's backbone is a foundation model
pretrained on a million CXRs; here ``backbone_weights="fine_tune"`` (the default, offline)
freezes the backbone the ``fine_tune`` arm trained on the same training patients, and
``"pretrained"`` uses timm's weights from the local cache.

Losses (:func:`glori_loss`): ``"bce"``, masked BCE, what the official GLoRI command trains with;
``"bce+asl"``, the official ``--focal-loss`` flag that adds the asymmetric loss to it; ``"asl"``,
the asymmetric loss alone. Every arm of a study is trained with the same loss.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..tables import overall_row

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from ..experiment import RunResult, StudyData
    from ..outputs import Outputs
    from ..train import Schedule

N_BLOCKS = 4  # blocks whose tokens GLoRI reads, and whose CLS tokens the probe reads
ARMS = {"fine_tune": {}, "linear_probe": {"n_blocks": N_BLOCKS},
        "linear_probe_last": {"n_blocks": None}, "glori": {"use_cls": False},
        "glori_cls": {"use_cls": True}}
BUCKETS = ("head", "medium", "tail")
GLORI_LOSSES = ("bce", "bce+asl", "asl")


def glori_loss(name):
    """The training loss named ``name`` (see module docstring); a callable passes through.

    "bce+asl" is L = L_BCE + L_ASL, both masked means over the known labels (the official code
    sums both over the batch: the same loss up to a constant factor).
    """
    from ..train import make_loss

    if callable(name):
        return name
    if name not in GLORI_LOSSES:
        raise ValueError(f"loss must be one of {GLORI_LOSSES}, got {name!r}")
    if name != "bce+asl":
        return make_loss(name)
    bce, asl = make_loss("bce"), make_loss("asl")

    def bce_plus_asl(logits, target, mask=None):
        return bce(logits, target, mask) + asl(logits, target, mask)

    return bce_plus_asl


def arm_settings(arms: Sequence[str], decoder_norm: str = "post", loss="bce") -> pd.DataFrame:
    """What each arm trains and reads, with the decoder norm and loss it runs with: the table
    that lets a reader check the prose against the runs."""
    reads = {"fine_tune": "the whole network, end to end",
             "linear_probe": f"CLS of the last {N_BLOCKS} blocks (frozen)",
             "linear_probe_last": "CLS of the last block (frozen)",
             "glori": f"patch tokens of the last {N_BLOCKS} blocks (frozen)",
             "glori_cls": f"patch tokens + CLS of the last {N_BLOCKS} blocks (frozen)"}
    heads = {"fine_tune": "linear", "linear_probe": "linear", "linear_probe_last": "linear",
             "glori": "class queries", "glori_cls": "class queries + global features"}
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    return pd.DataFrame([{"arm": arm, "head": heads[arm], "reads": reads[arm],
                          "decoder norm": decoder_norm if arm.startswith("glori") else "—",
                          "loss": name} for arm in arms])


def prevalence_buckets(data: StudyData) -> pd.DataFrame:
    """Classes ranked by training prevalence and cut in thirds: head, medium, tail.

    The paper's long tail is 40 CXR-LT findings; our datasets have 14 classes, so the tail is
    the least prevalent third of them.
    """
    labels = np.asarray(data.train.labels, dtype=float)
    prevalence = np.nanmean(labels, axis=0)
    order = np.argsort(-prevalence, kind="stable")
    bucket = np.empty(len(order), dtype=object)
    for rank, column in enumerate(order):
        bucket[column] = BUCKETS[min(rank * 3 // len(order), 2)]
    return pd.DataFrame({"class": list(data.classes), "train prevalence": prevalence,
                         "positives": np.nansum(labels, axis=0).astype(int), "bucket": bucket})


def bucket_table(runs: Mapping[str, object], buckets: pd.DataFrame) -> pd.DataFrame:
    """Mean test AUC per prevalence bucket and arm (classes without an AUC left out)."""
    where = buckets.set_index("class")["bucket"]
    rows = []
    for tag, run in runs.items():
        table = run.per_class.assign(bucket=lambda t: t["class"].map(where))
        for bucket in BUCKETS:
            aucs = table.loc[table["bucket"] == bucket, "auc"].dropna()
            rows.append({"arm": tag, "bucket": bucket, "classes": int(len(aucs)),
                         "mean AUC": float(aucs.mean()) if len(aucs) else np.nan})
    table = pd.DataFrame(rows).pivot_table(index="arm", columns="bucket", values="mean AUC",
                                           sort=False, dropna=False)
    return table.reindex(columns=list(BUCKETS)).reset_index()  # a bucket without AUCs stays


def with_training_fraction(data: StudyData, fraction: float, seed: int = 0):
    """``data`` with the training split cut to about ``fraction`` of its patients (whole patients,
    seeded); validation and test are left as they are, so every fraction is tested alike."""
    from ..data.splits import subsample_patients

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return data
    rows = subsample_patients(data.train, max(1, int(round(fraction * len(data.train)))), seed)
    return replace(data, train=data.train.subset(rows, "train"))


def save_backbone(run: RunResult, out: Outputs, tag: str) -> Path:
    """The fine-tuned backbone's weights, as a file ``create_model(pretrained=...)`` reads."""
    path = out.backbone_file(tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(run.model, "module", run.model)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def train_arms(data: StudyData, out: Outputs, arms: Sequence[str],
               schedule: Schedule | None = None, *, backbone: str = "deit_small",
               backbone_weights: str = "fine_tune", backbone_kwargs: dict | None = None,
               decoder_dim: int = 768, decoder_norm: str = "post", loss="bce", suffix: str = "",
               **train_kwargs) -> dict:
    """Train ``arms`` (see module docstring) on ``data``; ``fine_tune`` first when the frozen
    arms read its backbone. ``decoder_norm`` ("post", the official layer, or "pre") goes to the
    GLoRI arms, ``loss`` (:func:`glori_loss`) and ``schedule`` to every arm. Returns arm →
    :class:`cxrstudy.experiment.RunResult`."""
    from ..experiment import train_and_evaluate
    from ..models.glori import DECODER_NORMS

    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if backbone_weights not in ("fine_tune", "pretrained"):
        raise ValueError(f"backbone_weights must be 'fine_tune' or 'pretrained', "
                         f"got {backbone_weights!r}")
    if decoder_norm not in DECODER_NORMS:
        raise ValueError(f"decoder_norm must be one of {DECODER_NORMS}, got {decoder_norm!r}")
    train_kwargs["loss"] = glori_loss(loss)
    extra = dict(backbone_kwargs or {})
    pretrained = backbone_weights == "pretrained"
    runs = {}
    frozen_arms = [a for a in arms if a != "fine_tune"]
    if "fine_tune" in arms or (frozen_arms and backbone_weights == "fine_tune"):
        runs["fine_tune"] = train_and_evaluate(backbone, data, out, schedule,
                                               tag=f"fine_tune{suffix}",
                                               pretrained=pretrained, model_kwargs=extra,
                                               **train_kwargs)
    weights: bool | str = pretrained
    if frozen_arms and backbone_weights == "fine_tune":
        weights = str(save_backbone(runs["fine_tune"], out, f"fine_tune{suffix}"))
    for arm in frozen_arms:
        name = "glori" if arm.startswith("glori") else "linear_probe"
        kwargs = dict(extra, backbone=backbone, **ARMS[arm])
        if name == "glori":
            kwargs.update(decoder_dim=decoder_dim, decoder_norm=decoder_norm, n_blocks=N_BLOCKS)
        runs[arm] = train_and_evaluate(name, data, out, schedule, tag=f"{arm}{suffix}",
                                       pretrained=weights, model_kwargs=kwargs, **train_kwargs)
    return {arm: runs[arm] for arm in arms}


def label_efficiency(data: StudyData, out: Outputs, fractions: Sequence[float], arms: Sequence[str],
                     schedule: Schedule | None = None, *,
                     full_runs: Mapping[str, object] | None = None, seed: int = 0,
                     **arm_kwargs) -> pd.DataFrame:
    """Macro AUC (95% CI) of ``arms`` trained on each fraction of the training patients.

    At each fraction the frozen arms sit on a backbone fine-tuned on that same fraction (with
    ``backbone_weights="fine_tune"``), so no arm sees labels beyond its fraction. Runs at 100%
    are taken from ``full_runs`` when given.
    """
    rows = []
    for fraction in fractions:
        if fraction == 1.0 and full_runs is not None and all(a in full_runs for a in arms):
            runs = {a: full_runs[a] for a in arms}
            subset = data
        else:
            subset = with_training_fraction(data, fraction, seed)
            runs = train_arms(subset, out, arms, schedule, suffix=f"_{fraction:g}", seed=seed,
                              **arm_kwargs)
        for arm, run in runs.items():
            row = overall_row(run)
            rows.append({"arm": arm, "fraction": fraction, "train images": len(subset.train),
                         "train patients": int(subset.train.records["patient_id"].nunique()),
                         **{column: row[column] for column in ("macro AUC", "macro low", "macro high")}})
    return pd.DataFrame(rows)


__all__ = ["ARMS", "BUCKETS", "GLORI_LOSSES", "N_BLOCKS", "glori_loss", "arm_settings",
           "prevalence_buckets",
           "bucket_table", "with_training_fraction", "save_backbone", "train_arms",
           "label_efficiency"]
