"""Patient-level train/val/test splits.

Images of one patient are strongly correlated (same anatomy, often the same finding on
follow-ups), so a split by image leaks patients between train and test and inflates test
AUC. Every split here is by patient: all images of a patient land in one split.

When the release ships an official split (``records["official_split"]``: NIH
train_val_list.txt/test_list.txt, CheXpert train/valid, VinDr train/test, MedMNIST
train/val/test) it is used as is; a validation set is carved from the official training
patients only when the release has none. Otherwise a split is drawn from the sorted patient
ids with a seeded permutation, so it depends only on (patient ids, seed, fractions).

Whatever builds a split (official lists, a seeded draw, a loaded table) ends in
:func:`require_disjoint_patients`: an official list that puts one patient in two splits is a
leak like any other and is refused, naming the patients.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..files import atomic_path

SPLIT_NAMES = ("train", "val", "test")


class PatientLeakError(ValueError):
    """A patient has images in two splits: its test AUC would be measured on anatomy it trained on."""


def shared_patients(patient_ids, assignment) -> dict[str, list[str]]:
    """Patient id -> the sorted splits it appears in, for every patient in more than one."""
    pairs = pd.DataFrame({"patient": np.asarray(patient_ids).astype(str),
                          "split": np.asarray(assignment, dtype=object).astype(str)})
    pairs = pairs.drop_duplicates()
    leaking = pairs[pairs["patient"].duplicated(keep=False)]
    return {str(patient): sorted(splits) for patient, splits
            in leaking.groupby("patient", sort=True)["split"]}


def describe_leak(shared: dict[str, list[str]], source: str, shown: int = 5) -> str:
    """One line naming the count and the first few shared patients with their splits."""
    examples = ", ".join(f"{p} ({'/'.join(s)})" for p, s in list(shared.items())[:shown])
    more = f" and {len(shared) - shown} more" if len(shared) > shown else ""
    return (f"{source}: {len(shared)} patients have images in more than one split "
            f"(patient leakage): {examples}{more}")


def require_disjoint_patients(patient_ids, assignment, source: str) -> None:
    """Refuse a split in which any patient lands in two splits (:class:`PatientLeakError`)."""
    shared = shared_patients(patient_ids, assignment)
    if shared:
        raise PatientLeakError(describe_leak(shared, source))


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError(f"val_fraction and test_fraction must lie in [0, 1), got "
                         f"{val_fraction} and {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must leave patients for training, got "
                         f"{val_fraction} + {test_fraction} >= 1")


def _count(fraction: float, n_patients: int) -> int:
    """Patients for a split of this fraction: at least one whenever the fraction is positive."""
    return 0 if fraction == 0 else max(1, int(round(fraction * n_patients)))


def _shuffled_patients(patient_ids: np.ndarray, seed: int) -> np.ndarray:
    """Unique patient ids, sorted (so row order does not matter), then permuted by ``seed``."""
    unique = np.unique(patient_ids.astype(str))
    return unique[np.random.default_rng(seed).permutation(len(unique))]


def _patient_split(patient_ids: np.ndarray, seed: int, val_fraction: float,
                   test_fraction: float) -> np.ndarray:
    order = _shuffled_patients(patient_ids, seed)
    n = len(order)
    n_test, n_val = _count(test_fraction, n), _count(val_fraction, n)
    needed = 1 + (n_test > 0) + (n_val > 0)
    if n < needed:
        raise ValueError(f"a patient-level train/val/test split needs at least {needed} patients "
                         f"(one per non-empty split), found {n}")
    # Rounding up tiny fractions must never empty the training split.
    while n - n_test - n_val < 1:
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    which = {pid: "test" for pid in order[:n_test]}
    which.update({pid: "val" for pid in order[n_test:n_test + n_val]})
    return np.array([which.get(pid, "train") for pid in patient_ids.astype(str)], dtype=object)


def assign_splits(dataset, seed: int = 0, val_fraction: float = 0.1,
                  test_fraction: float = 0.2) -> np.ndarray:
    """``"train"``/``"val"``/``"test"`` for each row of ``dataset.records``, by patient.

    With an ``official_split`` column its "test" (and "val", when present) rows are kept;
    if it has no "val", ``val_fraction`` of the official training *patients* become val and
    ``test_fraction`` is unused. Without one, ``test_fraction`` and ``val_fraction`` of all
    patients go to test and val (at least one patient each when positive). Deterministic for a
    seed; a clear error when there are too few patients for a non-empty split each.
    """
    _check_fractions(val_fraction, test_fraction)
    assignment = _assign(dataset, seed, val_fraction, test_fraction)
    kind = "official" if "official_split" in dataset.records.columns else "seeded"
    require_disjoint_patients(dataset.records["patient_id"], assignment,
                              f"{getattr(dataset, 'name', 'dataset')}: the {kind} split")
    return assignment


def _assign(dataset, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    records = dataset.records
    patients = records["patient_id"].astype(str).to_numpy()
    if len(patients) == 0:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: no records to split")
    if "official_split" not in records.columns:
        return _patient_split(patients, seed, val_fraction, test_fraction)

    official = records["official_split"]
    unknown = sorted({str(v) for v in official.unique() if v not in SPLIT_NAMES})
    if unknown:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: official_split has values "
                         f"{unknown}; expected only {SPLIT_NAMES}")
    assignment = official.to_numpy(dtype=object).copy()
    is_train = assignment == "train"
    if (assignment == "val").any() or val_fraction == 0 or not is_train.any():
        return assignment
    train_patients = patients[is_train]
    if len(np.unique(train_patients)) < 2:
        raise ValueError("carving a validation split from the official training split needs at "
                         f"least 2 training patients, found {len(np.unique(train_patients))}")
    assignment[is_train] = _patient_split(train_patients, seed, val_fraction, 0.0)
    return assignment


def save_splits(dataset, assignment, path, overwrite: bool = False) -> Path:
    """Write ``image_id,patient_id,split`` (one row per image) so a split can be frozen/shared."""
    path = Path(path)
    assignment = np.asarray(assignment, dtype=object)
    if len(assignment) != len(dataset.records):
        raise ValueError(f"assignment has {len(assignment)} entries for "
                         f"{len(dataset.records)} records")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"image_id": dataset.records["image_id"].astype(str).to_numpy(),
                          "patient_id": dataset.records["patient_id"].astype(str).to_numpy(),
                          "split": assignment})
    with atomic_path(path) as temp:
        table.to_csv(temp, index=False)
    return path


def load_splits(path) -> pd.DataFrame:
    """Read a file written by :func:`save_splits`, checking its columns and split names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("image_id", "patient_id", "split") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (have {list(table.columns)})")
    bad = table.index[~table["split"].isin(SPLIT_NAMES)]
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"{path}: line {row + 2} has split {table.at[row, 'split']!r}; "
                         f"expected one of {SPLIT_NAMES}")
    return table[["image_id", "patient_id", "split"]]


