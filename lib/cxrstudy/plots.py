"""Figures every notebook shares: one function per figure, each returning a matplotlib Figure."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from .display import ci_columns

BOX_COLOUR = "#ff3b30"


def prevalence_bars(table: pd.DataFrame, title: str = "Label prevalence") -> plt.Figure:
    """Horizontal bars of ``prevalence`` per ``class`` (from :func:`explore.prevalence_table`)."""
    fig, ax = plt.subplots(figsize=(6, 0.32 * len(table) + 1))
    ordered = table.sort_values("prevalence")
    ax.barh(ordered["class"], ordered["prevalence"], color="#3a6ea5")
    for y, (p, n) in enumerate(zip(ordered["prevalence"], ordered["positives"])):
        ax.text(p, y, f" {n}", va="center", fontsize=8)
    ax.set_xlabel("prevalence among known labels (count of positives at bar end)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def cooccurrence_heatmap(matrix: pd.DataFrame, title: str = "P(column | row)") -> plt.Figure:
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(0.5 * len(matrix) + 2, 0.45 * len(matrix) + 1.5))
    sns.heatmap(matrix, ax=ax, cmap="viridis", vmin=0, vmax=1, square=True,
                cbar_kws={"shrink": 0.7}, annot=len(matrix) <= 15, fmt=".2f", annot_kws={"size": 6})
    ax.set_title(title)
    fig.tight_layout()
    return fig


def cohort_panels(records: pd.DataFrame) -> plt.Figure:
    """Age histogram, sex and view counts, images per patient — the cohort at a glance."""
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    age = pd.to_numeric(records["age"], errors="coerce").dropna()
    axes[0].hist(age, bins=20, color="#3a6ea5")
    axes[0].set_title("age (years)")
    for ax, column in zip(axes[1:3], ("sex", "view")):
        counts = records[column].fillna("unknown").value_counts()
        ax.bar(counts.index.astype(str), counts.values, color="#6a9f58")
        ax.set_title(column)
    per_patient = records.groupby("patient_id").size().value_counts().sort_index()
    axes[3].bar(per_patient.index.astype(str), per_patient.values, color="#b5651d")
    axes[3].set_title("images per patient")
    fig.tight_layout()
    return fig


def draw_boxes(ax, boxes: Sequence[Mapping], colour: str = BOX_COLOUR, label: bool = True) -> None:
    for box in boxes:
        ax.add_patch(Rectangle((box["x"], box["y"]), box["w"], box["h"], fill=False,
                               edgecolor=colour, linewidth=1.5))
        if label:
            ax.text(box["x"], box["y"] - 1, box["label"], color=colour, fontsize=6, va="bottom")


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str],
               boxes: Sequence[Sequence[Mapping]] | None = None, ncols: int = 6,
               size: float = 2.0) -> plt.Figure:
    """Grayscale images in a grid, with optional boxes (in each image's pixel units)."""
    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
        ax.set_title(titles[k], fontsize=7)
        if boxes is not None:
            draw_boxes(ax, boxes[k])
    fig.tight_layout()
    return fig


def resolution_strip(images: Mapping[int, np.ndarray], title: str = "",
                     boxes: Mapping[int, Sequence[Mapping]] | None = None) -> plt.Figure:
    """The same image at each resolution, shown at the same display size (boxes per size)."""
    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.9))
    for ax, (size, image) in zip(np.atleast_1d(axes), sorted(images.items())):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if boxes and size in boxes:
            draw_boxes(ax, boxes[size], label=False)
        ax.set_title(f"{size}×{size} px", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def training_curves(histories: Mapping[str, pd.DataFrame]) -> plt.Figure:
    """Train/validation loss and validation macro AUC per epoch, one line per model."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, history in histories.items():
        line, = axes[0].plot(history["epoch"], history["train_loss"], marker="o", label=f"{name} train")
        if "val_loss" in history and history["val_loss"].notna().any():
            axes[0].plot(history["epoch"], history["val_loss"], marker="x", linestyle="--",
                         color=line.get_color(), label=f"{name} val")
        if "val_macro_auc" in history:
            axes[1].plot(history["epoch"], history["val_macro_auc"], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="masked BCE", title="loss")
    axes[1].set(xlabel="epoch", ylabel="macro ROC-AUC", title="validation AUC")
    axes[1].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def roc_curves(y_true: np.ndarray, scores: Mapping[str, np.ndarray], classes: Sequence[str],
               mask: np.ndarray | None = None, ncols: int = 5) -> plt.Figure:
    """Per-class ROC curves, one panel per class, one line per model (known labels only); each
    panel's legend gives every model's AUC, the outer panels the axis names."""
    from sklearn.metrics import roc_auc_score, roc_curve

    mask = np.ones_like(y_true, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    ncols = max(1, min(ncols, len(classes)))
    nrows = int(np.ceil(len(classes) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.0 * nrows), squeeze=False)
    for c, ax in enumerate(axes.flat):
        if c >= len(classes):
            ax.axis("off")
            continue
        known = mask[:, c]
        truth = y_true[known, c]
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
        if truth.min(initial=1) == truth.max(initial=0):
            ax.text(0.5, 0.5, "one class only:\nAUC undefined", ha="center", va="center", fontsize=8)
        else:
            for name, score in scores.items():
                fpr, tpr, _ = roc_curve(truth, score[known, c])
                auc = roc_auc_score(truth, score[known, c])
                ax.plot(fpr, tpr, linewidth=1, label=f"{name} ({auc:.2f})")
            ax.legend(fontsize=6, loc="lower right", title="AUC", title_fontsize=6)
        ax.set_title(f"{classes[c]} (n+={int(truth.sum())})", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=7)
        if c // ncols == nrows - 1 or c + ncols >= len(classes):
            ax.set_xlabel("false positive rate", fontsize=8)
        if c % ncols == 0:
            ax.set_ylabel("true positive rate", fontsize=8)
    fig.tight_layout()
    return fig


def auc_forest(per_class: Mapping[str, pd.DataFrame], title: str = "Per-class ROC-AUC, 95% CI") -> plt.Figure:
    """Per-class AUC with bootstrap CIs, models side by side (rows: classes)."""
    names = list(per_class)
    classes = list(next(iter(per_class.values()))["class"])
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(classes) + 1.2))
    offsets = np.linspace(-0.2, 0.2, len(names)) if len(names) > 1 else [0.0]
    for offset, name in zip(offsets, names):
        table = per_class[name].set_index("class").reindex(classes)
        y = np.arange(len(classes)) + offset
        err = np.vstack([table["auc"] - table["auc_low"], table["auc_high"] - table["auc"]])
        ax.errorbar(table["auc"], y, xerr=np.nan_to_num(err), fmt="o", markersize=3, capsize=2,
                    label=name)
    ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yticks(np.arange(len(classes)), classes, fontsize=8)
    ax.set_xlabel("ROC-AUC")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def normalised_box_grid(images: Sequence[np.ndarray], boxes: Mapping[str, np.ndarray],
                        titles: Sequence[str], truth: Sequence[Sequence[Mapping]] | None = None,
                        ncols: int = 4, size: float = 2.4) -> plt.Figure:
    """Images with predicted boxes ``boxes[name][k] = (x1, y1, x2, y2)`` in [0, 1], one colour
    per name (e.g. per MXA block), and optional ground-truth boxes in pixel units."""
    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.6),
                             squeeze=False)
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, max(len(boxes), 1)))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        image = images[k]
        height, width = image.shape[:2]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(titles[k], fontsize=7)
        for colour, (name, block_boxes) in zip(colours, boxes.items()):
            x1, y1, x2, y2 = block_boxes[k]
            ax.add_patch(Rectangle((x1 * width, y1 * height), (x2 - x1) * width,
                                   (y2 - y1) * height, fill=False, edgecolor=colour,
                                   linewidth=1.2, label=name if k == 0 else None))
        if truth is not None:
            draw_boxes(ax, truth[k])
    if boxes:
        fig.legend(loc="lower center", ncol=min(len(boxes), 4), fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def metric_bars(table: pd.DataFrame, label: str, value: str = "macro AUC",
                low: str | None = None, high: str | None = None, title: str = "") -> plt.Figure:
    """Horizontal bars of ``value`` per ``label``, its 95% CI as error bars (none where a CI is
    missing) from the columns ``low``/``high``, by default ``value``'s (:func:`ci_columns`)."""
    low, high = (low, high) if low and high else ci_columns(value)
    v, lo, hi = (table[column].astype(float).to_numpy() for column in (value, low, high))
    err = np.vstack([v - lo, hi - v])
    fig, ax = plt.subplots(figsize=(5.5, 0.4 * len(table) + 1.0))
    y = np.arange(len(table))
    ax.barh(y, v, xerr=np.nan_to_num(err), color="#4c72b0", capsize=3)
    ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yticks(y, table[label], fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(value)
    ax.set_title(title or f"{value} with 95% CI")
    fig.tight_layout()
    return fig


def auc_vs_resolution(table: pd.DataFrame, value: str = "macro AUC", low: str | None = None,
                      high: str | None = None, title: str = "", x: str = "resolution",
                      xlabel: str = "image size (px)") -> plt.Figure:
    """One line per arm: ``value`` against ``x`` (log scale; image size, or the share of
    training data), 95% CI as error bars (``low``/``high``, by default ``value``'s columns)."""
    low, high = (low, high) if low and high else ci_columns(value)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm, rows in table.groupby("arm", sort=False):
        rows = rows.sort_values(x)
        err = np.vstack([rows[value] - rows[low], rows[high] - rows[value]])
        ax.errorbar(rows[x], rows[value], yerr=np.nan_to_num(err), marker="o",
                    markersize=4, capsize=3, label=arm)
    ticks = sorted(table[x].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(value)
    ax.set_title(title or f"{value} (95% CI) against {xlabel}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _overlay_grid(images: Sequence[np.ndarray], maps: Mapping[str, np.ndarray],
                  titles: Sequence[str] | None, alpha: float, size: float,
                  boxes: Sequence[Sequence[Mapping]] | None, max_columns: int):
    """The figure of :func:`map_overlays` and the axes holding each plain image."""
    n = len(images)
    panels = 1 + len(maps)  # per image: the image, then one overlay per set of maps
    ncols = max(1, min(panels, max_columns))
    block = int(np.ceil(panels / ncols))  # grid rows per image
    fig, axes = plt.subplots(max(n, 1) * block, ncols, figsize=(size * ncols, size * max(n, 1) * block + 0.2),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    image_axes = []
    for k in range(n):
        height, width = images[k].shape[:2]
        cells = [axes[k * block + j // ncols, j % ncols] for j in range(panels)]
        cells[0].imshow(images[k], cmap="gray", vmin=0, vmax=255)
        cells[0].set_title(titles[k] if titles is not None else "", fontsize=7)
        image_axes.append(cells[0])
        for ax, (name, stack) in zip(cells[1:], maps.items()):
            ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
            ax.imshow(stack[k], cmap="jet", alpha=alpha, vmin=0, vmax=1,
                      extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear")
            ax.set_title(name, fontsize=7)
        for j, ax in enumerate(cells):
            ax.set_frame_on(True)
            if boxes is not None:
                draw_boxes(ax, boxes[k], label=j == 0)
    fig.tight_layout()
    return fig, image_axes


def map_overlays(images: Sequence[np.ndarray], maps: Mapping[str, np.ndarray],
                 titles: Sequence[str] | None = None, alpha: float = 0.45,
                 size: float = 2.0, boxes: Sequence[Sequence[Mapping]] | None = None,
                 max_columns: int = 6) -> plt.Figure:
    """Per image, the image and then each named set of maps [N, h, w] in [0, 1] stretched over
    it (the set's name above its panel), wrapped after ``max_columns`` panels so that many
    models make a grid rather than a long strip; ``boxes`` (per image, pixel units) are drawn
    on every panel of that image."""
    return _overlay_grid(images, maps, titles, alpha, size, boxes, max_columns)[0]


def maps_with_predicted_boxes(images: Sequence[np.ndarray], maps: Mapping[str, np.ndarray],
                              titles: Sequence[str] | None = None,
                              boxes: Sequence[Sequence[Mapping]] | None = None,
                              predicted: Mapping[str, np.ndarray] | None = None,
                              size: float = 2.0, max_columns: int = 6) -> plt.Figure:
    """:func:`map_overlays` with, on each plain image, each named set of predicted boxes
    ``predicted[name][k] = (x1, y1, x2, y2)`` in [0, 1] (dashed, one colour per name; NaN rows
    are skipped), e.g. MXA's ROI boxes beside the CAMs."""
    fig, image_axes = _overlay_grid(images, maps, titles, 0.45, size, boxes, max_columns)
    predicted = dict(predicted or {})
    colours = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, max(len(predicted), 1)))
    for k, ax in enumerate(image_axes):
        height, width = images[k].shape[:2]
        for colour, (name, found) in zip(colours, predicted.items()):
            x1, y1, x2, y2 = (float(v) for v in found[k])
            if not np.isfinite([x1, y1, x2, y2]).all():
                continue
            ax.add_patch(Rectangle((x1 * width - 0.5, y1 * height - 0.5), (x2 - x1) * width,
                                   (y2 - y1) * height, fill=False, edgecolor=colour,
                                   linestyle="--", linewidth=1.2, label=name if k == 0 else None))
    if predicted:
        fig.legend(loc="lower center", ncol=min(len(predicted), 3), fontsize=6, frameon=False)
        fig.subplots_adjust(bottom=0.12)
    return fig


def localization_heatmap(table: pd.DataFrame, value: str = "hit rate", row: str = "model",
                         column: str = "method", count: str = "boxes",
                         title: str = "") -> plt.Figure:
    """``value`` per ``row`` × ``column`` (e.g. pointing-game hit rate per model and method),
    each cell annotated with the value and the number of boxes it rests on."""
    pivot = table.pivot_table(index=row, columns=column, values=value, aggfunc="mean", sort=False)
    counts = table.pivot_table(index=row, columns=column, values=count, aggfunc="sum", sort=False)
    fig, ax = plt.subplots(figsize=(1.3 * max(len(pivot.columns), 1) + 3,
                                    0.32 * max(len(pivot), 1) + 1.4))
    image = ax.imshow(pivot.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(len(pivot)):
        for j in range(len(pivot.columns)):
            v = pivot.iat[i, j]
            n = counts.reindex(index=pivot.index, columns=pivot.columns).iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f} (n={int(n)})", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 else "black")
    ax.set_xticks(np.arange(len(pivot.columns)), pivot.columns, fontsize=7, rotation=30, ha="right")
    ax.set_yticks(np.arange(len(pivot)), pivot.index, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8, label=value)
    ax.set_title(title or f"{value} per {row} and {column} (n = boxes)", fontsize=9)
    fig.tight_layout()
    return fig
