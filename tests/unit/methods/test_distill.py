"""DeiT-style distillation: the two-head wrapper, the KD loss by hand, and the trainer's teacher."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cxrstudy.models import create_model
from cxrstudy.models.distill import (DistilledClassifier, DistilledOutput, add_distillation_head,
                                     is_distilled)
from cxrstudy.train import Schedule, TrainConfig, load_checkpoint, masked_bce, seed_everything
from cxrstudy.methods.mxa.distillation import DistillationTrainer, distillation_bce, kd_loss
from _fakes import labelled_batches, save_best_checkpoint

CLASSES = 3
SIZE = 16


# ---- the KD loss, by hand on a 2 × 3 example ----------------------------------------------------
Z_CLS = [[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]]
Z_DIST = [[1.0, 0.0, -2.0], [-1.0, 0.5, 1.0]]
TARGET = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]  # one unknown label: (0, 2)
TEACHER = [[2.0, -1.0, 0.4], [-3.0, 0.6, -0.2]]
ALPHA, TAU = 0.3, 2.0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(z: float, q: float) -> float:
    return -(q * math.log(_sigmoid(z)) + (1.0 - q) * math.log(1.0 - _sigmoid(z)))


def _tensors():
    return (DistilledOutput(torch.tensor(Z_CLS), torch.tensor(Z_DIST)), torch.tensor(TARGET),
            torch.tensor(MASK), torch.tensor(TEACHER))


def _hand_class_term() -> float:
    """Masked BCE of the class head over the 5 known labels."""
    return sum(MASK[i][j] * _bce(Z_CLS[i][j], TARGET[i][j])
               for i in range(2) for j in range(3)) / 5.0


def test_soft_kd_loss_matches_the_hand_computation():
    # soft targets σ(t/τ) with τ = 2: row 0 → 0.731059, 0.377541, 0.549834;
    #                                 row 1 → 0.182426, 0.574443, 0.475021
    soft = [[_sigmoid(t / TAU) for t in row] for row in TEACHER]
    assert soft[0][0] == pytest.approx(0.731059, abs=1e-6)
    assert soft[1][0] == pytest.approx(0.182426, abs=1e-6)
    # the distillation term averages all 6 entries: the label mask does not apply to it
    dist = sum(_bce(Z_DIST[i][j], soft[i][j]) for i in range(2) for j in range(3)) / 6.0
    expected = (1 - ALPHA) * _hand_class_term() + ALPHA * dist
    assert _hand_class_term() == pytest.approx(0.4311952, abs=1e-6)
    assert dist == pytest.approx(0.7537884, abs=1e-6)
    assert expected == pytest.approx(0.5279732, abs=1e-6)
    out, target, mask, teacher = _tensors()
    loss = kd_loss(out, target, mask, teacher, alpha=ALPHA, tau=TAU, mode="soft")
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hard_kd_loss_matches_the_hand_computation():
    # hard targets 1[σ(t) > 0.5] = 1[t > 0]: [[1, 0, 1], [0, 1, 0]]; τ plays no part
    hard = [[1.0 if t > 0 else 0.0 for t in row] for row in TEACHER]
    assert hard == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    dist = sum(_bce(Z_DIST[i][j], hard[i][j]) for i in range(2) for j in range(3)) / 6.0
    expected = (1 - ALPHA) * _hand_class_term() + ALPHA * dist
    assert expected == pytest.approx(0.5635335, abs=1e-6)
    out, target, mask, teacher = _tensors()
    for tau in (TAU, 1.0, 5.0):
        loss = kd_loss(out, target, mask, teacher, alpha=ALPHA, tau=tau, mode="hard")
        assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_teacher_mask_leaves_a_class_out_of_the_distillation_term():
    out, target, mask, teacher = _tensors()
    teacher_mask = torch.tensor([1.0, 1.0, 0.0])
    soft = [[_sigmoid(t / TAU) for t in row] for row in TEACHER]
    dist = sum(_bce(Z_DIST[i][j], soft[i][j]) for i in range(2) for j in range(2)) / 4.0
    expected = (1 - ALPHA) * _hand_class_term() + ALPHA * dist
    assert expected == pytest.approx(0.4861786, abs=1e-6)
    loss = kd_loss(out, target, mask, teacher, ALPHA, TAU, "soft", teacher_mask=teacher_mask)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # whatever the teacher or the distillation head say about class 2, the loss is the same
    changed_teacher = teacher.clone()
    changed_teacher[:, 2] = 9.0
    changed_out = DistilledOutput(out.cls, out.dist.clone().index_fill_(1, torch.tensor([2]), -7.))
    again = kd_loss(changed_out, target, mask, changed_teacher, ALPHA, TAU, "soft",
                    teacher_mask=teacher_mask)
    assert again.item() == pytest.approx(expected, abs=1e-6)
    # gradient on the distillation head: α · (σ(z) − q) / 4 on covered entries, 0 on class 2
    dist_logits = out.dist.clone().requires_grad_(True)
    kd_loss(DistilledOutput(out.cls, dist_logits), target, mask, teacher, ALPHA, TAU,
            teacher_mask=teacher_mask).backward()
    hand = [[ALPHA * (_sigmoid(Z_DIST[i][j]) - soft[i][j]) / 4.0 if j < 2 else 0.0
             for j in range(3)] for i in range(2)]
    assert torch.allclose(dist_logits.grad, torch.tensor(hand), atol=1e-7)
    assert dist_logits.grad[1, 0].item() == pytest.approx(0.3 * (0.268941 - 0.182426) / 4, abs=1e-6)


def test_alpha_weighs_the_terms_and_plain_logits_get_classic_kd():
    out, target, mask, teacher = _tensors()
    only_labels = kd_loss(out, target, mask, teacher, alpha=0.0, tau=TAU)
    assert only_labels.item() == pytest.approx(_hand_class_term(), abs=1e-6)
    no_labels_known = kd_loss(out, target, torch.zeros_like(mask), teacher, alpha=1.0, tau=TAU)
    assert no_labels_known.item() == pytest.approx(
        distillation_bce(out.dist, teacher, TAU).item(), abs=1e-7)
    # one head: both terms read the same logits
    plain = kd_loss(out.cls, target, mask, teacher, alpha=ALPHA, tau=TAU)
    soft = [[_sigmoid(t / TAU) for t in row] for row in TEACHER]
    dist = sum(_bce(Z_CLS[i][j], soft[i][j]) for i in range(2) for j in range(3)) / 6.0
    assert plain.item() == pytest.approx((1 - ALPHA) * _hand_class_term() + ALPHA * dist,
                                         abs=1e-6)


def test_bad_kd_settings_are_refused():
    out, target, mask, teacher = _tensors()
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(out, target, mask, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="tau"):
        kd_loss(out, target, mask, teacher, tau=0.0)
    with pytest.raises(ValueError, match="mode"):
        kd_loss(out, target, mask, teacher, mode="medium")
    with pytest.raises(ValueError, match="teacher logits"):
        kd_loss(out, target, mask, teacher[:, :2])
    with pytest.raises(ValueError, match="teacher_mask"):
        kd_loss(out, target, mask, teacher, teacher_mask=torch.ones(4))


# ---- the two-head model -------------------------------------------------------------------------
class TinyTimmLike(nn.Module):
    """The timm classifier interface in miniature: features, pooled head, get_classifier."""

    def __init__(self, num_classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward_features(self, x):
        return torch.relu(self.norm(self.stem(x)))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_training_mode_gives_both_heads_and_eval_mode_their_average():
    torch.manual_seed(0)
    model = add_distillation_head(TinyTimmLike())
    x = torch.rand(5, 1, SIZE, SIZE)
    model.train()
    out = model(x)
    assert isinstance(out, DistilledOutput)
    assert out.cls.shape == out.dist.shape == (5, CLASSES)
    assert not torch.allclose(out.cls, out.dist)  # separately initialised heads
    model.eval()
    with torch.no_grad():
        averaged = model(x)
        heads = model.forward_heads(x)
        plain = model.backbone(x)
    assert isinstance(averaged, torch.Tensor) and averaged.shape == (5, CLASSES)
    assert torch.allclose(averaged, (heads.cls + heads.dist) / 2)
    assert torch.allclose(heads.cls, plain, atol=1e-6)  # the class head is the model's own


@pytest.mark.parametrize("name,size,kwargs,head_name,head_type", [
    ("efficientvit_m0", 64, {}, "head", "NormLinear"),
    ("resnet18", 32, {}, "fc", "Linear"),
    ("densenet121", 32, {}, "classifier", "Linear"),
    ("deit_tiny_patch16_224", 32, {"patch_size": 8}, "head", "Linear"),
])
def test_the_class_head_is_the_models_own_and_head_dist_copies_its_shape(name, size, kwargs,
                                                                         head_name, head_type):
    seed_everything(0)
    base = create_model(name, num_classes=14, in_chans=1, image_size=size, **kwargs)
    model = add_distillation_head(base).eval()
    assert model.head_name == head_name
    assert type(model.head_dist).__name__ == head_type
    own = {k: v.shape for k, v in model.head.state_dict().items()}
    assert {k: v.shape for k, v in model.head_dist.state_dict().items()} == own
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        heads = model.forward_heads(x)
        assert torch.allclose(heads.cls, base(x), atol=1e-5)
    assert heads.dist.shape == (2, 14)
    config = model.cxr_config
    assert config["distilled"] is True and config["kwargs"]["distilled"] is True
    assert config["name"] == name and config["num_classes"] == 14 and config["image_size"] == size
    assert base.cxr_config["kwargs"].get("distilled") is None  # the original is left as it was


def test_distilled_efficientvit_m0_trains_both_heads_at_64_px():
    seed_everything(0)
    model = add_distillation_head(create_model("efficientvit_m0", num_classes=14, in_chans=1,
                                               image_size=64)).train()
    assert model.no_weight_decay() and all(n.startswith("backbone.")
                                           for n in model.no_weight_decay())
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names | {n for n, _ in model.named_buffers()} | \
        set(model.state_dict())
    out = model(torch.rand(3, 1, 64, 64))
    assert out.cls.shape == out.dist.shape == (3, 14)
    (out.cls.sum() + 2 * out.dist.sum()).backward()
    head_dist_grads = [p.grad for p in model.head_dist.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_dist_grads)
    assert model.head.linear.weight.grad.abs().sum() > 0
    assert model.backbone.patch_embed[0].conv.weight.grad.abs().sum() > 0
    assert is_distilled(model) and not is_distilled(model.backbone)


def test_bad_models_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="already has a distillation head"):
        add_distillation_head(add_distillation_head(TinyTimmLike()))
    with pytest.raises(TypeError, match="forward_features"):
        add_distillation_head(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_create_model_distilled_rebuilds_from_a_checkpoint(tmp_path):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint

    model = create_model("resnet18", num_classes=2, in_chans=1, image_size=32, distilled=True)
    assert isinstance(model, DistilledClassifier) and model.cxr_config["distilled"]
    save_best_checkpoint(tmp_path / "best.pt", model)
    rebuilt, _ = load_model_from_checkpoint(tmp_path / "best.pt")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x))


# ---- the trainer ----------------------------------------------------------------------------------
class TinyTeacher(nn.Module):
    """A teacher with batch norm (its running statistics must not move) and a class mask."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, CLASSES)
        self.register_buffer("teacher_mask", torch.tensor([1.0, 1.0, 0.0]), persistent=False)
        self.teacher_name = "tiny-teacher"
        self.seen_shapes: list[tuple] = []

    def forward(self, x):
        self.seen_shapes.append(tuple(x.shape))
        return self.fc(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))) * 3.0


