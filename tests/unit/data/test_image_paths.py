"""Image entries of a labels file that would open files outside the dataset folder are refused."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrstudy.data.base import UnsafeImagePathError, refuse_paths_outside
from cxrstudy.data.nih import NIHDataset

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def write_png(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 40), value, dtype=np.uint8)).save(path)


def nih_release(root, image_ids):
    """A fake NIH root listing ``image_ids`` (one patient each); PNGs only for plain names."""
    (root / "images").mkdir(parents=True)
    rows = [f"{image_id},Mass,0,{k + 1},50,M,PA,1,1,0.1,0.1" for k, image_id in enumerate(image_ids)]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    for image_id in image_ids:
        if "/" not in image_id:
            write_png(root / "images" / image_id)
    return root


def test_entries_climbing_out_or_absolute_are_refused_by_name(tmp_path):
    outside = tmp_path / "x.png"       # files that exist: before the fix they were read
    write_png(outside, value=7)
    ids = ["00000001_000.png", "../../x.png", str(outside), "00000002_000.png"]
    root = nih_release(tmp_path / "release" / "nih", ids)
    with pytest.raises(UnsafeImagePathError) as refused:
        NIHDataset(root=root, image_size=16)
    message = str(refused.value)
    assert "Data_Entry_2017_v2020.csv: 2 image entries" in message
    assert "'../../x.png'" in message and repr(str(outside)) in message
    assert "00000001_000.png" not in message


def test_normal_entries_and_a_symlinked_root_are_unaffected(tmp_path):
    root = nih_release(tmp_path / "nih", ["00000001_000.png", "00000002_000.png"])
    link = tmp_path / "linked"
    link.symlink_to(root, target_is_directory=True)
    ds = NIHDataset(root=link, image_size=16)
    assert ds.read_image(1).shape == (30, 40)
    refuse_paths_outside(link, ["images/../00000001_000.png", "a..b.png"], "labels.csv")


def test_helper_resolves_through_the_symlinked_root(tmp_path):
    real = tmp_path / "real"
    (real / "images").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafeImagePathError, match=r"labels.csv: 1 image entries .*'\.\./\.\./x'"):
        refuse_paths_outside(link, ["ok.png", "../../x"], "labels.csv", under="images")
    refuse_paths_outside(link, ["../ok.png"], "labels.csv", under="images")  # still in the root
