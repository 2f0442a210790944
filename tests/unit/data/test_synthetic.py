"""The procedural phantom: determinism, labels, boxes, and that it can be learned."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrstudy.data import load_dataset
from cxrstudy.data.labels import CHEXPERT_CLASSES, NIH_CLASSES
from cxrstudy.data.synthetic import REFERENCE, SyntheticDataset, prevalence


@pytest.fixture(scope="module")
def phantom():
    return SyntheticDataset(image_size=32, n_images=96, seed=0)


def test_shape_and_identity(phantom):
    assert phantom.synthetic and "SYNTHETIC" in repr(phantom)
    assert len(phantom) == 96 and phantom.classes == NIH_CLASSES
    assert phantom.records["patient_id"].nunique() == 48            # n_images // 2
    assert phantom.read_image(0).shape == (32, 32) and phantom.read_image(0).dtype == np.uint8
    assert set(np.unique(phantom.labels)) <= {0.0, 1.0}


def test_read_image_is_pure_and_seeded(phantom):
    first = phantom.read_image(5)
    assert (phantom.read_image(5) == first).all()
    again = SyntheticDataset(image_size=32, n_images=96, seed=0)
    assert (again.read_image(5) == first).all() and (again.labels == phantom.labels).all()
    other = SyntheticDataset(image_size=32, n_images=96, seed=1)
    assert (other.labels != phantom.labels).any()
    assert (phantom.read_image(6) != first).any()


def test_subsets_read_their_own_rows(phantom):
    part = phantom.subset([10, 3])
    assert (part.read_image(0) == phantom.read_image(10)).all()
    assert (part.read_image(1) == phantom.read_image(3)).all()


def test_every_positive_label_has_a_box_inside_the_frame(phantom):
    positives = int(phantom.labels.sum())
    assert len(phantom.boxes) == positives > 0
    b = phantom.boxes
    assert (b["space_w"] == REFERENCE).all() and (b["space_h"] == REFERENCE).all()
    assert (b["x"] >= 0).all() and (b["y"] >= 0).all()
    assert ((b["x"] + b["w"]) <= REFERENCE).all() and ((b["y"] + b["h"]) <= REFERENCE).all()
    assert ((b["w"] > 0) & (b["h"] > 0)).all()
    i = int(np.nonzero(phantom.labels.sum(axis=1))[0][0])
    boxes = phantom.boxes_for(i)
    assert {box["label"] for box in boxes} == \
        {c for c, v in zip(phantom.classes, phantom.labels[i]) if v == 1}
    assert all(box["x"] + box["w"] <= 32 for box in boxes)


def test_each_lesion_changes_pixels_only_inside_its_box():
    """Ablate one lesion from a scene: the pixels that change must lie inside its box."""
    size, margin = 128, 4  # margin in output pixels, for soft edges
    ds = SyntheticDataset(image_size=size, n_images=400, seed=3)
    for c, name in enumerate(NIH_CLASSES):
        i = int(np.nonzero(ds.labels[:, c])[0][0])
        scene = ds.scene(i)
        with_lesion = ds.render_scene(scene, i, size).astype(int)
        assert (with_lesion == ds.read_image(i)).all()
        scene.lesions = [lesion for lesion in scene.lesions if lesion.label != name]
        difference = np.abs(with_lesion - ds.render_scene(scene, i, size))
        box = [b for b in ds.boxes_for(i) if b["label"] == name][0]
        x0, y0 = max(0, int(box["x"]) - margin), max(0, int(box["y"]) - margin)
        x1 = int(np.ceil(box["x"] + box["w"])) + margin
        y1 = int(np.ceil(box["y"] + box["h"])) + margin
        inside = difference[y0:y1, x0:x1]
        outside = difference.copy()
        outside[y0:y1, x0:x1] = 0
        assert inside.max() >= 10, name       # visible: at least 10 grey levels somewhere
        assert outside.max() <= 3, name       # and nowhere else beyond soft edges


def test_prevalence_is_nih_like_but_never_vanishing():
    assert prevalence("Effusion") == pytest.approx(1.5 * 0.119)
    assert prevalence("Infiltration") == pytest.approx(0.25)
    assert prevalence("Hernia") == pytest.approx(0.04)
    ds = SyntheticDataset(image_size=16, n_images=2000, seed=0)
    observed = ds.labels.mean(axis=0)
    expected = np.array([prevalence(c) for c in NIH_CLASSES])
    assert np.abs(observed - expected).max() < 0.03


def test_other_label_spaces_and_no_finding():
    ds = SyntheticDataset(image_size=16, n_images=64, classes=CHEXPERT_CLASSES, seed=2)
    no_finding = ds.labels[:, 0]
    others = ds.labels[:, 1:].sum(axis=1)
    assert ((no_finding == 1) == (others == 0)).all()
    assert not (ds.boxes["label"] == "No Finding").any()
    with pytest.raises(ValueError, match="twice"):
        SyntheticDataset(image_size=16, n_images=8, classes=["Effusion", "Pleural Effusion"])


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="n_patients"):
        SyntheticDataset(n_images=4, n_patients=5)


def test_load_dataset_splits_by_patient():
    parts = {s: load_dataset("synthetic", None, split=s, image_size=16, n_images=60)
             for s in ("train", "val", "test")}
    patients = {s: set(d.records["patient_id"]) for s, d in parts.items()}
    assert sum(len(d) for d in parts.values()) == 60
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
    assert not patients["train"] & patients["val"]


@pytest.fixture
def one_torch_thread():
    """One thread: deterministic, and fast on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_small_cnn_learns_it_but_not_perfectly(one_torch_thread):
    torch.manual_seed(0)
    ds = SyntheticDataset(image_size=32, n_images=640, seed=0)
    images = np.stack([ds.load_resized(i) for i in range(len(ds))]).astype(np.float32)
    n_train = 448
    images = (images - images[:n_train].mean()) / images[:n_train].std()
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(ds.labels)

    def block(c_in, c_out):
        return [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU(), torch.nn.MaxPool2d(2)]

    net = torch.nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 32),
                              torch.nn.Flatten(), torch.nn.Linear(32 * 16, 14))
    optimiser = torch.optim.Adam(net.parameters(), 3e-3, weight_decay=1e-4)
    for _ in range(10):
        net.train()
        for batch in torch.randperm(n_train).split(32):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        scores = net(x[n_train:]).numpy()
    truth = ds.labels[n_train:]
    aucs = [roc_auc_score(truth[:, c], scores[:, c]) for c in range(14)
            if 0 < truth[:, c].sum() < len(truth)]
    assert len(aucs) >= 12
    assert np.mean(aucs) > 0.7          # learnable ...
    assert min(aucs) < 0.95             # ... but some findings stay hard at 32 px
