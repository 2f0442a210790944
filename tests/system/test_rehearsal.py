"""The rehearsal's miniature releases, weight stand-ins and scale-down (cxrstudy.rehearsal).

The releases are written once per session (small sizes) and read back through the study's own
adapters, checked against the label files bundled in torchxrayvision's wheel.
"""
import gzip
import json

import numpy as np
import pandas as pd
import pytest

from cxrstudy.pipeline.config import resolve_parameters
from cxrstudy.data import SYNTHETIC_MARKER, load_dataset
from cxrstudy.data.labels import VINDR_KAGGLE_CLASSES
from cxrstudy.rehearsal import releases, scale, weights


@pytest.fixture(scope="session")
def miniature(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal-data")
    releases.write_nih(root, n_images=40, per_class=1, n_boxed=4, progress=None)
    releases.write_chexpert(root, n_images=40, per_class=1, n_valid_patients=6, progress=None)
    releases.write_vindr(root, n_images=24, per_class=1, progress=None)
    releases.write_stand_in_note(root)
    return root


def bundled(name):
    return releases.xrv_data_dir() / name


# ---- NIH ------------------------------------------------------------------------------------
def test_nih_layout_and_real_rows(miniature):
    folder = miniature / "nih"
    for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "train_val_list.txt",
                 "test_list.txt", SYNTHETIC_MARKER):
        assert (folder / name).is_file(), name
    ours = (folder / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    with gzip.open(bundled("Data_Entry_2017_v2020.csv.gz"), "rt") as handle:
        real = handle.read().splitlines()
    assert ours[0] == real[0]  # the split OriginalImage[Width,Height] header, as released
    assert set(ours[1:]) <= set(real[1:])  # every row is a real row, unchanged
    images = sorted(folder.glob("images_*/images/*.png"))
    assert len(images) == len(ours) - 1 >= 40
    # every image sits in the archive folder its id falls in (images_001 holds the first 4999)
    first = releases.nih_archive([r.split(",")[0] for r in real[1:]])
    assert all(first[p.name] == p.parent.parent.name for p in images)


def test_nih_reads_back_with_official_lists_and_boxes(miniature):
    from PIL import Image

    ds = load_dataset("nih", miniature, split="all", image_size=32, views=None)
    assert ds.synthetic
    assert set(ds.records["official_split"]) == {"train", "test"}
    assert len(ds.boxes) >= 4
    boxed = set(ds.boxes["image_id"])
    official = dict(zip(ds.records["image_id"], ds.records["official_split"]))
    assert all(official[i] == "test" for i in boxed)  # as in the release: boxes are test images
    # every class has positives in both official parts, as in the release (06's class-balanced
    # losses refuse a class without training positives)
    for part in ("train", "test"):
        rows = (ds.records["official_split"] == part).to_numpy()
        assert (np.nansum(ds.labels[rows] == 1, axis=0) > 0).all(), part
    # lists cover the whole release (112,120 ids), each id in exactly one
    train = (miniature / "nih" / "train_val_list.txt").read_text().split()
    test = (miniature / "nih" / "test_list.txt").read_text().split()
    assert len(train) + len(test) == 112120 and not set(train) & set(test)
    sizes = {Image.open(p).size for p in ds.records["path"]}
    modes = {Image.open(p).mode for p in ds.records["path"]}
    assert sizes == {(1024, 1024)} and modes == {"L", "RGBA"}
    assert ds.read_image(0).shape == (1024, 1024)


def test_nih_official_split_keeps_patients_together():
    entries = pd.DataFrame({"Image Index": ["a.png", "b.png", "c.png"],
                            "Patient ID": ["1", "1", "2"]})
    part = releases.nih_official_split(entries, boxed={"b.png"})
    assert list(part[:2]) == ["test", "test"]  # a's patient has a boxed image


# ---- CheXpert -------------------------------------------------------------------------------
def test_chexpert_layout_quirks_and_valid_stand_in(miniature):
    folder = miniature / "CheXpert-v1.0-small"
    train = pd.read_csv(folder / "train.csv")
    valid = pd.read_csv(folder / "valid.csv")
    real = pd.read_csv(bundled("chexpert_train.csv.gz"))
    assert list(train.columns) == list(real.columns) == list(valid.columns)
    assert set(train["Path"]) <= set(real["Path"])
    observations = train.columns[5:]
    assert (train[observations] == -1).any().any() and train[observations].isna().any().any()
    assert (train["Frontal/Lateral"] == "Lateral").any()
    assert valid["Path"].str.match(r"CheXpert-v1\.0-small/valid/patient6\d{4}/study1/").all()
    assert valid[observations].isin([0.0, 1.0]).all().all()  # expert labels: no -1, no blank
    from PIL import Image

    first = Image.open(folder / train["Path"][0].split("/", 1)[1])
    assert first.format == "JPEG" and min(first.size) == 320


def test_chexpert_reads_back_all_views(miniature):
    ds = load_dataset("chexpert", miniature, split="all", image_size=32, views="all")
    assert ds.synthetic
    assert set(ds.records["official_split"]) == {"train", "test"}
    assert "Lateral" in set(ds.records["view"])
    assert ds[0]["image"].shape == (1, 32, 32)


# ---- VinDr-CXR ------------------------------------------------------------------------------
def test_vindr_layout_and_dicoms(miniature):
    import pydicom

    folder = miniature / "vindr-cxr"
    labels = pd.read_csv(folder / "annotations" / "image_labels_train.csv")
    assert list(labels.columns[:2]) == ["image_id", "rad_ID"]
    assert labels.groupby("image_id").size().eq(3).all()  # three readers per training image
    test = pd.read_csv(folder / "annotations" / "image_labels_test.csv")
    assert test["image_id"].is_unique and "rad_ID" not in test.columns
    assert "Other disease" in test.columns  # the test file's spelling
    real = pd.read_csv(bundled("vinbigdata-train.csv.gz"))
    boxes = pd.read_csv(folder / "annotations" / "annotations_train.csv")
    columns = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    rows = set(boxes[columns].fillna(-1).itertuples(index=False))
    assert rows <= set(real[columns].fillna(-1).itertuples(index=False))  # real rows, unchanged
    files = sorted(folder.glob("*/*.dicom"))
    assert len(files) == labels["image_id"].nunique() + len(test)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(h.BitsStored) for h in headers} <= {12, 14, 16}
    assert all(h.Rows >= 2000 and h.Columns >= 2000 for h in headers)


