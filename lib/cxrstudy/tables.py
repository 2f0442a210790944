"""The study's result tables, all built on one numeric row per trained run.

A run's test metrics come from :func:`cxrstudy.metrics.summarize`; :func:`overall_row` turns
them into one flat row (AUCs with their patient-bootstrap 95% CIs as *numbers*), and every
table here — the comparison of models, the ablation of arms, the per-class AUCs — picks its
columns from it. CIs stay numeric in tables, CSVs and ``metrics.json``: the interval of a value
column ``"<name> AUC"`` is the pair ``"<name> low"``, ``"<name> high"``. Only what a person
reads — the Markdown tables, the report, a printed sentence — joins them into
``0.650 (0.610–0.700)``, with :mod:`cxrstudy.display` (the one formatter).

The ablation table (:func:`ablation_table`) adds two DeLong readings of "is this arm different
from the reference":

* ``DeLong p (micro)`` — DeLong's test on the pooled (image, class) pairs that define the
  micro AUC (:func:`cxrstudy.metrics.pooled_delong_p`; optimistic, there because the MXA paper
  reports the micro AUC);
* ``better``/``worse`` — classes whose own DeLong test (p < 0.05, uncorrected) favours the arm
  or the reference (:func:`cxrstudy.metrics.compare_models`);

and ``collapsed`` — classes whose test scores are all the same (AUC exactly 0.5,
:func:`cxrstudy.metrics.constant_score_classes`): the failure the MXA paper's baseline showed,
made visible instead of hidden in a mean. A column of a paper's own numbers can be added; it is
labelled and kept apart from ours.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .display import ci_columns, format_ci
from .metrics import compare_models, constant_score_classes, pooled_delong_p

if TYPE_CHECKING:  # the types in signatures only (experiment imports torch)
    from .experiment import RunResult, StudyData
    from .outputs import Outputs

#: Our overall AUCs with their 95% CIs, in the order every table shows them.
AUC_COLUMNS = ("macro AUC", "macro low", "macro high", "micro AUC", "micro low", "micro high")


# --- one row per run ----------------------------------------------------------------------

def auc_columns(overall: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`AUC_COLUMNS` from an ``overall`` dict of :func:`cxrstudy.metrics.summarize` (as a
    run holds it, or as ``metrics.json`` recorded it)."""
    keys = ("macro_auc", "macro_auc_low", "macro_auc_high",
            "micro_auc", "micro_auc_low", "micro_auc_high")
    return {column: overall.get(key) for column, key in zip(AUC_COLUMNS, keys)}


def epochs_trained(run: RunResult) -> int:
    return int(run.history["epoch"].max()) if len(run.history) else 0


def overall_row(run: RunResult, label: str = "model") -> dict[str, Any]:
    """One run as a flat row of numbers: ``label`` (the run's tag), size, macro and micro AUC
    each with its 95% CI low and high, macro AP, epochs trained, best epoch, training seconds."""
    return {label: run.tag, "params (M)": run.n_params / 1e6, **auc_columns(run.overall),
            "macro AP": run.overall.get("macro_ap"), "epochs": epochs_trained(run),
            "best epoch": run.extra.get("best_epoch"), "train s": round(run.train_seconds, 1)}


def run_metrics(runs: Mapping[str, RunResult]) -> dict[str, dict[str, Any]]:
    """What ``metrics.json`` records of each run: overall metrics with CIs, per-class AUC, size,
    epochs trained, best epoch and training time (tests and the report read these keys)."""
    return {tag: {"overall": run.overall,
                  "per_class_auc": dict(zip(run.per_class["class"], run.per_class["auc"])),
                  "params": run.n_params,
                  "epochs_trained": epochs_trained(run),
                  "best_epoch": run.extra.get("best_epoch"),
                  "train_seconds": run.train_seconds}
            for tag, run in runs.items()}


def best_run_sentence(runs: Mapping[Any, RunResult], data: StudyData) -> str:
    """One line naming the best macro AUC with its CI and the size of the test set."""
    def key(run):
        return -1.0 if run.overall.get("macro_auc") is None else run.overall["macro_auc"]
    best = max(runs.values(), key=key)
    o = best.overall
    if o.get("macro_auc") is None:
        return f"No model has a defined macro AUC on {len(data.test)} test images."
    auc = format_ci(o["macro_auc"], o.get("macro_auc_low"), o.get("macro_auc_high"), label="95% CI ")
    return (f"Best macro AUC: {best.tag} {auc} on {len(data.test)} test images from "
            f"{data.test.records['patient_id'].nunique()} patients.")