def _batches(n_batches: int = 3, batch: int = 4, seed: int = 0) -> list[dict]:
    return labelled_batches(n_batches, SIZE, CLASSES, seed, batch)


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_distillation_trainer_trains_the_student_and_never_the_teacher(tmp_path):
    seed_everything(0)
    student = add_distillation_head(TinyTimmLike())
    teacher = TinyTeacher().train()  # handed over in training mode with gradients on purpose
    before = _state_copy(teacher)
    student_before = _state_copy(student)
    config = TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0, checkpoint_dir=str(tmp_path / "run"),
                         progress=False, keep_last=True)  # last.pt keeps the optimiser
    trainer = DistillationTrainer(student, config, class_names=["A", "B", "C"], teacher=teacher,
                                  alpha=0.4, tau=2.0, mode="soft")
    history = trainer.fit(_batches(), _batches(2, seed=1))
    assert list(history["epoch"]) == [1, 2] and history["train_loss"].notna().all()
    # the teacher: frozen, no gradient, byte-identical (batch-norm statistics included)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the student did learn, both heads
    moved = {k for k, v in student.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, student_before[k])}
    assert "head_dist.weight" in moved and "backbone.fc.weight" in moved
    # the teacher's mask came from the teacher and is recorded with the run
    assert trainer.teacher_mask.tolist() == [1.0, 1.0, 0.0]
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["train_config"]["distillation"] == {
        "teacher": "tiny-teacher", "alpha": 0.4, "tau": 2.0, "mode": "soft",
        "teacher_mask": [1.0, 1.0, 0.0]}
    # checkpoints hold the student only: its keys, its parameters in the optimiser
    assert payload["model"].keys() == student.state_dict().keys()
    assert not any(k.startswith(("conv.", "norm.", "teacher")) for k in payload["model"])
    optimised = sum(len(group["params"]) for group in payload["optimizer"]["param_groups"])
    assert optimised == len(list(student.parameters()))
    assert payload["model_config"]["distilled"] is True
    # predictions use the averaged heads
    preds = trainer.predict(_batches(1, seed=2))
    student.eval()
    with torch.no_grad():
        heads = student.forward_heads(_batches(1, seed=2)[0]["image"])
    assert torch.allclose(torch.from_numpy(preds.logits), (heads.cls + heads.dist) / 2, atol=1e-6)


