"""Picking images to show: boxed images first, on the real NIH sample's box file."""
import numpy as np

from cxrstudy.data import load_dataset
from cxrstudy.explore import box_image, boxed_first


def test_boxed_first_puts_annotated_images_first(nih_sample_root):
    ds = load_dataset("nih", nih_sample_root, split="all", image_size=64)
    boxed = set(ds.boxes["image_id"]) & set(ds.records["image_id"])
    assert boxed, "the sample ships boxes for some of its images"
    picks = boxed_first(ds, len(boxed) + 3)
    ids = ds.records["image_id"].to_numpy()
    assert {ids[i] for i in picks[:len(boxed)]} == boxed
    assert all(ids[i] not in boxed for i in picks[len(boxed):])
    assert len(set(picks)) == len(picks) and boxed_first(ds, 0) == []
    assert ds.meta(picks[0])["boxes"] and ds.meta(box_image(ds))["boxes"]
    assert np.all(np.diff(picks[:len(boxed)]) > 0)  # row order within the boxed images
