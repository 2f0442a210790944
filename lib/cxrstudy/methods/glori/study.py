"""The GLoRI study (CheXFound, arXiv 2502.05142) on our datasets: the four arms on one backbone,
the long tail as prevalence buckets, label efficiency, and per-disease attention maps.

Arms (the notebook writes them out, arm → model settings, and passes them in as ``arm_models``):
``fine_tune`` (the backbone and a linear head trained end to end), then on that backbone
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

Learning rates: the official evaluation trains one head per learning rate of a grid (13 rates,
1e-5 to 0.1) and keeps the one with the best validation AUC. :func:`train_arms` does the same per
arm with ``lr_grid``: one run per rate on the training split, the run with the highest validation
macro AUC kept (:func:`select_rate`) and tested as it is. The official code then retrains the
chosen head on train + validation; we do not (the test split is never looked at to choose).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...tables import ablation_table, overall_row

if TYPE_CHECKING:  # the types in signatures (experiment is imported lazily, when training)
    from .model import GLoRI, CrossAttention
    from ...experiment import RunResult, StudyData
    from ...outputs import Outputs
    from ...train import Schedule

N_BLOCKS = 4  # blocks whose tokens GLoRI reads, and whose CLS tokens the probe reads
BUCKETS = ("head", "medium", "tail")
GLORI_LOSSES = ("bce", "bce+asl", "asl")
#: What a run at a rate other than the schedule's adds to its tag: ``glori_lr_0.002``. The rate
#: is written as a decimal, so 07's default ``exclude_models`` pattern for 05's side runs
#: (``05_glori/*_0.*``, the label-efficiency shares) leaves these out too.
RATE_TAG = "_lr_"


def glori_loss(name):
    """The training loss named ``name`` (see module docstring); a callable passes through.

    "bce+asl" is L = L_BCE + L_ASL, both masked means over the known labels (the official code
    sums both over the batch: the same loss up to a constant factor).
    """
    from ...train import make_loss

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
    from ...data.splits import subsample_patients

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


def rate_tag(tag: str, lr: float, schedule_lr: float) -> str:
    """The checkpoint tag of ``tag``'s run at learning rate ``lr``: ``tag`` itself at the
    schedule's rate (the run a study without a search trains keeps its name, checkpoint and
    results), else ``<tag>_lr_<lr as a decimal>``."""
    if math.isclose(lr, schedule_lr, rel_tol=1e-9, abs_tol=0.0):
        return tag
    return f"{tag}{RATE_TAG}{np.format_float_positional(lr, trim='-')}"


def validation_auc(run: RunResult) -> float:
    """The validation macro AUC a run is judged by: that of its best epoch (the epoch whose
    weights it kept and tested); NaN when no epoch had one."""
    if "val_macro_auc" not in run.history:
        return math.nan
    values = pd.to_numeric(run.history["val_macro_auc"], errors="coerce").to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else math.nan


def select_rate(scores: Mapping[float, float], schedule_lr: float) -> float:
    """The learning rate with the highest validation macro AUC in ``scores`` (rate → AUC).

    Ties go to the schedule's own rate, then to the smallest tied rate: without evidence for
    another rate the run a study without a search trains is kept, else the gentler step. An
    undefined AUC (NaN, e.g. a run that diverged) loses to any number; when no rate has one, the
    same tie rule picks.
    """
    if not scores:
        raise ValueError("select_rate needs at least one learning rate and its validation AUC")

    def rank(lr: float):
        auc = scores[lr]
        known = auc is not None and not math.isnan(auc)
        return (auc if known else -math.inf, math.isclose(lr, schedule_lr, rel_tol=1e-9), -lr)

    return max(scores, key=rank)


def arm_rates(arms: Sequence[str], schedule_lr: float, lr_grid: Sequence[float] | None = None,
              lr_sweep_arms: Sequence[str] | None = None,
              lrs: Mapping[str, float] | None = None,
              known: Sequence[str] | None = None) -> dict[str, list[float]]:
    """The learning rates each of ``arms`` trains at: every rate of ``lr_grid`` for an arm of
    ``lr_sweep_arms`` (None: every arm), else ``lrs[arm]`` (e.g. a rate chosen earlier), else
    the schedule's. An empty or absent grid searches nothing. ``lr_sweep_arms`` may name any
    arm of ``known`` (the study's design; None: ``arms``), run or not."""
    grid = [] if lr_grid is None else lr_grid
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise TypeError(f"lr_grid must be a list of learning rates or None, got {lr_grid!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in grid):
        raise ValueError(f"lr_grid must hold positive learning rates, got {list(grid)}")
    grid = [float(v) for v in grid]
    if len(set(grid)) != len(grid):
        raise ValueError(f"lr_grid repeats a learning rate: {grid}")
    if lr_sweep_arms is None:
        swept = set(arms)
    else:
        if isinstance(lr_sweep_arms, str) or not isinstance(lr_sweep_arms, Sequence):
            raise TypeError(f"lr_sweep_arms must be a list of arms or None, got {lr_sweep_arms!r}")
        known = list(arms if known is None else known)
        unknown = [a for a in lr_sweep_arms if a not in known]
        if unknown:
            raise ValueError(f"lr_sweep_arms names unknown arms {unknown}; "
                             f"choose from {', '.join(known)}")
        swept = set(lr_sweep_arms)
    fixed = dict(lrs or {})
    return {arm: list(grid) if grid and arm in swept else [float(fixed.get(arm, schedule_lr))]
            for arm in arms}


def train_arms(data: StudyData, out: Outputs, arms: Sequence[str],
               schedule: Schedule | None = None, *, arm_models: Mapping[str, Mapping],
               backbone: str = "deit_small",
               backbone_weights: str = "fine_tune", backbone_kwargs: dict | None = None,
               decoder_dim: int = 768, decoder_norm: str = "post", loss="bce",
               lr_grid: Sequence[float] | None = None, lr_sweep_arms: Sequence[str] | None = None,
               lrs: Mapping[str, float] | None = None, suffix: str = "",
               **train_kwargs) -> dict:
    """Train ``arms`` (see module docstring) on ``data``; ``fine_tune`` first when the frozen
    arms read its backbone. ``arm_models`` (the notebook's design: arm → the settings its model
    is built with, e.g. ``{"linear_probe": {"n_blocks": 4}}``) names the arms there are; an arm
    is the backbone itself (``fine_tune``), a ``glori*`` head or a ``linear_probe*``.
    ``decoder_norm`` ("post", the official layer, or "pre") goes to the GLoRI arms, ``loss``
    (:func:`glori_loss`) and ``schedule`` to every arm. Returns arm →
    :class:`cxrstudy.experiment.RunResult`.

    Learning rates (:func:`arm_rates`): an arm of ``lr_sweep_arms`` (None: every arm) trains once
    per rate of ``lr_grid`` and keeps the run :func:`select_rate` picks on validation; the frozen
    arms read the backbone of the ``fine_tune`` run kept. A rate whose run diverges (a
    non-finite loss) loses; when every rate diverges, the error is raised. Each kept run
    records its rate in ``run.extra["lr"]`` and every run of its arm in
    ``run.extra["lr_sweep"]`` (see :func:`lr_sweep_table`)."""
    from ...experiment import train_and_evaluate
    from .model import DECODER_NORMS
    from ...train import Schedule

    unknown = [a for a in arms if a not in arm_models]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {', '.join(arm_models)}")
    if backbone_weights not in ("fine_tune", "pretrained"):
        raise ValueError(f"backbone_weights must be 'fine_tune' or 'pretrained', "
                         f"got {backbone_weights!r}")
    if decoder_norm not in DECODER_NORMS:
        raise ValueError(f"decoder_norm must be one of {DECODER_NORMS}, got {decoder_norm!r}")
    train_kwargs["loss"] = glori_loss(loss)
    schedule = Schedule() if schedule is None else schedule
    frozen_arms = [a for a in arms if a != "fine_tune"]
    needs_fine_tune = "fine_tune" in arms or (frozen_arms and backbone_weights == "fine_tune")
    rates = arm_rates((["fine_tune"] if needs_fine_tune else []) + frozen_arms, schedule.lr,
                      lr_grid, lr_sweep_arms, lrs, known=list(arm_models))
    extra = dict(backbone_kwargs or {})
    pretrained = backbone_weights == "pretrained"

    def train_at_rates(arm: str, model: str, weights, model_kwargs: dict) -> RunResult:
        """One run of ``arm`` per rate; the one :func:`select_rate` picks, its sweep recorded."""
        tried: dict[float, RunResult | None] = {}
        for lr in rates[arm]:
            same = math.isclose(lr, schedule.lr, rel_tol=1e-9)
            try:
                tried[lr] = train_and_evaluate(
                    model, data, out, schedule if same else schedule.replace(lr=lr),
                    tag=rate_tag(f"{arm}{suffix}", lr, schedule.lr), pretrained=weights,
                    model_kwargs=model_kwargs, **train_kwargs)
            except FloatingPointError:
                if len(rates[arm]) == 1:
                    raise
                tried[lr] = None  # diverged: recorded, never chosen over a run that trained
        if all(run is None for run in tried.values()):
            raise FloatingPointError(f"{arm}: every learning rate of {rates[arm]} diverged")
        scores = {lr: math.nan if run is None else validation_auc(run) for lr, run in tried.items()}
        chosen = select_rate({lr: a for lr, a in scores.items() if tried[lr] is not None},
                             schedule.lr)
        kept = tried[chosen]
        kept.extra["lr"] = chosen
        kept.extra["lr_sweep"] = [
            {"lr": lr, "run": rate_tag(f"{arm}{suffix}", lr, schedule.lr),
             "val macro AUC": scores[lr],
             "best epoch": None if run is None else run.extra.get("best_epoch"),
             "diverged": run is None, "selected": lr == chosen} for lr, run in tried.items()]
        return kept

    runs = {}
    if needs_fine_tune:
        runs["fine_tune"] = train_at_rates("fine_tune", backbone, pretrained, extra)
    weights: bool | str = pretrained
    if frozen_arms and backbone_weights == "fine_tune":  # the kept fine-tuned backbone
        weights = str(save_backbone(runs["fine_tune"], out, runs["fine_tune"].tag))
    for arm in frozen_arms:
        name = "glori" if arm.startswith("glori") else "linear_probe"
        kwargs = dict(extra, backbone=backbone, **arm_models[arm])
        if name == "glori":
            kwargs.update(decoder_dim=decoder_dim, decoder_norm=decoder_norm, n_blocks=N_BLOCKS)
        runs[arm] = train_at_rates(arm, name, weights, kwargs)
    return {arm: runs[arm] for arm in arms}


def chosen_rates(runs: Mapping[str, RunResult]) -> dict[str, float]:
    """arm → the learning rate its kept run trained with (what ``metrics.json`` records)."""
    return {arm: run.extra["lr"] for arm, run in runs.items() if "lr" in run.extra}


#: The columns of :func:`lr_sweep_table`.
SWEEP_COLUMNS = ("arm", "lr", "run", "val macro AUC", "best epoch", "diverged", "selected")


def lr_sweep_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """Arm × learning rate → validation macro AUC (at each run's best epoch) of every run trained
    for the kept ``runs`` (arm → run of :func:`train_arms`), the kept one marked ``selected``."""
    rows = [{"arm": arm, **row} for arm, run in runs.items()
            for row in run.extra.get("lr_sweep", [])]
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


def arms_table(runs: Mapping[str, RunResult], reference: str,
               classes: Sequence[str]) -> pd.DataFrame:
    """:func:`cxrstudy.tables.ablation_table` of the arms with the learning rate each kept run
    trained with beside its name (``lr``)."""
    table = ablation_table(runs, reference=reference, classes=classes)
    rates = chosen_rates(runs)
    table.insert(1, "lr", [rates.get(arm, np.nan) for arm in table["arm"]])
    return table


def label_efficiency(data: StudyData, out: Outputs, fractions: Sequence[float], arms: Sequence[str],
                     schedule: Schedule | None = None, *,
                     full_runs: Mapping[str, object] | None = None, seed: int = 0,
                     **arm_kwargs) -> pd.DataFrame:
    """Macro AUC (95% CI) of ``arms`` trained on each fraction of the training patients.

    At each fraction the frozen arms sit on a backbone fine-tuned on that same fraction (with
    ``backbone_weights="fine_tune"``), so no arm sees labels beyond its fraction. Runs at 100%
    are taken from ``full_runs`` when given, and every arm (``fine_tune`` under the frozen ones
    too) trains at the learning rate its run in ``full_runs`` was chosen with (no search again;
    the schedule's rate for an arm ``full_runs`` lacks).
    """
    rates = chosen_rates(full_runs or {})
    rows = []
    for fraction in fractions:
        if fraction == 1.0 and full_runs is not None and all(a in full_runs for a in arms):
            runs = {a: full_runs[a] for a in arms}
            subset = data
        else:
            subset = with_training_fraction(data, fraction, seed)
            runs = train_arms(subset, out, arms, schedule, suffix=f"_{fraction:g}", seed=seed,
                              lrs=rates, **arm_kwargs)
        for arm, run in runs.items():
            row = overall_row(run)
            rows.append({"arm": arm, "fraction": fraction, "lr": run.extra.get("lr"),
                         "train images": len(subset.train),
                         "train patients": int(subset.train.records["patient_id"].nunique()),
                         **{column: row[column] for column in ("macro AUC", "macro low", "macro high")}})
    return pd.DataFrame(rows)


# ---- the mechanism on one image ---------------------------------------------------------------
def attention_by_hand(attention: CrossAttention, queries: torch.Tensor, tokens: torch.Tensor
                      ) -> torch.Tensor:
    """A_c = (1/h) Σ_heads softmax(q_{h,c} K_hᵀ / √d_h) written out in float64 from the queries
    [C, d] and tokens [N, d] that enter ``attention`` (its q and k projections applied, the
    softmax as exp over its sum): [C, N], to hold beside what the module returns."""
    def project(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        return x.double() @ layer.weight.detach().double().T + layer.bias.detach().double()

    q, k = project(queries, attention.q), project(tokens, attention.k)
    heads = []
    for head in range(attention.num_heads):
        cols = slice(head * attention.head_dim, (head + 1) * attention.head_dim)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(attention.head_dim)
        weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        heads.append(weights / weights.sum(dim=1, keepdim=True))
    return torch.stack(heads).mean(dim=0)


@torch.no_grad()
def one_image_attention(model: GLoRI, image: torch.Tensor, classes: Sequence[str]) -> dict:
    """GLoRI's class queries attending over the patch tokens of one image [1, H, W], in eval
    mode: the queries X₀ [C, d] and tokens M [N, d] that enter the decoder's cross-attention (a
    forward hook reads them), the module's head-averaged attention A [C, N] and the same
    recomputed by hand (:func:`attention_by_hand`).

    Returns ``queries``, ``tokens``, ``attention`` (the module's), ``grid`` (h, w: N = h·w),
    ``maps`` [C, h, w] (each class's attention scaled to [0, 1], for drawing) and ``table``,
    one row per class: d, N, Σ_n A_cn (1: a distribution over the patches), the largest
    weight and its patch, and max_n |hand − module|."""
    from ...models.attention_maps import minmax_per_image

    model.eval()
    entering = {}
    hook = model.decoder.cross_attention.register_forward_hook(
        lambda module, inputs, output: entering.update(queries=inputs[0][0], tokens=inputs[1][0]))
    try:
        model(image[None].to(next(model.parameters()).device))
    finally:
        hook.remove()
    by_hand = attention_by_hand(model.decoder.cross_attention, entering["queries"],
                                entering["tokens"]).cpu()
    attention = model.last_attention[0].cpu()  # [C, N]
    queries, tokens = entering["queries"].cpu(), entering["tokens"].cpu()
    height, width = model.last_grid
    peak = attention.argmax(dim=1)
    table = pd.DataFrame({
        "class": list(classes), "d": queries.shape[1], "N": tokens.shape[0],
        "grid": f"{height}×{width}", "Σ_n A_cn": attention.double().sum(dim=1).numpy(),
        "max A_cn": attention.max(dim=1).values.double().numpy(),
        "most attended patch": [f"({int(n) // width}, {int(n) % width})" for n in peak],
        "max |hand − module|": (by_hand - attention.double()).abs().max(dim=1).values.numpy()})
    return {"queries": queries, "tokens": tokens, "attention": attention, "grid": (height, width),
            "maps": minmax_per_image(attention.unflatten(-1, (height, width))).numpy(),
            "table": table}


__all__ = ["BUCKETS", "GLORI_LOSSES", "N_BLOCKS", "RATE_TAG", "SWEEP_COLUMNS", "glori_loss",
           "arm_settings", "prevalence_buckets", "bucket_table", "with_training_fraction",
           "save_backbone", "rate_tag", "validation_auc", "select_rate", "arm_rates", "train_arms",
           "chosen_rates", "lr_sweep_table", "arms_table", "label_efficiency",
           "attention_by_hand", "one_image_attention"]