def align_splits(dataset, table: pd.DataFrame) -> np.ndarray:
    """The split of each ``dataset.records`` row, looked up by image id in a loaded table."""
    lookup = pd.Series(table["split"].to_numpy(), index=table["image_id"].astype(str))
    if lookup.index.has_duplicates:
        dup = lookup.index[lookup.index.duplicated()][0]
        raise ValueError(f"split table lists image {dup!r} more than once")
    ids = dataset.records["image_id"].astype(str)
    missing = ids[~ids.isin(lookup.index)]
    if len(missing):
        raise KeyError(f"{len(missing)} images have no split in the table, e.g. "
                       f"{missing.iloc[:3].tolist()}")
    assignment = lookup.reindex(ids).to_numpy(dtype=object)
    require_disjoint_patients(dataset.records["patient_id"], assignment, "the split table")
    return assignment


def subsample_patients(dataset, max_images: int, seed: int,
                       assignment: np.ndarray | None = None) -> np.ndarray:
    """Row indices of whole patients, about ``max_images`` rows, in a seeded draw.

    With ``assignment`` the draw is made within each split in proportion to its size, so the
    subsample keeps the train/val/test ratio. The draw uses its own random stream: reusing the
    split's stream would select the same patients the split put first (all of test, say).
    """
    patients = dataset.records["patient_id"].to_numpy().astype(str)
    groups = np.full(len(patients), "all", dtype=object) if assignment is None else np.asarray(assignment)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5AB5A3]))
    fraction = min(1.0, max_images / max(len(patients), 1))
    chosen: list[np.ndarray] = []
    for group in sorted(set(groups)):
        rows = np.flatnonzero(groups == group)
        target = max(1, int(round(fraction * len(rows))))
        order = rng.permutation(np.unique(patients[rows]))
        counts = pd.Series(patients[rows]).value_counts()
        taken = np.cumsum(counts.reindex(order).to_numpy())
        keep_patients = set(order[: int(np.searchsorted(taken, target)) + 1])
        chosen.append(rows[np.isin(patients[rows], list(keep_patients))])
    return np.sort(np.concatenate(chosen))


def subsample_dataset(dataset, max_images: int | None, seed: int):
    """``dataset`` (loaded with ``split="all"``) cut to about ``max_images`` images of whole
    patients, each split in proportion (:func:`subsample_patients`); as is when ``max_images``
    is None or not smaller. The subset's ``split_assignment`` follows its rows."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    assignment = np.asarray(dataset.split_assignment)
    keep = subsample_patients(dataset, int(max_images), seed, assignment)
    subset = dataset.subset(keep, split_name="all")
    subset.split_assignment = assignment[keep]
    return subset


__all__ = ["SPLIT_NAMES", "PatientLeakError", "shared_patients", "describe_leak",
           "require_disjoint_patients", "assign_splits", "save_splits", "load_splits", "align_splits",
           "subsample_patients", "subsample_dataset"]
