"""MLCAK: token grids, attention maps read from timm, their alignment, the two-task loss by hand,
and the trainer's frozen teacher."""
from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrstudy.models import create_model
from cxrstudy.models.attention_maps import (AttentionRecorder, TokenLayout, align_attention,
                                            drop_prefix, patch_size_for, resize_attention,
                                            token_layout)
from cxrstudy.methods.mlcak.model import (MultiTaskClassifier, MultiTaskOutput, add_global_head,
                                       is_multitask)
from cxrstudy.train import Schedule, TrainConfig, Trainer, load_checkpoint, seed_everything
from cxrstudy.train.losses import masked_bce
from cxrstudy.methods.mlcak.training import (GlobalLabels, MLCAKTrainer, dataset_global_labels,
                                  default_layer_pairs, finding_columns, global_labels,
                                  mlcak_loss)
from _fakes import labelled_batches

CLASSES = ["Atelectasis", "Effusion", "No Finding"]
XRV_DATA = Path(importlib.util.find_spec("torchxrayvision").submodule_search_locations[0]) / "data"
TINY = dict(embed_dim=32, depth=2, num_heads=2)


def _vit(image_size: int, patch_size: int, name: str = "deit_tiny_mt", **extra):
    return create_model(name, num_classes=len(CLASSES), image_size=image_size,
                        patch_size=patch_size, **dict(TINY, **extra))


def _random_maps(batch: int, layout: TokenLayout, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, layout.tokens, layout.tokens, generator=g) * 2.0
    return scores.softmax(dim=-1)


# ---- token grids --------------------------------------------------------------------------------
@pytest.mark.parametrize("size, patch", [(224, 16), (112, 8), (56, 4), (28, 2)])
def test_every_resolution_keeps_the_14_by_14_token_grid(size, patch):
    assert patch_size_for(size) == patch
    model = create_model("deit_tiny", 3, image_size=size, patch_size=patch_size_for(size),
                         embed_dim=16, depth=1, num_heads=1)
    assert token_layout(model) == TokenLayout(1, (14, 14))
    with torch.no_grad():
        tokens = model.forward_features(torch.rand(1, 1, size, size))
    assert tokens.shape == (1, 1 + 196, 16)


def test_patch_size_for_refuses_sizes_off_the_grid():
    assert patch_size_for(64, grid=8) == 8
    with pytest.raises(ValueError, match="not divisible"):
        patch_size_for(100)


