"""Class-name constants and cross-dataset matching by canonical name."""
from __future__ import annotations

import pytest

from cxrstudy.data.labels import (CHEXPERT_CLASSES, NIH_CLASSES, VINDR_GLOBAL_CLASSES,
                                  VINDR_KAGGLE_CLASSES, VINDR_LOCAL_CLASSES, canonical,
                                  class_index, match_classes)


def test_class_lists_have_the_release_sizes_and_order():
    assert len(NIH_CLASSES) == 14 and NIH_CLASSES[0] == "Atelectasis"
    assert NIH_CLASSES[12] == "Pleural_Thickening" and NIH_CLASSES[-1] == "Hernia"
    assert len(CHEXPERT_CLASSES) == 14 and CHEXPERT_CLASSES[0] == "No Finding"
    assert CHEXPERT_CLASSES[-1] == "Support Devices"
    assert (len(VINDR_LOCAL_CLASSES), len(VINDR_GLOBAL_CLASSES), len(VINDR_KAGGLE_CLASSES)) \
        == (22, 6, 14)
    # Every Kaggle class is one of the PhysioNet local labels.
    assert set(VINDR_KAGGLE_CLASSES) <= set(VINDR_LOCAL_CLASSES)


def test_chexpert_classes_follow_the_packaged_csv_column_order():
    import gzip
    import importlib.util
    from pathlib import Path

    data = Path(importlib.util.find_spec("torchxrayvision").submodule_search_locations[0]) / "data"
    with gzip.open(data / "chexpert_train.csv.gz", "rt") as handle:
        header = handle.readline().strip().split(",")
    assert header[5:] == CHEXPERT_CLASSES


@pytest.mark.parametrize("a, b", [
    ("Pleural_Thickening", "Pleural thickening"),
    ("Infiltrate", "Infiltration"),
    ("Pleural Effusion", "Effusion"),
    ("pleural effusion", "EFFUSION"),
    ("No  Finding", "no_finding"),
    ("Other disease", "Other diseases"),
])
def test_canonical_folds_spelling_variants(a, b):
    assert canonical(a) == canonical(b)


def test_canonical_keeps_different_findings_apart():
    assert canonical("Pulmonary fibrosis") != canonical("Fibrosis")
    assert canonical("Nodule/Mass") not in (canonical("Nodule"), canonical("Mass"))
    assert canonical("Pleural Other") != canonical("Pleural Effusion")


def test_match_nih_with_chexpert_by_hand():
    pairs, only_nih, only_chexpert = match_classes(NIH_CLASSES, CHEXPERT_CLASSES)
    # Shared findings, counted by hand from the two lists, in NIH order.
    assert pairs == [("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"),
                     ("Effusion", "Pleural Effusion"), ("Pneumonia", "Pneumonia"),
                     ("Pneumothorax", "Pneumothorax"), ("Consolidation", "Consolidation"),
                     ("Edema", "Edema")]
    assert len(only_nih) == 7 and "Pleural_Thickening" in only_nih
    assert len(only_chexpert) == 7 and only_chexpert[0] == "No Finding"


def test_match_nih_with_vindr_kaggle():
    pairs, _, _ = match_classes(NIH_CLASSES, VINDR_KAGGLE_CLASSES)
    assert dict(pairs) == {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
                           "Effusion": "Pleural effusion", "Infiltration": "Infiltration",
                           "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
                           "Pleural_Thickening": "Pleural thickening"}


def test_match_refuses_a_label_space_naming_one_finding_twice():
    with pytest.raises(ValueError, match="Pleural Effusion"):
        match_classes(["Effusion", "Pleural Effusion"], NIH_CLASSES)


def test_class_index_by_canonical_name():
    assert class_index(NIH_CLASSES, "pleural thickening") == 12
    with pytest.raises(KeyError, match="Fracture"):
        class_index(NIH_CLASSES, "Fracture")