def test_vindr_reads_back_with_boxes_in_dicom_space(miniature):
    ds = load_dataset("vindr", miniature, split="all", image_size=32)
    assert ds.synthetic and ds.layout == "physionet"
    assert set(ds.records["official_split"]) == {"train", "test"}
    positives = np.nansum(ds.labels == 1, axis=0)
    kaggle = [ds.classes.index(c) for c in VINDR_KAGGLE_CLASSES]
    assert (positives[kaggle] > 0).any()
    with_box = ds.boxes["image_id"].iloc[0]
    i = int(np.flatnonzero(ds.records["image_id"] == with_box)[0])
    for box in ds.boxes_for(i):  # the header's size: every box inside the image
        assert 0 <= box["x"] and box["x"] + box["w"] <= 32 + 1e-6
    image = ds.read_image(i)
    assert image.dtype == np.uint8 and image.ndim == 2


def test_monochrome1_is_inverted_back(tmp_path):
    from cxrstudy.data.vindr import read_dicom

    kwargs = dict(image_id="same", height=64, width=48, bits=12, block=1)
    releases.write_dicom(tmp_path / "m2.dicom", monochrome1=False, **kwargs)
    releases.write_dicom(tmp_path / "m1.dicom", monochrome1=True, **kwargs)
    m1, m2 = read_dicom(tmp_path / "m1.dicom"), read_dicom(tmp_path / "m2.dicom")
    assert np.abs(m1.astype(int) - m2.astype(int)).max() <= 1