# --- the tables -----------------------------------------------------------------------------

def comparison_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """One :func:`overall_row` per run."""
    return pd.DataFrame([overall_row(run) for run in runs.values()])


def per_class_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """Classes as rows: positives and negatives in the test split, then for each model its AUC
    and 95% CI (``<tag> AUC``, ``<tag> low``, ``<tag> high``)."""
    first = next(iter(runs.values())).per_class
    table = first[["class", "n_pos", "n_neg"]].copy()
    for tag, run in runs.items():
        pc = run.per_class.set_index("class").reindex(table["class"])
        low, high = ci_columns(f"{tag} AUC")
        table[f"{tag} AUC"] = pc["auc"].to_numpy()
        table[low] = pc["auc_low"].to_numpy()
        table[high] = pc["auc_high"].to_numpy()
    return table


#: The columns of an ablation row taken from :func:`overall_row`, in the table's order.
_ABLATION_COLUMNS = ("arm", "params (M)", "micro AUC", "micro low", "micro high",
                     "macro AUC", "macro low", "macro high")


def ablation_table(runs: Mapping[str, RunResult], reference: str, classes: Sequence[str],
                   paper: Mapping[str, float] | None = None,
                   paper_label: str = "paper (reported)") -> pd.DataFrame:
    """One row per arm (``runs``: arm → run): micro and macro AUC with 95% CIs, the macro
    difference to ``reference``, DeLong against it and collapsed classes (see the module doc).

    All runs must hold predictions for the same test images in the same order.
    """
    if reference not in runs:
        raise KeyError(f"reference arm {reference!r} is not among {list(runs)}")
    ref = runs[reference]
    for tag, run in runs.items():
        if run.targets.shape != ref.targets.shape or not np.array_equal(run.targets, ref.targets):
            raise ValueError(f"arm {tag!r} was tested on other images than {reference!r}")
    per_class_tests = compare_models(ref.targets, {k: r.probs for k, r in runs.items()},
                                     reference=reference, mask=ref.masks,
                                     classes=classes).set_index("model")
    rows = []
    for tag, run in runs.items():
        overall = dict(overall_row(run, label="arm"), arm=tag)
        row = {column: overall[column] for column in _ABLATION_COLUMNS}
        row.update({
            "Δ macro": per_class_tests.loc[tag, "macro_auc_diff"],
            "DeLong p (micro)": np.nan if tag == reference else pooled_delong_p(
                ref.targets, run.probs, ref.probs, ref.masks),
            "better": int(per_class_tests.loc[tag, "n_better"]),
            "worse": int(per_class_tests.loc[tag, "n_worse"]),
            "collapsed": len(constant_score_classes(run.probs, classes, run.masks)),
        })
        if paper is not None:
            row[paper_label] = paper.get(tag, np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


# --- what the notebooks call once -----------------------------------------------------------

def save_per_class(out: Outputs, runs: Mapping[str, RunResult], dataset: str) -> pd.DataFrame:
    """The per-class AUC table and its forest plot (``per_class_auc``), for every run."""
    from . import plots

    table = per_class_table(runs)
    out.save_table(table, "per_class_auc",
                   caption=f"Per-class ROC-AUC (95% patient-bootstrap CI) of every model, {dataset} test split")
    out.save_figure(plots.auc_forest({k: r.per_class for k, r in runs.items()}), "per_class_auc",
                    caption=f"Per-class test AUC of every model, {dataset} test split; "
                    "error bars: patient-bootstrap 95% CI")
    return table


def reference_arm(runs: Mapping[Any, RunResult], preferred: Any) -> Any:
    """The run :func:`ablation_table` tests every other against: ``preferred`` (the notebook
    names it and says why: 05 the linear probe, 06 one network alone) when it ran, else the first
    run, so a profile that leaves it out still gets its table."""
    return preferred if preferred in runs else next(iter(runs))


def save_results(out: Outputs, runs: Mapping[Any, RunResult], data: StudyData,
                 **entries: Any) -> None:
    """Write ``entries`` and every run's metrics (:func:`run_metrics`, unless ``models`` is
    given) to ``metrics.json``, then print the best-run sentence."""
    entries.setdefault("models", run_metrics(runs))
    out.save_metrics(**entries)
    print(best_run_sentence(runs, data))


__all__ = ["AUC_COLUMNS", "ablation_table", "auc_columns", "best_run_sentence", "comparison_table",
           "epochs_trained", "overall_row", "per_class_table", "reference_arm", "run_metrics", "save_per_class",
           "save_results"]