# ---- attention maps -----------------------------------------------------------------------------
def test_recorded_maps_are_the_softmax_of_qkv_and_the_model_is_restored():
    seed_everything(0)
    model = create_model("deit_tiny", 3, image_size=32, patch_size=4, **TINY).eval()
    attn = model.blocks[1].attn
    assert attn.fused_attn is True  # timm's default here: SDPA, no map
    x = torch.rand(2, 1, 32, 32)
    inputs = []
    handle = attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        fused_logits = model(x)
        with AttentionRecorder(model, [0, -1], average_heads=False) as recorder:
            assert attn.fused_attn is False and model.blocks[0].attn.fused_attn is False
            logits = model(x)
    handle.remove()
    # restored: flags back, hooks gone, the same outputs as the fused path
    assert attn.fused_attn is True and model.blocks[0].attn.fused_attn is True
    assert len(attn.attn_drop._forward_pre_hooks) == 0
    assert torch.allclose(logits, fused_logits, atol=1e-5)
    maps = recorder.maps[1]                                   # layer -1 → block 1
    assert maps.shape == (2, 2, 65, 65)                       # B, heads, 1 + 8·8 tokens
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 65), atol=1e-5)
    # by hand from the block's input: softmax(q kᵀ / √d) per head
    tokens = inputs[-1]
    qkv = attn.qkv(tokens).reshape(2, 65, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    manual = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(dim=-1)
    assert torch.allclose(maps, manual, atol=1e-5)


def test_head_averaged_maps_carry_gradient_to_the_student():
    model = create_model("deit_tiny", 3, image_size=16, patch_size=2, **TINY)
    with AttentionRecorder(model, [1]) as recorder:
        model(torch.rand(2, 1, 16, 16))
    (a,) = recorder.ordered()
    assert a.shape == (2, 65, 65)
    assert torch.allclose(a.sum(-1), torch.ones(2, 65), atol=1e-5)
    a[:, 0, 1:].pow(2).sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[1].mlp.fc1.weight.grad is None  # after the map: untouched


# ---- alignment between grids --------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(2, 2), (8, 8), (3, 5)])
def test_resized_maps_keep_row_sums_and_the_prefix_share(grid):
    source = TokenLayout(1, (4, 4))
    maps = _random_maps(3, source)
    resized = resize_attention(maps, source, grid)
    tokens = 1 + grid[0] * grid[1]
    assert resized.shape == (3, tokens, tokens)
    assert torch.allclose(resized.sum(-1), torch.ones(3, tokens), atol=1e-5)
    # the CLS row keeps its split between CLS and patches; CLS→CLS is untouched
    assert torch.allclose(resized[:, 0, 0], maps[:, 0, 0])
    assert torch.allclose(resized[:, 0, 1:].sum(-1), maps[:, 0, 1:].sum(-1), atol=1e-6)


def test_uniform_attention_stays_uniform_and_equal_grids_are_left_alone():
    source = TokenLayout(1, (4, 4))
    uniform = torch.full((1, 17, 17), 1.0 / 17)
    resized = resize_attention(uniform, source, (2, 2))
    patch_share = 16.0 / 17 / 4
    assert torch.allclose(resized[0, :, 1:], torch.full((5, 4), patch_share), atol=1e-6)
    maps = _random_maps(2, source)
    assert align_attention(maps, source, source, align="exact") is maps


def test_prefix_handling_and_refusals():
    teacher, student = TokenLayout(2, (4, 4)), TokenLayout(1, (2, 2))
    maps = _random_maps(2, teacher)
    with pytest.raises(ValueError, match="prefix"):
        align_attention(maps, teacher, student, prefix="keep")
    with pytest.raises(ValueError, match="grids differ"):
        align_attention(maps, teacher, TokenLayout(0, (2, 2)), align="exact", prefix="drop")
    aligned = align_attention(maps, teacher, student, prefix="drop")
    assert aligned.shape == (2, 4, 4)
    assert torch.allclose(aligned.sum(-1), torch.ones(2, 4), atol=1e-5)
    patches = drop_prefix(maps, teacher)
    assert torch.allclose(patches, maps[:, 2:, 2:] / maps[:, 2:, 2:].sum(-1, keepdim=True))


# ---- the global task and the loss ---------------------------------------------------------------
def test_global_label_rule_with_masks():
    target = torch.tensor([[1., 0., 0.], [0., 0., 0.], [0., 0., 0.], [0., 1., 0.], [1., 0., 0.],
                           [0., 0., 1.]])
    mask = torch.tensor([[1., 1., 1.], [1., 1., 1.], [1., 0., 1.], [0., 1., 1.], [0., 1., 1.],
                         [1., 1., 1.]])
    findings = finding_columns(CLASSES)
    assert findings.tolist() == [True, True, False]   # "No Finding" is not an abnormality
    g, m = global_labels(target, mask, findings)
    # 0: positive → abnormal; 1: all known negative → normal; 2: an unknown finding, none
    # positive → unknown; 3: unknown + known positive → abnormal; 4: the positive is unknown →
    # unknown; 5: only "No Finding" positive → normal
    assert g.tolist() == [1., 0., 0., 1., 0., 0.]
    assert m.tolist() == [1., 1., 0., 1., 0., 1.]
    g_all, _ = global_labels(target, mask)              # every column a finding
    assert g_all.tolist()[5] == 1.0


def _bce(z, y):
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_mlcak_loss_matches_the_hand_computation():
    local_s = [[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]]
    local_t = [[1.0, 0.0, 1.0], [-1.0, 1.0, 0.5]]
    glob_s, glob_t = [0.3, -0.2], [1.0, 0.4]
    target = [[1., 0., 0.], [0., 0., 0.]]
    mask = [[1., 1., 1.], [1., 0., 1.]]          # image 1: a finding unknown, none positive
    a_s = torch.tensor([[[0.5, 0.5], [0.2, 0.8]]])
    a_t = torch.tensor([[[0.7, 0.3], [0.2, 0.8]]])
    b_s = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    b_t = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    alpha, beta, gamma = 0.5, 2.0, 3.0
    local = sum(_bce(local_s[i][j], target[i][j]) * mask[i][j]
                for i in range(2) for j in range(3)) / 5
    glob = _bce(glob_s[0], 1.0)                  # image 1's global label is unknown
    local_kd = sum((local_s[i][j] - local_t[i][j]) ** 2 for i in range(2) for j in range(3)) / 6
    glob_kd = ((0.3 - 1.0) ** 2 + (-0.2 - 0.4) ** 2) / 2
    attention = (0.2 ** 2 * 2) / 4 + (1.0 * 2) / 4
    expected = local + glob + alpha * local_kd + beta * glob_kd + gamma * attention
    student = MultiTaskOutput(torch.tensor(local_s), torch.tensor(glob_s))
    teacher = MultiTaskOutput(torch.tensor(local_t), torch.tensor(glob_t))
    terms = mlcak_loss(student, torch.tensor(target), torch.tensor(mask), teacher, [a_s, b_s],
                       [a_t, b_t], alpha=alpha, beta=beta, gamma=gamma,
                       findings=torch.tensor([True, True, False]))
    assert terms.local.item() == pytest.approx(local, abs=1e-6)
    assert terms.global_.item() == pytest.approx(glob, abs=1e-6)
    assert terms.local_kd.item() == pytest.approx(local_kd, abs=1e-6)
    assert terms.global_kd.item() == pytest.approx(glob_kd, abs=1e-6)
    assert terms.attention.item() == pytest.approx(attention, abs=1e-6)
    assert terms.total.item() == pytest.approx(expected, abs=1e-5)
    alone = mlcak_loss(student, torch.tensor(target), torch.tensor(mask), None,
                       findings=torch.tensor([True, True, False]))
    assert alone.total.item() == pytest.approx(local + glob, abs=1e-6)
    # the release's own label instead: image 0 normal, image 1 abnormal, both known
    own = mlcak_loss(student, torch.tensor(target), torch.tensor(mask), None,
                     global_target=torch.tensor([0., 1.]), global_mask=torch.tensor([1., 1.]))
    assert own.global_.item() == pytest.approx((_bce(0.3, 0.0) + _bce(-0.2, 1.0)) / 2, abs=1e-6)


# ---- the global label of each release -----------------------------------------------------------
def test_nih_global_label_is_its_own_no_finding(nih_sample_root):
    from cxrstudy.data.nih import NIHDataset

    nih = NIHDataset(root=nih_sample_root, image_size=32, labels_only=True)
    raw = pd.read_csv(nih_sample_root / "Data_Entry_2017_v2020.csv", index_col=False)
    raw = raw[raw["View Position"].isin(["PA", "AP"])]
    labels = dataset_global_labels(nih)
    assert labels.rule == "no_finding" and labels.mask.all()
    assert int((labels.target == 0).sum()) == int((raw["Finding Labels"] == "No Finding").sum())
    normal_ids = set(raw.loc[raw["Finding Labels"] == "No Finding", "Image Index"])
    assert set(nih.records["image_id"][labels.target == 0]) == normal_ids
    # NIH lists "No Finding" only alone, so on NIH the any-finding rule gives the same labels
    derived = dataset_global_labels(nih, "any_finding")
    assert derived.rule == "any_finding" and np.array_equal(derived.target, labels.target)


@pytest.fixture(scope="module")
def vindr_majority():
    from cxrstudy.data.vindr import VinDrDataset

    return VinDrDataset(csv_path=XRV_DATA / "vinbigdata-train.csv.gz", labels_only=True,
                        aggregate="majority")


def _row(ds, image_id: str) -> int:
    return int(np.flatnonzero(ds.records["image_id"].to_numpy() == image_id)[0])


def test_vindr_global_label_is_its_own_no_finding(vindr_majority):
    own = dataset_global_labels(vindr_majority)
    derived = dataset_global_labels(vindr_majority, "any_finding")
    assert own.rule == "no_finding" and derived.rule == "any_finding"
    # Hand-read from the packaged file: R11 marked Calcification, R14 Cardiomegaly, R15 Lung
    # Opacity; no class has a majority, but no reader called the image normal.
    odd = _row(vindr_majority, "db49c96665f4fe0ff5f4420578e2f185")
    assert vindr_majority.labels[odd].sum() == 0
    assert (own.target[odd], own.mask[odd]) == (1.0, 1.0)
    assert derived.target[odd] == 0.0
    normal = _row(vindr_majority, "50a418190bc3fb1ef1633bf9678929b3")  # "No finding" × 3
    assert own.target[normal] == derived.target[normal] == 0.0
    # where they differ, it is always this case (abnormal by the readers, no majority class)
    differ = own.target != derived.target
    assert differ.sum() > 0 and (own.target[differ] == 1).all()


def test_vindr_physionet_no_finding_counts_global_impressions(tmp_path):
    from cxrstudy.data.labels import VINDR_GLOBAL_CLASSES, VINDR_LOCAL_CLASSES
    from cxrstudy.data.vindr import VinDrDataset

    columns = [*VINDR_LOCAL_CLASSES, *VINDR_GLOBAL_CLASSES]
    marks = lambda *names: [int(c in names) for c in columns]  # noqa: E731
    folder = tmp_path / "vindr" / "annotations"
    folder.mkdir(parents=True)
    pd.DataFrame([["aaa", "R1", *marks("Other diseases")], ["aaa", "R2", *marks("No finding")],
                  ["aaa", "R3", *marks("COPD")],
                  ["bbb", "R1", *marks("No finding")], ["bbb", "R2", *marks("No finding")],
                  ["bbb", "R3", *marks("Cardiomegaly")]],
                 columns=["image_id", "rad_id", *columns]).to_csv(
        folder / "image_labels_train.csv", index=False)
    pd.DataFrame([["ccc", *marks("Tuberculosis")]], columns=["image_id", *columns]).to_csv(
        folder / "image_labels_test.csv", index=False)
    for aggregate, expected in (("any", [1.0, 1.0, 1.0]), ("majority", [1.0, 0.0, 1.0])):
        ds = VinDrDataset(root=tmp_path / "vindr", labels_only=True, aggregate=aggregate)
        assert list(ds.records["image_id"]) == ["aaa", "bbb", "ccc"]
        own = dataset_global_labels(ds)
        # aaa: two readers marked only an impression (no local class): abnormal either way;
        # bbb: one reader of three saw cardiomegaly: abnormal by "any", normal by majority;
        # ccc: the test file's consensus row says tuberculosis
        assert own.rule == "no_finding" and own.target.tolist() == expected, aggregate
        assert dataset_global_labels(ds, "any_finding").target[[0, 2]].tolist() == [0.0, 0.0]


def test_releases_without_their_own_label_use_the_any_finding_rule(tmp_path):
    from cxrstudy.data import load_dataset
    from cxrstudy.data.chexpert import CheXpertDataset

    with gzip.open(XRV_DATA / "chexpert_train.csv.gz", "rt") as handle:
        head = [next(handle) for _ in range(41)]                  # header + 40 real rows
    (tmp_path / "train.csv").write_text("".join(head))
    chexpert = CheXpertDataset(csv_path=tmp_path / "train.csv", labels_only=True, views="all")
    labels = dataset_global_labels(chexpert)                     # asked for its own: has none
    assert labels.rule == "any_finding"
    columns = finding_columns(chexpert.classes).numpy()
    assert [c for c, f in zip(chexpert.classes, columns) if not f] == ["No Finding",
                                                                        "Support Devices"]
    positive = (chexpert.targets[:, columns] > 0.5).any(axis=1)
    known = (chexpert.masks[:, columns] > 0).all(axis=1)
    assert np.array_equal(labels.target, positive.astype(np.float32))
    assert np.array_equal(labels.mask, (positive | known).astype(np.float32))
    synthetic = load_dataset("synthetic", None, split="all", image_size=16, n_images=20,
                             n_patients=10)
    assert dataset_global_labels(synthetic).rule == "any_finding"
    with pytest.raises(ValueError, match="global_label must be one of"):
        dataset_global_labels(synthetic, "impression")


def test_trainer_reads_the_global_label_by_row():
    seed_everything(0)
    model = _vit(16, 2)
    target = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=np.float32)
    mask = np.ones(10, dtype=np.float32)
    mask[2] = 0.0
    trainer = MLCAKTrainer(model, TrainConfig(epochs=1, cpu=True, progress=False),
                           class_names=CLASSES,
                           global_label=GlobalLabels(target, mask, "no_finding"))
    batch = _batches(1, 16)[0]
    batch["index"] = torch.tensor([5, 2, 9, 0])
    trainer.training_step(batch)
    with torch.no_grad():
        logits = model.train().forward_tasks(batch["image"]).global_
    rows = [5, 2, 9, 0]
    expected = masked_bce(logits, torch.from_numpy(target[rows]), torch.from_numpy(mask[rows]))
    assert trainer.last_terms["global_"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert trainer.mlcak_settings()["global_label"] == "no_finding"
    with pytest.raises(ValueError, match="global_label has 10 rows"):
        trainer.check_rows(SimpleDataset(12))


class SimpleDataset:
    def __init__(self, n: int):
        self.n = n
        self.records = pd.DataFrame({"image_id": [str(i) for i in range(n)]})

    def __len__(self) -> int:
        return self.n


def test_default_layer_pairs_are_evenly_spaced_and_end_at_the_last_block():
    assert default_layer_pairs(12, 12) == [(3, 3), (7, 7), (11, 11)]
    assert default_layer_pairs(2, 12) == [(0, 5), (1, 11)]


# ---- the two-task model -------------------------------------------------------------------------
def test_multitask_model_modes_and_the_plain_trainer_refusal():
    model = _vit(16, 2)
    assert isinstance(model, MultiTaskClassifier) and is_multitask(model)
    x = torch.rand(2, 1, 16, 16)
    out = model.train()(x)
    assert isinstance(out, MultiTaskOutput)
    assert out.local.shape == (2, 3) and out.global_.shape == (2,)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model.forward_tasks(x).local)
    trainer = Trainer(model.train(), TrainConfig(epochs=1, progress=False, cpu=True))
    with pytest.raises(TypeError):
        trainer.training_step({"image": x, "target": torch.zeros(2, 3), "mask": torch.ones(2, 3)})


