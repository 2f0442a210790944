"""Descriptive statistics of a dataset's labels and cohort, for the exploration notebook."""
from __future__ import annotations

import numpy as np
import pandas as pd


def prevalence_table(labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Positives, known labels and prevalence per class (unknown labels excluded), sorted."""
    labels = np.asarray(labels, dtype=float)
    known = ~np.isnan(labels)
    positives = np.nansum(labels == 1, axis=0).astype(int)
    n_known = known.sum(axis=0)
    prevalence = np.divide(positives, n_known, out=np.zeros(len(classes)), where=n_known > 0)
    return (pd.DataFrame({"class": classes, "positives": positives, "known": n_known,
                          "prevalence": prevalence})
            .sort_values("prevalence", ascending=False, kind="stable").reset_index(drop=True))


def cooccurrence(labels: np.ndarray, classes: list[str], normalize: bool = True) -> pd.DataFrame:
    """C×C co-occurrence of positive labels.

    With ``normalize`` each row is P(column | row): the share of images positive for the row
    class that are also positive for the column class (the diagonal is 1 where any exist).
    """
    positive = np.nan_to_num(np.asarray(labels, dtype=float), nan=0.0) == 1
    counts = positive.T.astype(np.int64) @ positive.astype(np.int64)
    if normalize:
        diag = np.diag(counts).astype(float)
        counts = np.divide(counts, diag[:, None], out=np.zeros(counts.shape), where=diag[:, None] > 0)
    return pd.DataFrame(counts, index=classes, columns=classes)


def labels_per_image(labels: np.ndarray) -> pd.Series:
    """How many images carry 0, 1, 2, ... positive findings."""
    n = (np.nan_to_num(np.asarray(labels, dtype=float), nan=0.0) == 1).sum(axis=1)
    return pd.Series(n).value_counts().sort_index().rename_axis("findings").rename("images")


def cohort_summary(records: pd.DataFrame) -> pd.DataFrame:
    """Images, patients, images per patient, age, sex and view mix as a two-column table."""
    per_patient = records.groupby("patient_id").size()
    age = pd.to_numeric(records["age"], errors="coerce")
    rows = [("images", len(records)), ("patients", records["patient_id"].nunique()),
            ("images per patient (mean)", round(float(per_patient.mean()), 2)),
            ("images per patient (max)", int(per_patient.max())),
            ("age median [IQR]", f"{age.median():.0f} [{age.quantile(.25):.0f}–{age.quantile(.75):.0f}]"
             if age.notna().any() else "n/a")]
    for column in ("sex", "view"):
        counts = records[column].fillna("unknown").value_counts()
        rows += [(f"{column} {k}", int(v)) for k, v in counts.items()]
    return pd.DataFrame(rows, columns=["quantity", "value"]).astype({"value": str})


def images_per_patient(records: pd.DataFrame) -> pd.Series:
    return (records.groupby("patient_id").size().value_counts().sort_index()
            .rename_axis("images per patient").rename("patients"))


def gallery_picks(dataset, per_class: int, seed: int = 0) -> list[tuple[int, str]]:
    """Up to ``per_class`` (row, class) pairs per class, images with a box of that class first."""
    rng = np.random.default_rng(seed)
    ids = dataset.records["image_id"].to_numpy()
    picks: list[tuple[int, str]] = []
    for c, name in enumerate(dataset.classes):
        positive = np.flatnonzero(dataset.labels[:, c] == 1)
        if len(positive) == 0 or per_class <= 0:
            continue
        boxed_ids = set(dataset.boxes.loc[dataset.boxes["label"] == name, "image_id"]) if len(dataset.boxes) else set()
        with_box = [i for i in positive if ids[i] in boxed_ids]
        rest = [i for i in rng.permutation(positive) if ids[i] not in boxed_ids]
        picks += [(int(i), name) for i in (with_box + rest)[:per_class]]
    return picks


def boxed_first(dataset, n: int) -> list[int]:
    """``n`` rows of ``dataset``, images with annotated boxes first (in row order), then the rest."""
    ids = dataset.records["image_id"].to_numpy()
    boxed = np.isin(ids, dataset.boxes["image_id"].to_numpy()) if len(dataset.boxes) else \
        np.zeros(len(ids), dtype=bool)
    order = np.concatenate([np.flatnonzero(boxed), np.flatnonzero(~boxed)])
    return [int(i) for i in order[:max(int(n), 0)]]


def box_image(dataset, which: str = "smallest") -> int:
    """Row of the image with the smallest (or largest) annotated box; 0 when there are no boxes."""
    if len(dataset.boxes) == 0:
        return 0
    boxes = dataset.boxes[dataset.boxes["image_id"].isin(dataset.records["image_id"])]
    if len(boxes) == 0:
        return 0
    area = (boxes["w"] * boxes["h"]) / (boxes["space_w"] * boxes["space_h"])
    image_id = boxes.loc[area.idxmin() if which == "smallest" else area.idxmax(), "image_id"]
    rows = np.flatnonzero(dataset.records["image_id"].to_numpy() == image_id)
    return int(rows[0]) if len(rows) else 0


def packaged_label_dir():
    """torchxrayvision's folder of the full releases' label files (no images)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchxrayvision is not installed; it ships the full releases' label files")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def packaged_label_overview() -> dict[str, pd.DataFrame]:
    """Cohort and prevalence of the full NIH, CheXpert (train, frontal) and VinDr (Kaggle) releases.

    Read through the study's own adapters in ``labels_only`` mode, so the counts are what a full
    run would see. CheXpert's uncertain labels are counted as unknown here (``ignore``).
    """
    from .data.chexpert import CheXpertDataset
    from .data.nih import NIHDataset
    from .data.vindr import VinDrDataset

    folder = packaged_label_dir()
    datasets = {
        "nih": NIHDataset(root=folder, labels_only=True, views=None),
        "chexpert": CheXpertDataset(csv_path=folder / "chexpert_train.csv.gz", labels_only=True,
                                    uncertainty="ignore"),
        "vindr": VinDrDataset(csv_path=folder / "vinbigdata-train.csv.gz", labels_only=True,
                              aggregate="any"),
    }
    cohorts, prevalences = [], []
    for name, ds in datasets.items():
        cohorts.append({"dataset": name, "images": len(ds), "patients": int(ds.records["patient_id"].nunique()),
                        "classes": ds.num_classes, "boxes": len(ds.boxes),
                        "unknown labels (%)": round(100 * float(np.isnan(ds.labels).mean()), 1)})
        table = prevalence_table(ds.labels, ds.classes)
        table.insert(0, "dataset", name)
        prevalences.append(table)
    return {"cohorts": pd.DataFrame(cohorts), "prevalence": pd.concat(prevalences, ignore_index=True)}