def test_training_step_is_kd_loss_on_the_teacher_of_the_same_images():
    seed_everything(0)
    student = add_distillation_head(TinyTimmLike())
    teacher = TinyTeacher()
    seen = []

    def to_teacher(images):
        seen.append(images)
        return images.flip(-1)

    trainer = DistillationTrainer(student, TrainConfig(epochs=1, progress=False), teacher=teacher,
                                  alpha=0.7, tau=0.5, mode="hard", teacher_mask=[1, 0, 1],
                                  teacher_input=to_teacher)
    batch = _batches(1)[0]
    student.train()
    loss = trainer.training_step(batch)
    assert len(seen) == 1 and torch.equal(seen[0], batch["image"])
    with torch.no_grad():
        teacher_logits = teacher(batch["image"].flip(-1))
    expected = kd_loss(student(batch["image"]), batch["target"], batch["mask"], teacher_logits,
                       alpha=0.7, tau=0.5, mode="hard", teacher_mask=torch.tensor([1., 0., 1.]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.requires_grad


def test_resuming_with_other_distillation_settings_is_refused(tmp_path):
    seed_everything(0)
    config = TrainConfig(epochs=1, warmup_epochs=0, checkpoint_dir=str(tmp_path / "run"),
                         resume=True, progress=False)
    DistillationTrainer(add_distillation_head(TinyTimmLike()), config, teacher=TinyTeacher(),
                        alpha=0.5).fit(_batches(1))
    same = DistillationTrainer(add_distillation_head(TinyTimmLike()), config,
                               teacher=TinyTeacher(), alpha=0.5)
    assert list(same.fit(_batches(1))["epoch"]) == [1]  # resumed: nothing left to do
    other = DistillationTrainer(add_distillation_head(TinyTimmLike()), config,
                                teacher=TinyTeacher(), alpha=0.9)
    with pytest.raises(ValueError, match="distillation"):
        other.fit(_batches(1))


def test_train_and_evaluate_runs_a_distilled_student(tmp_path):
    from cxrstudy.experiment import prepare_data, train_and_evaluate
    from cxrstudy.outputs import Outputs

    out = Outputs(tmp_path / "kd")
    data = prepare_data("synthetic", None, SIZE, seed=0, max_images=60, progress=False,
                        cache=False, n_images=60, n_patients=30)
    seed_everything(0)
    student = add_distillation_head(TinyTimmLike(num_classes=len(data.classes)))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, len(data.classes)))
    teacher_before = _state_copy(teacher)
    run = train_and_evaluate(student, data, out, Schedule(epochs=1, batch_size=16, augment=False),
                             tag="kd", n_boot=10, trainer_cls=DistillationTrainer, progress=False,
                             trainer_kwargs={"teacher": teacher, "alpha": 0.5, "tau": 2.0})
    assert run.probs.shape == (len(data.test), len(data.classes))
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    payload = load_checkpoint(tmp_path / "kd/checkpoints/kd/best.pt")
    assert payload["model"].keys() == student.state_dict().keys()
    assert payload["train_config"]["distillation"]["tau"] == 2.0


def test_the_class_term_uses_the_trainers_loss_function():
    seed_everything(0)
    student = add_distillation_head(TinyTimmLike())
    calls = []

    def counting_bce(logits, target, mask=None):
        calls.append(logits.shape)
        return masked_bce(logits, target, mask)

    trainer = DistillationTrainer(student, TrainConfig(epochs=1, progress=False),
                                  loss_fn=counting_bce, teacher=TinyTeacher(), alpha=0.5)
    trainer.training_step(_batches(1)[0])
    assert calls == [torch.Size([4, CLASSES])]