def test_add_global_head_config_rebuilds_the_same_architecture():
    plain = create_model("resnet18", 2, image_size=32)
    wrapped = add_global_head(plain)
    config = wrapped.cxr_config
    assert config["name"] == "multitask" and config["kwargs"]["backbone"] == "resnet18"
    rebuilt = create_model(config["name"], config["num_classes"], in_chans=config["in_chans"],
                           image_size=config["image_size"], **config["kwargs"])
    rebuilt.load_state_dict(wrapped.state_dict(), strict=True)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval().forward_tasks(x).global_,
                              wrapped.eval().forward_tasks(x).global_)


# ---- the trainer --------------------------------------------------------------------------------
def _batches(n: int, size: int, seed: int = 0, batch: int = 4) -> list[dict]:
    return labelled_batches(n, size, len(CLASSES), seed, batch)


def _saved_path(folder):
    """The run's checkpoint: last.pt, or best.pt where a completed run keeps only that."""
    last = folder / "last.pt"
    return last if last.is_file() else folder / "best.pt"


def _saved(folder) -> dict:
    return load_checkpoint(_saved_path(folder))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_mlcak_trainer_trains_the_student_only_and_its_checkpoint_rebuilds(tmp_path):
    from cxrstudy.train.checkpoint import load_model_from_checkpoint

    seed_everything(0)
    teacher = create_model("multitask", len(CLASSES), image_size=32, patch_size=4,
                           backbone="vit_tiny_patch16_224", **TINY).train()
    student = _vit(16, 2)
    teacher_before, student_before = _state(teacher), _state(student)
    seen = []
    teacher.backbone.patch_embed.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape)))
    config = TrainConfig(epochs=1, lr=1e-2, warmup_epochs=0, cpu=True, progress=False,
                         checkpoint_dir=str(tmp_path / "run"))
    trainer = MLCAKTrainer(student, config, class_names=CLASSES, teacher=teacher,
                           alpha=1.0, beta=1.0, gamma=1.0, teacher_input="upsampled_lr")
    history = trainer.fit(_batches(1, 16), _batches(1, 16, seed=1))
    assert history["train_loss"].notna().all()
    assert seen and all(shape[-2:] == (32, 32) for shape in seen)  # upsampled to the teacher
    assert trainer.last_terms["attention"] > 0 and trainer.last_terms["global_kd"] > 0
    # the teacher: frozen, never given a gradient, byte-identical; fused attention restored
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(block.attn.fused_attn for block in teacher.backbone.blocks)
    assert all(block.attn.fused_attn for block in student.backbone.blocks)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])}
    assert {"head_global.weight", "backbone.head.weight",
            "backbone.blocks.0.attn.qkv.weight"} <= moved
    payload = _saved(tmp_path / "run")
    assert payload["train_config"]["mlcak"] == {
        "teacher": "multitask", "teacher_image_size": 32, "teacher_input": "upsampled_lr",
        "alpha": 1.0, "beta": 1.0, "gamma": 1.0, "layer_pairs": [[0, 0], [1, 1]],
        "align": "interpolate", "prefix": "keep", "findings": ["Atelectasis", "Effusion"],
        "global_label": "any_finding"}
    assert payload["model"].keys() == student.state_dict().keys()
    rebuilt, meta = load_model_from_checkpoint(_saved_path(tmp_path / "run"))
    assert isinstance(rebuilt, MultiTaskClassifier)
    assert meta["model_config"]["name"] == "deit_tiny_mt"
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), student.eval()(x), atol=1e-6)
    preds = trainer.predict(_batches(1, 16, seed=2))
    assert preds.logits.shape == (4, 3)


