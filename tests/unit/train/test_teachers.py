"""Teachers: the torchxrayvision → CheXpert mapping by hand, its input range, the offline error,
and our own checkpoints as teachers. No real xrv weights are needed (nor downloaded)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cxrstudy.data.labels import CHEXPERT_CLASSES, NIH_CLASSES
from cxrstudy.models import PretrainedWeightsUnavailable, create_model
from cxrstudy.teachers import (CheckpointTeacher, TXVTeacher, txv_chexpert_mapping,
                                      txv_class_mapping, txv_pathologies, txv_preprocess,
                                      txv_weight_path)
from cxrstudy.train import seed_everything
from cxrstudy.teachers import load_teacher
from _fakes import save_best_checkpoint

# xrv's output slots for densenet121-res224-chex ("" = output not trained for these weights)
CHEX_SLOTS = ["Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "", "Effusion",
              "Pneumonia", "", "Cardiomegaly", "", "", "", "Lung Lesion", "Fracture",
              "Lung Opacity", "Enlarged Cardiomediastinum"]
# CheXpert class → the xrv output it is read from
SAME_FINDING = {"Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
                "Cardiomegaly": "Cardiomegaly", "Lung Opacity": "Lung Opacity",
                "Lung Lesion": "Lung Lesion", "Edema": "Edema", "Consolidation": "Consolidation",
                "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis",
                "Pneumothorax": "Pneumothorax", "Pleural Effusion": "Effusion",
                "Fracture": "Fracture"}
# hand-set probability for each of the 18 slots (blank slots too: they must be ignored)
PROBS = [0.10, 0.20, 0.95, 0.30, 0.05, 0.90, 0.90, 0.40, 0.15, 0.90, 0.60, 0.90, 0.90, 0.90,
         0.25, 0.02, 0.50, 0.35]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class StubXRV(nn.Module):
    """Stands in for an xrv model: names its 18 outputs and returns fixed logits logit(PROBS),
    remembering what it was given."""

    def __init__(self, slots=CHEX_SLOTS, probs=PROBS, apply_sigmoid: bool = False):
        super().__init__()
        self.pathologies = list(slots)
        self.apply_sigmoid = apply_sigmoid
        self.register_buffer("out", torch.tensor([_logit(p) for p in probs]))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        out = self.out.expand(x.shape[0], -1)
        return torch.sigmoid(out) if self.apply_sigmoid else out


def test_the_chex_weights_name_the_slots_we_map():
    assert txv_pathologies("densenet121-res224-chex") == CHEX_SLOTS


def test_the_chexpert_mapping_table_is_explicit():
    table = txv_chexpert_mapping().set_index("class")
    assert list(table.index) == CHEXPERT_CLASSES
    for ours, theirs in SAME_FINDING.items():
        assert table.at[ours, "rule"] == "same finding"
        assert table.at[ours, "txv_outputs"] == (theirs,)
        assert table.at[ours, "txv_indices"] == (CHEX_SLOTS.index(theirs),)
        assert table.at[ours, "teacher_mask"] == 1.0
    assert set(table.at["No Finding", "txv_outputs"]) == set(SAME_FINDING.values())
    assert len(table.at["No Finding", "txv_outputs"]) == 11
    assert table.at["No Finding", "teacher_mask"] == 1.0
    for absent in ("Pleural Other", "Support Devices"):
        assert table.at[absent, "txv_outputs"] == () and table.at[absent, "teacher_mask"] == 0.0
    assert table["teacher_mask"].sum() == 12


def test_a_label_space_without_no_finding_maps_by_name_only():
    table = txv_class_mapping(CHEX_SLOTS, NIH_CLASSES).set_index("class")
    covered = sorted(table.index[table["teacher_mask"] == 1])
    assert covered == sorted(["Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia",
                              "Pneumothorax", "Consolidation", "Edema"])
    assert not table["rule"].str.startswith("no finding").any()


def test_txv_teacher_outputs_match_the_hand_computation():
    stub = StubXRV()
    teacher = TXVTeacher(stub, CHEXPERT_CLASSES)
    logits = teacher(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 14)
    p = dict(zip(CHEX_SLOTS, PROBS))
    # No Finding = Π(1 − p) over the 11 mapped pathologies:
    # 0.9·0.8·0.7·0.95·0.6·0.85·0.4·0.75·0.98·0.5·0.65 = 0.02333216...
    no_finding = 0.9 * 0.8 * 0.7 * 0.95 * 0.6 * 0.85 * 0.4 * 0.75 * 0.98 * 0.5 * 0.65
    assert no_finding == pytest.approx(math.prod(1 - p[k] for k in SAME_FINDING.values()))
    assert no_finding == pytest.approx(0.02333216, abs=1e-8)
    expected = []
    for name in CHEXPERT_CLASSES:
        if name in SAME_FINDING:
            expected.append(_logit(p[SAME_FINDING[name]]))
        elif name == "No Finding":
            expected.append(_logit(no_finding))
        else:
            expected.append(0.0)
    for row in logits:
        assert row.tolist() == pytest.approx(expected, abs=1e-4)
    assert torch.sigmoid(logits[0, 0]).item() == pytest.approx(no_finding, rel=1e-4)
    assert teacher.teacher_mask.tolist() == [1.0] * 11 + [0.0, 1.0, 0.0]


def test_txv_teacher_feeds_xrv_224_px_in_its_intensity_range():
    stub = StubXRV()
    teacher = TXVTeacher(stub, CHEXPERT_CLASSES)
    images = torch.full((3, 1, 40, 40), 0.5)
    images[:, :, :20] = 0.0
    images[:, :, 20:] = 1.0
    teacher(images)
    seen = stub.inputs[-1]
    assert seen.shape == (3, 1, 224, 224)
    assert seen.min().item() == pytest.approx(-1024.0) and seen.max().item() == pytest.approx(1024.0)
    assert txv_preprocess(torch.full((1, 1, 224, 224), 0.25)).unique().tolist() == [-512.0]
    with pytest.raises(ValueError, match="one-channel"):
        txv_preprocess(torch.rand(1, 3, 32, 32))


def test_probability_outputs_are_turned_back_into_logits():
    teacher = TXVTeacher(StubXRV(apply_sigmoid=True), CHEXPERT_CLASSES)
    logits = teacher(torch.rand(1, 1, 16, 16))
    column = CHEXPERT_CLASSES.index("Pleural Effusion")
    assert logits[0, column].item() == pytest.approx(_logit(0.40), abs=1e-4)


def test_xrv_densenet_without_weights_is_wrapped_by_its_output_names():
    import torchxrayvision as xrv

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None)  # 18 named outputs (xrv's default list)
    teacher = TXVTeacher(model, CHEXPERT_CLASSES).eval()
    assert teacher.mapping.set_index("class").at["No Finding", "txv_outputs"] == tuple(
        SAME_FINDING[c] for c in CHEXPERT_CLASSES if c in SAME_FINDING)
    with torch.no_grad():
        images = torch.rand(2, 1, 32, 32)
        logits = teacher(images)
        source = teacher.pathology_logits(images)
    assert logits.shape == (2, 14)
    column = CHEXPERT_CLASSES.index("Pleural Effusion")
    assert torch.allclose(logits[:, column], source[:, model.targets.index("Effusion")])
    mapped = [model.targets.index(n) for n in SAME_FINDING.values()]
    no_finding = torch.prod(1 - torch.sigmoid(source[:, mapped]), dim=1)
    assert torch.allclose(torch.sigmoid(logits[:, 0]), no_finding, rtol=1e-4)


def test_missing_txv_weights_fail_at_once_naming_the_file(tmp_path, monkeypatch):
    import torchxrayvision as xrv

    monkeypatch.setenv("HOME", str(tmp_path))  # xrv's cache: ~/.torchxrayvision/models_data/

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(xrv.utils, "download", no_download)
    expected = (tmp_path / ".torchxrayvision" / "models_data" /
                "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")
    assert txv_weight_path() == expected
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        load_teacher("txv-densenet121-res224-chex", 14, CHEXPERT_CLASSES)
    message = str(error.value)
    assert str(expected) in message and "wget" in message and "download=False" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_HUB_OFFLINE"):
        TXVTeacher.from_pretrained(download=True)
    assert not expected.parent.exists()  # nothing created, nothing fetched


def test_cached_txv_weights_load_offline(tmp_path, monkeypatch):
    import torchxrayvision as xrv

    monkeypatch.setattr(xrv.utils, "download", lambda *a, **k: pytest.fail("downloaded"))
    torch.manual_seed(1)
    saved = xrv.models.DenseNet(weights=None)  # random weights saved the way xrv stores them
    path = txv_weight_path(cache_dir=tmp_path)
    torch.save(saved, path)
    teacher = load_teacher("txv-densenet121-res224-chex", 14, CHEXPERT_CLASSES,
                           cache_dir=tmp_path)
    assert isinstance(teacher, TXVTeacher)
    assert teacher.teacher_name == "txv-densenet121-res224-chex"
    assert teacher.pathologies == CHEX_SLOTS  # the weights' own slot names, blanks included
    assert torch.equal(teacher.model.classifier.weight, saved.classifier.weight)
    assert teacher.model.op_threshs is None  # raw logits, not xrv's calibrated outputs
    calibrated = TXVTeacher.from_pretrained(cache_dir=tmp_path, calibrated=True)
    assert calibrated.model.op_threshs is not None and calibrated.outputs_are_probabilities()


def test_our_checkpoint_as_teacher_reorders_classes_and_resizes(tmp_path):
    seed_everything(0)
    model = create_model("resnet18", num_classes=3, in_chans=1, image_size=32).eval()
    save_best_checkpoint(tmp_path / "teacher" / "best.pt", model, ["Effusion", "Mass", "Hernia"])
    student_classes = ["Hernia", "Pleural Effusion", "Nodule"]
    teacher = load_teacher(tmp_path / "teacher", 3, student_classes)
    assert isinstance(teacher, CheckpointTeacher)
    assert teacher.teacher_mask.tolist() == [1.0, 1.0, 0.0]
    assert teacher.teacher_name == "checkpoint:resnet18:teacher/best.pt"
    images = torch.rand(2, 1, 48, 48)  # the student's size; the teacher was trained at 32
    with torch.no_grad():
        logits = teacher(images)
        direct = model(torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear",
                                                       align_corners=False, antialias=True))
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[:, 0], direct[:, 2], atol=1e-5)  # Hernia
    assert torch.allclose(logits[:, 1], direct[:, 0], atol=1e-5)  # Pleural Effusion = Effusion
    assert torch.all(logits[:, 2] == 0)                            # Nodule: not a teacher class


def test_teacher_names_and_class_counts_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("densenet121-teacher", 14, CHEXPERT_CLASSES)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        load_teacher("txv-densenet121-res224-chex", 3, ["A", "B"])
    with pytest.raises(ValueError, match="no weights"):
        load_teacher("txv-densenet999", 14, CHEXPERT_CLASSES)
    model = create_model("resnet18", num_classes=2, in_chans=1, image_size=32)
    save_best_checkpoint(tmp_path / "best.pt", model, ["Mass", "Hernia"])
    with pytest.raises(ValueError, match="share no class"):
        load_teacher(tmp_path / "best.pt", 2, ["Edema", "Fracture"])
