"""Class names of each release, and one spelling-insensitive key to match them across datasets.

Each release spells the same finding its own way ("Pleural_Thickening" in NIH, "Pleural
thickening" in VinDr, "Pleural Effusion" in CheXpert vs "Effusion" in NIH, "Infiltrate" in the
NIH box file). Cross-dataset evaluation needs one key per finding, so :func:`canonical` folds
case and separators and applies a small, explicit synonym table; :func:`match_classes` pairs
two label spaces by that key. The synonyms are deliberately conservative (the same ones
torchxrayvision applies): related but different findings, e.g. VinDr "Pulmonary fibrosis" vs
NIH "Fibrosis" or "Nodule/Mass" vs "Nodule", are *not* merged.
"""
from __future__ import annotations

import re
from typing import Sequence

# The 14 ChestX-ray14 findings in the order of the NIH paper (Wang et al., CVPR 2017), spelled
# as in the release's Data_Entry_2017 file. ChestMNIST uses the same order.
NIH_CLASSES: list[str] = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]
NIH_NO_FINDING = "No Finding"

# The 14 CheXpert observation columns in the order of train.csv/valid.csv (Irvin et al., 2019).
CHEXPERT_CLASSES: list[str] = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]

# VinDr-CXR PhysioNet release (Nguyen et al., Sci Data 2022): 22 local labels (findings that
# get boxes) and 6 global labels (impressions), in the column order of image_labels_train.csv.
VINDR_LOCAL_CLASSES: list[str] = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration",
    "Lung Opacity", "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass",
    "Pleural effusion", "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
    "Rib fracture", "Other lesion",
]
VINDR_GLOBAL_CLASSES: list[str] = [
    "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding",
]
# The Kaggle "VinBigData" challenge subset: class_id 0..13 (14 = "No finding", not a class).
VINDR_KAGGLE_CLASSES: list[str] = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation",
    "ILD", "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
]
VINDR_NO_FINDING = "No finding"

# Synonyms, as canonical keys (lower case, single spaces): variant -> key.
SYNONYMS: dict[str, str] = {
    "infiltrate": "infiltration",
    "infiltrates": "infiltration",
    "pleural effusion": "effusion",
    "interstitial lung disease": "ild",
    "chronic obstructive pulmonary disease": "copd",
    "other disease": "other diseases",  # VinDr test file vs train file
    "no findings": "no finding",
}


def canonical(name: str) -> str:
    """One key per finding: lower case, ``_``/``-``/runs of spaces folded to one space, synonyms.

    >>> canonical("Pleural_Thickening") == canonical("Pleural thickening")
    True
    >>> canonical("Infiltrate"), canonical("Pleural Effusion")
    ('infiltration', 'effusion')
    """
    if not isinstance(name, str):
        raise TypeError(f"class name must be a string, got {name!r}")
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()
    return SYNONYMS.get(key, key)


def _index_by_key(names: Sequence[str], which: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for name in names:
        key = canonical(name)
        if key in keys:
            raise ValueError(f"label space {which} names one finding twice: "
                             f"{keys[key]!r} and {name!r} both mean {key!r}")
        keys[key] = name
    return keys


def match_classes(a: Sequence[str], b: Sequence[str]):
    """Pair two label spaces by :func:`canonical` key.

    Returns ``(pairs, only_in_a, only_in_b)``: ``pairs`` lists ``(name_in_a, name_in_b)`` in the
    order of ``a``; the other two list the names without a partner, in their own order.
    """
    keys_a = _index_by_key(a, "a")
    keys_b = _index_by_key(b, "b")
    pairs = [(name, keys_b[key]) for key, name in keys_a.items() if key in keys_b]
    only_in_a = [name for key, name in keys_a.items() if key not in keys_b]
    only_in_b = [name for key, name in keys_b.items() if key not in keys_a]
    return pairs, only_in_a, only_in_b


def class_index(classes: Sequence[str], name: str) -> int:
    """Position of ``name`` in ``classes`` by canonical key (KeyError naming both if absent)."""
    key = canonical(name)
    for i, candidate in enumerate(classes):
        if canonical(candidate) == key:
            return i
    raise KeyError(f"{name!r} (key {key!r}) is not among classes {list(classes)}")


__all__ = ["NIH_CLASSES", "NIH_NO_FINDING", "CHEXPERT_CLASSES", "VINDR_LOCAL_CLASSES",
           "VINDR_GLOBAL_CLASSES", "VINDR_KAGGLE_CLASSES", "VINDR_NO_FINDING", "SYNONYMS",
           "canonical", "match_classes", "class_index"]