def test_student_alone_and_interpolated_grids():
    seed_everything(0)
    alone = MLCAKTrainer(_vit(16, 2), TrainConfig(epochs=1, cpu=True, progress=False),
                         class_names=CLASSES)
    batch = _batches(1, 16)[0]
    loss = alone.training_step(batch)
    assert alone.last_terms["local_kd"] == 0 and alone.last_terms["attention"] == 0
    assert loss.item() == pytest.approx(float(alone.last_terms["local"]
                                              + alone.last_terms["global_"]), abs=1e-6)
    assert alone.mlcak_settings()["teacher"] is None and alone.mlcak_settings()["gamma"] == 0.0
    assert alone.mlcak_settings()["teacher_input"] is None
    # a 4×4 student grid against an 8×8 teacher: the teacher's maps are resized
    teacher = _vit(32, 4)
    student = _vit(16, 4)
    with pytest.raises(ValueError, match="grids differ"):
        MLCAKTrainer(student, TrainConfig(epochs=1, cpu=True, progress=False), teacher=teacher,
                     align="exact", teacher_input="upsampled_lr")
    trainer = MLCAKTrainer(student, TrainConfig(epochs=1, cpu=True, progress=False),
                           class_names=CLASSES, teacher=teacher, layer_pairs=[(-1, -1)],
                           teacher_input="upsampled_lr")
    trainer.training_step(batch).backward()
    assert trainer.layer_pairs == [(1, 1)] and trainer.last_terms["attention"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.blocks[1].attn.qkv.weight.grad.abs().sum() > 0


# ---- the teacher's input ------------------------------------------------------------------------
@pytest.fixture
def two_sizes():
    """The same synthetic split at 16 px (student) and 32 px (teacher), caches attached."""
    from cxrstudy.methods.mlcak.study import prepare_resolutions

    return prepare_resolutions("synthetic", None, [16, 32], seed=0, max_images=40,
                               progress=False, n_images=40, n_patients=20)


def _inputs_of(model: nn.Module) -> list[torch.Tensor]:
    """Every image batch ``model``'s patch embedding is given, from now on."""
    seen: list[torch.Tensor] = []
    model.backbone.patch_embed.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def _pair(data, teacher_input, augment, **extra):
    seed_everything(0)
    classes = data[16].classes
    teacher = create_model("deit_tiny_mt", len(classes), image_size=32, patch_size=4, **TINY)
    student = create_model("deit_tiny_mt", len(classes), image_size=16, patch_size=2, **TINY)
    trainer = MLCAKTrainer(student, TrainConfig(epochs=1, cpu=True, progress=False),
                           augment=augment, class_names=classes, teacher=teacher,
                           teacher_input=teacher_input, **extra)
    return trainer, _inputs_of(student), _inputs_of(teacher)


def _shuffled_batch(dataset, size: int = 6) -> dict:
    from cxrstudy.data.loader import BatchLoader

    loader = BatchLoader(dataset, size, shuffle=True, seed=3)
    loader.set_epoch(1)
    return next(iter(loader))


def test_high_res_teacher_gets_the_batch_rows_at_its_own_resolution(two_sizes):
    from cxrstudy.data.augment import IDENTITY, BatchAugment
    from cxrstudy.data.augment import resize_square

    low, high = two_sizes[16].train, two_sizes[32].train
    flip_all = BatchAugment(**dict(IDENTITY, hflip=1.0))          # exact: every image mirrored
    trainer, student_in, teacher_in = _pair(two_sizes, "high_res", flip_all, teacher_data=high)
    batch = _shuffled_batch(low)
    rows = batch["index"].tolist()
    assert rows != sorted(rows)                                    # not simply the first rows
    trainer.training_step(batch)
    expected = torch.stack([high[i]["image"] for i in rows]).flip(-1)
    assert teacher_in[-1].shape == (6, 1, 32, 32)
    assert torch.equal(teacher_in[-1], expected)                   # same rows, same flip
    assert torch.equal(student_in[-1], batch["image"].flip(-1))
    assert not torch.allclose(teacher_in[-1], resize_square(student_in[-1], 32), atol=1e-2)
    assert trainer.mlcak_settings()["teacher_input"] == "high_res"


def test_upsampled_teacher_input_is_the_augmented_student_batch_resized(two_sizes):
    from cxrstudy.data.augment import BatchAugment
    from cxrstudy.data.augment import resize_square

    batch = _shuffled_batch(two_sizes[16].train)
    low_res, student_low, teacher_low = _pair(two_sizes, "upsampled_lr", BatchAugment(seed=5))
    low_res.training_step(batch)
    assert teacher_low[-1].shape == (6, 1, 32, 32)
    assert torch.equal(teacher_low[-1], resize_square(student_low[-1], 32))
    assert low_res.mlcak_settings()["teacher_input"] == "upsampled_lr"
    # the student's batch is the same draw whichever input the teacher gets
    high_res, student_high, _ = _pair(two_sizes, "high_res", BatchAugment(seed=5),
                                      teacher_data=two_sizes[32].train)
    high_res.training_step(batch)
    assert torch.equal(student_high[-1], student_low[-1])


def test_high_res_teacher_input_is_checked(two_sizes):
    trainer, _, _ = _pair(two_sizes, "high_res", None, teacher_data=two_sizes[32].train)
    with pytest.raises(ValueError, match="not the training set"):
        trainer.check_rows(two_sizes[16].val)                      # another split's rows
    trainer.check_rows(two_sizes[16].train)
    with pytest.raises(ValueError, match="pass teacher_data"):
        _pair(two_sizes, "high_res", None)
    with pytest.raises(ValueError, match="16 px images but the teacher takes 32"):
        _pair(two_sizes, "high_res", None, teacher_data=two_sizes[16].train)
    with pytest.raises(TypeError, match="paired"):
        _pair(two_sizes, "high_res", lambda images: images, teacher_data=two_sizes[32].train)
    with pytest.raises(ValueError, match="teacher_input must be one of"):
        _pair(two_sizes, "original", None)


def _blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth images (a few Gaussian blobs), sampled at ``size`` px from one continuous scene."""
    g = torch.Generator().manual_seed(seed)
    centres, widths = torch.rand(n, 4, 2, generator=g) * 1.4 - 0.7, 0.1 + 0.2 * torch.rand(
        n, 4, 1, generator=g)
    axis = (torch.arange(size) + 0.5) / size * 2 - 1
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(1, 1, -1, 2)
    d2 = ((grid - centres[:, :, None, :]) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * widths ** 2)).sum(1).clamp(max=1).reshape(n, 1, size, size)


@pytest.mark.parametrize("extra", [{}, {"elastic_p": 1.0, "blur_p": 1.0}])
def test_paired_augmentation_moves_both_resolutions_alike(extra):
    from cxrstudy.data.augment import BatchAugment
    from cxrstudy.data.augment import resize_square

    low, high = _blobs(8, 16), _blobs(8, 64)
    options = dict(hflip=0.5, rotate_deg=25.0, translate=0.1, scale=(0.8, 1.2),
                   crop_scale=(0.6, 1.0), brightness=0.1, contrast=0.1, **extra)
    low_aug, high_aug = BatchAugment(seed=1, **options).paired(low, high)
    assert high_aug.shape == high.shape
    assert torch.equal(low_aug, BatchAugment(seed=1, **options)(low))   # the student's draw
    same = (resize_square(high_aug, 16) - low_aug).abs().mean()
    other = (resize_square(BatchAugment(seed=2, **options)(high), 16) - low_aug).abs().mean()
    sampling = (resize_square(high, 16) - low).abs().mean()  # the two sizes before augmenting
    # the pair stays as close as the two samplings of the scene were (an elastic field drawn
    # apart at each size would not: ~2.2 × here); another draw is ~25 × further
    assert same < 1.5 * sampling and same < 0.1 * other


def test_train_and_evaluate_runs_the_mlcak_arm_with_the_high_res_teacher(tmp_path, two_sizes):
    from cxrstudy.experiment import train_and_evaluate
    from cxrstudy.outputs import Outputs

    data = two_sizes[16]
    seed_everything(0)
    teacher = create_model("deit_tiny_mt", len(data.classes), image_size=32, patch_size=4, **TINY)
    seen = _inputs_of(teacher)
    common = dict(schedule=Schedule(epochs=1, batch_size=16, augment=True), n_boot=5,
                  progress=False, model_kwargs=dict(patch_size=2, **TINY), trainer_cls=MLCAKTrainer)
    run = train_and_evaluate("deit_tiny_mt", data, Outputs(tmp_path / "mlcak"), tag="mlcak",
                             trainer_kwargs={"teacher": teacher, "gamma": 10.0,
                                             "teacher_data": two_sizes[32].train}, **common)
    assert run.probs.shape == (len(data.test), len(data.classes))
    assert seen and all(tuple(x.shape[-2:]) == (32, 32) for x in seen)
    payload = _saved(tmp_path / "mlcak/checkpoints/mlcak")
    assert payload["train_config"]["mlcak"]["gamma"] == 10.0
    assert payload["train_config"]["mlcak"]["teacher_input"] == "high_res"
    with pytest.raises(ValueError, match="not the training set"):
        train_and_evaluate("deit_tiny_mt", data, Outputs(tmp_path / "wrong"), tag="wrong",
                           trainer_kwargs={"teacher": teacher,
                                           "teacher_data": two_sizes[32].test}, **common)