def test_generation_is_deterministic(tmp_path):
    a = releases.write_chexpert(tmp_path / "a", n_images=10, per_class=0, n_valid_patients=2,
                                progress=None)
    b = releases.write_chexpert(tmp_path / "b", n_images=10, per_class=0, n_valid_patients=2,
                                progress=None)
    for name in ("train.csv", "valid.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    first = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert first == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert (a / first[0]).read_bytes() == (b / first[0]).read_bytes()


def test_stand_in_note_names_the_derived_files(miniature):
    text = (miniature / releases.STAND_INS).read_text()
    for name in ("train_val_list.txt", "valid.csv", "image_labels_test.csv"):
        assert name in text


# ---- weights --------------------------------------------------------------------------------
def test_timm_standin_loads_through_the_hub_cache(tmp_path, monkeypatch):
    from cxrstudy.models import create_model
    from cxrstudy.models.pretrained import find_cached_weights

    path = weights.write_timm_standin("vit_small_patch16_224", tmp_path / "hub")
    assert path.is_symlink() and path.resolve().parent.name == "blobs"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert find_cached_weights("vit_small_patch16_224") == path
    model = create_model("vit_small", 5, in_chans=1, image_size=224, pretrained=True)
    # the stand-in's three-channel stem came over as stored: the file was really read
    from safetensors.torch import load_file

    stored = load_file(str(path))["patch_embed.proj.weight"]
    assert np.allclose(model.patch_embed.proj.weight.detach().numpy(), stored.numpy())
    assert model.cxr_config["input_norm"] == "pretrained"


def test_txv_standin_loads_through_xrv(tmp_path, monkeypatch):
    import torch

    from cxrstudy.data.labels import CHEXPERT_CLASSES
    from cxrstudy.teachers import TXVTeacher

    monkeypatch.setenv("HOME", str(tmp_path))
    path = weights.write_txv_standin("densenet121-res224-chex",
                                     tmp_path / ".torchxrayvision" / "models_data")
    teacher = TXVTeacher.from_pretrained("densenet121-res224-chex", CHEXPERT_CLASSES)
    saved = torch.load(path, weights_only=False).state_dict()
    key = "classifier.weight"
    assert torch.equal(teacher.model.state_dict()[key], saved[key])
    # valid weights, not just the right shapes: positive batch-norm variances, finite logits
    # (a redraw of every tensor made variances negative and 03's teacher evaluation NaN)
    variances = [v for k, v in saved.items() if k.endswith("running_var")]
    assert variances and all((v > 0).all() for v in variances)
    logits = teacher(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 14) and torch.isfinite(logits).all()


# ---- scale ----------------------------------------------------------------------------------
def test_scale_overrides_change_only_scale_keys():
    paper = resolve_parameters("paper")
    scaled = resolve_parameters("paper", scale.override_arguments())
    allowed = set(scale.SCALE_OVERRIDES)
    for name, params in paper.items():
        changed = {k for k in params if params[k] != scaled[name][k]}
        assert changed <= allowed, (name, changed - allowed)
    assert scaled["01_baseline"]["epochs"] == 1
    assert scaled["03_knowledge_distillation"]["teacher"] == "txv-densenet121-res224-chex"
    assert scaled["05_glori"]["backbone_weights"] == "pretrained"
    assert scaled["04_low_resolution"]["resolutions"] == paper["04_low_resolution"]["resolutions"]


def test_scale_note_reaches_the_report_as_a_string():
    note = scale.scale_note()
    params = resolve_parameters("paper", [f"08_report.profile_note={json.dumps(note)}"])
    assert params["08_report"]["profile_note"] == note
    assert "SYNTHETIC PIXELS" in note and "epochs=1" in note


def test_environment_keeps_every_cache_inside_the_folder(tmp_path):
    env = scale.rehearsal_environment(tmp_path, base={"HF_HUB_CACHE": "/elsewhere", "PATH": "x"})
    assert "HF_HUB_CACHE" not in env and env["PATH"] == "x" and env["HF_HUB_OFFLINE"] == "1"
    for key in ("CXRSTUDY_DATA_ROOT", "CXRSTUDY_CACHE_DIR", "HOME", "HF_HOME", "TORCH_HOME",
                "XDG_CACHE_HOME"):
        assert env[key].startswith(str(tmp_path.resolve())), key


def test_a_release_without_the_marker_is_not_synthetic(miniature, tmp_path):
    import shutil

    copy = shutil.copytree(miniature / "CheXpert-v1.0-small", tmp_path / "CheXpert-v1.0-small")
    (copy / SYNTHETIC_MARKER).unlink()
    assert not load_dataset("chexpert", tmp_path, split="all", image_size=32).synthetic
