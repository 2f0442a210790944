"""Trainer mechanics on CPU with a tiny CNN and fabricated 16-px images."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrstudy.models import create_model, register_model
from cxrstudy.train import (HISTORY_COLUMNS, TrainConfig, Trainer, launch, load_checkpoint,
                            plan_launch, resolve_mixed_precision, seed_everything)
from cxrstudy.train.trainer import warmup_cosine_factor

SIZE, CLASSES = 16, 3
TIMING = ["seconds", "images_per_s"]


class TinyCNN(nn.Module):
    """Conv → dropout → 2×2 pooling keeps where the bright square was; no batch norm."""

    def __init__(self, num_classes, in_chans):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.drop(torch.relu(self.conv(x)))).flatten(1))


@register_model("test_trainer_cnn", overwrite=True)
def build_tiny_cnn(num_classes, in_chans, image_size, pretrained=False, **kwargs):
    return TinyCNN(num_classes, in_chans)


class BrightSquares(torch.utils.data.Dataset):
    """Class c present ⇔ a bright square in quadrant c; a few labels unknown (mask 0)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.target = (torch.rand(n, CLASSES, generator=g) > 0.5).float()
        self.image = 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=g)
        half = SIZE // 2
        for c, (r, col) in enumerate([(0, 0), (0, half), (half, 0)]):
            bright = 0.6 * self.target[:, c, None, None, None]
            self.image[:, :, r:r + half, col:col + half] += bright
        self.mask = torch.ones(n, CLASSES)
        self.mask[::7, 2] = 0.0

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):
        return {"image": self.image[i], "target": self.target[i], "mask": self.mask[i],
                "index": i}


def loader(n=48, seed=0, shuffle=True, batch_size=8):
    return torch.utils.data.DataLoader(BrightSquares(n, seed), batch_size=batch_size,
                                       shuffle=shuffle)


def new_model(seed=0):
    seed_everything(seed)
    return create_model("test_trainer_cnn", num_classes=CLASSES, image_size=SIZE)


def config(**overrides):
    base = dict(epochs=2, lr=0.05, weight_decay=0.01, warmup_epochs=0.5, min_lr=1e-4,
                progress=False, cpu=True, seed=7)
    return TrainConfig(**{**base, **overrides})


def without_timing(history: pd.DataFrame) -> pd.DataFrame:
    return history.drop(columns=TIMING)


def test_fit_learns_and_reports_history():
    trainer = Trainer(new_model(), config(epochs=4), class_names=["a", "b", "c"])
    history = trainer.fit(loader(), loader(24, seed=1, shuffle=False))
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_macro_auc"].iloc[-1] > 0.8  # the squares are easy to see
    assert (history["images_per_s"] > 0).all() and (history["seconds"] > 0).all()
    # cosine decay: the last epoch ends near min_lr, far below the peak
    assert history["lr"].iloc[-1] < 0.05 * 0.1


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine():
    factor = warmup_cosine_factor(total_steps=12, warmup_steps=4, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    # halfway through the cosine part: min + (1 − min)/2
    assert factor(8) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(12) == pytest.approx(0.1)


def test_same_seed_gives_identical_runs():
    runs = []
    for _ in range(2):
        trainer = Trainer(new_model(), config(ema_decay=0.9))
        history = trainer.fit(loader(), loader(24, seed=1, shuffle=False))
        runs.append((without_timing(history), trainer.unwrapped_model.state_dict()))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0], check_exact=True)
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][key]), key


class Interruptible:
    """A plain iterable of batches that raises KeyboardInterrupt inside epoch ``stop_in``."""

    def __init__(self, inner, stop_in=None):
        self.inner, self.stop_in, self.epochs = inner, stop_in, 0

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        self.epochs += 1
        for i, batch in enumerate(self.inner):
            if self.epochs == self.stop_in and i == 1:
                raise KeyboardInterrupt("simulated interruption")
            yield batch


class NoiseAugment:
    """An augmentation with its own random stream (like cxrstudy.data.augment.BatchAugment)."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images):
        return images + 0.1 * torch.randn(images.shape, generator=self.generator)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    settings = dict(epochs=3, ema_decay=0.8)
    straight = Trainer(new_model(), config(**settings, checkpoint_dir=tmp_path / "straight"),
                       augment=NoiseAugment())
    expected = straight.fit(Interruptible(loader()), loader(24, seed=1, shuffle=False))

    run_dir = tmp_path / "interrupted"
    first = Trainer(new_model(), config(**settings, checkpoint_dir=run_dir),
                    augment=NoiseAugment())
    with pytest.raises(KeyboardInterrupt):
        first.fit(Interruptible(loader(), stop_in=2), loader(24, seed=1, shuffle=False))
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1

    resumed = Trainer(new_model(seed=99), config(**settings, checkpoint_dir=run_dir,
                                                 resume=True), augment=NoiseAugment(seed=5))
    history = resumed.fit(Interruptible(loader()), loader(24, seed=1, shuffle=False))

    pd.testing.assert_frame_equal(without_timing(history), without_timing(expected),
                                  check_exact=False, rtol=0, atol=1e-6)
    for ours, theirs in [(resumed.unwrapped_model, straight.unwrapped_model),
                         (resumed.ema.module, straight.ema.module)]:
        for key, value in theirs.state_dict().items():
            assert torch.allclose(ours.state_dict()[key], value, rtol=0, atol=1e-6), key

    # resuming a finished run trains nothing more and keeps its history
    again = Trainer(new_model(), config(**settings, checkpoint_dir=run_dir, resume=True))
    pd.testing.assert_frame_equal(again.fit(loader()), history)


def test_checkpoints_hold_what_rebuilding_and_resuming_need(tmp_path):
    trainer = Trainer(new_model(), config(checkpoint_dir=tmp_path, keep_last=True),
                      class_names=["a", "b", "c"])
    trainer.fit(loader(), loader(24, seed=1, shuffle=False))
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert last["model_config"] == {"name": "test_trainer_cnn", "num_classes": 3, "in_chans": 1,
                                    "image_size": SIZE, "kwargs": {}, "pretrained": False,
                                    "input_norm": "none"}
    assert last["class_names"] == ["a", "b", "c"]
    assert last["train_config"]["lr"] == 0.05 and last["ema"] is None
    for key, value in trainer.unwrapped_model.state_dict().items():
        assert torch.equal(last["model"][key], value)
    best = load_checkpoint(tmp_path / "best.pt")
    aucs = [row["val_macro_auc"] for row in last["history"]]
    assert best["epoch"] == int(np.argmax(aucs)) + 1
    assert best["best_val_macro_auc"] == pytest.approx(max(aucs))
    trainer.load_best()
    for key, value in best["model"].items():
        assert torch.equal(trainer.unwrapped_model.state_dict()[key], value)
    # the resume state lives in last.pt only: best.pt is read for its weights
    assert last["optimizer"]["state"] and last["rng"] is not None
    assert best["optimizer"] is None and best["rng"] is None and best["scheduler"] is None


def test_a_completed_run_keeps_only_best_pt_and_resumes_to_the_same_result(tmp_path):
    trainer = Trainer(new_model(), config(checkpoint_dir=tmp_path), class_names=["a", "b", "c"])
    history = trainer.fit(loader(), loader(24, seed=1, shuffle=False))
    assert not (tmp_path / "last.pt").exists()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["completed"] and best["final_epoch"] == 2 and best["optimizer"] is None
    assert [row["epoch"] for row in best["final_history"]] == [1, 2]
    # a full checkpoint is about three times the slim one (AdamW keeps two moments per weight)
    full = tmp_path / "full"
    Trainer(new_model(), config(checkpoint_dir=full, keep_last=True)).fit(
        loader(), loader(24, seed=1, shuffle=False))
    assert (full / "last.pt").stat().st_size > 2.5 * (tmp_path / "best.pt").stat().st_size

    class Untrainable(Trainer):
        def training_step(self, batch):
            raise AssertionError("a completed run must not train again")

    again = Untrainable(new_model(seed=7), config(checkpoint_dir=tmp_path, resume=True),
                        class_names=["a", "b", "c"])
    pd.testing.assert_frame_equal(again.fit(loader(), loader(24, seed=1, shuffle=False)), history)
    trainer.load_best()
    for key, value in trainer.unwrapped_model.state_dict().items():
        assert torch.equal(again.unwrapped_model.state_dict()[key], value), key


def test_without_validation_last_pt_stays_without_its_resume_state(tmp_path):
    history = Trainer(new_model(), config(epochs=1, checkpoint_dir=tmp_path)).fit(loader())
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["completed"] and last["optimizer"] is None and not (tmp_path / "best.pt").exists()
    again = Trainer(new_model(), config(epochs=1, checkpoint_dir=tmp_path, resume=True))
    pd.testing.assert_frame_equal(again.fit(loader()), history)


def test_an_existing_run_is_never_silently_replaced(tmp_path):
    Trainer(new_model(), config(epochs=1, checkpoint_dir=tmp_path)).fit(loader())
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(new_model(), config(epochs=1, checkpoint_dir=tmp_path)).fit(loader())
    with pytest.raises(ValueError, match=r"train_config\.lr"):
        Trainer(new_model(), config(epochs=1, lr=0.01, checkpoint_dir=tmp_path,
                                    resume=True)).fit(loader())
    before = load_checkpoint(tmp_path / "last.pt")["model"]["head.weight"]
    Trainer(new_model(seed=3), config(epochs=1, checkpoint_dir=tmp_path,
                                      overwrite=True)).fit(loader())
    after = load_checkpoint(tmp_path / "last.pt")["model"]["head.weight"]
    assert not torch.equal(before, after)


def test_early_stopping_after_patience_epochs_without_a_better_auc(tmp_path):
    # lr = 0 keeps the weights (and so the validation AUC) fixed: only epoch 1 is "best"
    trainer = Trainer(new_model(), config(epochs=10, lr=0.0, min_lr=0.0,
                                          early_stopping_patience=2, checkpoint_dir=tmp_path))
    history = trainer.fit(loader(), loader(24, seed=1, shuffle=False))
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["val_macro_auc"].nunique() == 1
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 1
    assert best["final_stopped_early"] and best["final_epoch"] == 3


def test_predict_uses_ema_weights_and_keeps_loader_order():
    trainer = Trainer(new_model(), config(epochs=1, ema_decay=0.5))
    trainer.fit(loader())
    data = BrightSquares(20, seed=4)
    preds = trainer.predict(loader(20, seed=4, shuffle=False, batch_size=6))
    assert preds.probs.shape == (20, CLASSES) and len(preds) == 20
    assert preds.indices.tolist() == list(range(20))
    assert np.array_equal(preds.targets, data.target.numpy())
    assert np.array_equal(preds.masks, data.mask.numpy())
    with torch.no_grad():
        ema_probs = torch.sigmoid(trainer.ema.module.eval()(data.image)).numpy()
        live_probs = torch.sigmoid(trainer.unwrapped_model.eval()(data.image)).numpy()
    assert np.allclose(preds.probs, ema_probs, atol=1e-6)
    assert not np.allclose(preds.probs, live_probs, atol=1e-4)


def test_augment_runs_on_training_batches_only():
    seen = []

    def augment(images):
        seen.append(tuple(images.shape))
        return images.flip(-1)

    trainer = Trainer(new_model(), config(epochs=1), augment=augment)
    trainer.fit(loader(48, batch_size=8))
    assert seen == [(8, 1, SIZE, SIZE)] * 6
    trainer.predict(loader(16, shuffle=False))
    assert len(seen) == 6


def test_subclasses_replace_the_training_step():
    class ConstantLoss(Trainer):
        def training_step(self, batch):
            self.calls = getattr(self, "calls", 0) + 1
            return (self.model(batch["image"]) * 0).sum() + 3.0

    trainer = ConstantLoss(new_model(), config(epochs=1))
    history = trainer.fit(loader(40, batch_size=8))
    assert trainer.calls == 5
    assert history["train_loss"].tolist() == [3.0]


def test_any_sized_iterable_of_batch_dicts_trains():
    batches = list(loader(32, batch_size=8))
    history = Trainer(new_model(), config(epochs=2)).fit(batches, batches)
    assert len(history) == 2 and not math.isnan(history["val_macro_auc"].iloc[-1])
    with pytest.raises(TypeError, match="must have a length"):
        Trainer(new_model(), config(epochs=1)).fit(iter(batches))


def test_launch_runs_the_function_with_its_arguments():
    calls = []
    launch(lambda a, b: calls.append((a, b)), args=(2, "x"), plan=plan_launch(1))
    assert calls == [(2, "x")]  # one process: run in place


def test_config_is_checked_and_precision_resolved():
    assert resolve_mixed_precision("auto", cpu=True) == "no"
    assert resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        Trainer(new_model(), config(resume=True)).fit(loader())


def test_speed_options_change_nothing_a_resumed_run_must_share(tmp_path):
    # channels_last and compile change how fast a step runs, not what it computes: a run
    # interrupted with them may resume without them, and on the CPU channels_last is not used
    assert not {"channels_last", "compile"} & set(config().run_identity())
    trainer = Trainer(new_model(), config(channels_last=True))
    assert trainer.channels_last is False  # CPU: NHWC only helps cuDNN
    batch = trainer._to_device(next(iter(loader())))
    assert batch["image"].is_contiguous()  # left NCHW
    first = Trainer(new_model(), config(checkpoint_dir=tmp_path))
    with pytest.raises(KeyboardInterrupt):
        first.fit(Interruptible(loader(), stop_in=2))
    resumed = Trainer(new_model(), config(checkpoint_dir=tmp_path, resume=True,
                                          channels_last=True))
    history = resumed.fit(Interruptible(loader()))
    assert list(history["epoch"]) == [1, 2]  # epoch 1 came from the checkpoint


class _Killed(BaseException):
    """Stands for a kill (SIGKILL, OOM): nothing after it runs, no handler catches it."""


def test_a_run_stopped_at_any_checkpoint_write_resumes_or_restarts_to_the_same_result(
        tmp_path, monkeypatch):
    """Stop the run before each file operation of its checkpoints in turn (each .pt, each
    .sha256, the final removal of last.pt), then rerun as train_and_evaluate does
    (resume=True): every rerun completes and matches an uninterrupted run."""
    from cxrstudy.train import checkpoint as ckpt

    def fit(run_dir):
        trainer = Trainer(new_model(), config(checkpoint_dir=run_dir, resume=True))
        return trainer, trainer.fit(loader(), loader(24, seed=1, shuffle=False))

    real_atomic_path, real_remove = ckpt.atomic_path, ckpt.remove_checkpoint
    steps = {"done": 0, "stop_at": None}

    def step():
        steps["done"] += 1
        if steps["done"] == steps["stop_at"]:
            raise _Killed(f"stopped before file operation {steps['done']}")

    def counted_atomic_path(path, **kwargs):
        step()
        return real_atomic_path(path, **kwargs)

    def counted_remove(path):
        step()
        real_remove(path)

    monkeypatch.setattr(ckpt, "atomic_path", counted_atomic_path)
    monkeypatch.setattr(ckpt, "remove_checkpoint", counted_remove)
    straight, expected = fit(tmp_path / "straight")
    operations = steps["done"]
    assert operations >= 9  # two epochs: best.pt, last.pt (each with its .sha256), finishing

    for stop_at in range(1, operations + 1):
        run_dir = tmp_path / f"stopped_at_{stop_at}"
        steps.update(done=0, stop_at=stop_at)
        with pytest.raises(_Killed):
            fit(run_dir)
        steps.update(stop_at=None)
        rerun, history = fit(run_dir)
        pd.testing.assert_frame_equal(without_timing(history), without_timing(expected),
                                      check_exact=False, rtol=0, atol=1e-6)
        for key, value in straight.unwrapped_model.state_dict().items():
            assert torch.allclose(rerun.unwrapped_model.state_dict()[key], value, rtol=0,
                                  atol=1e-6), (stop_at, key)
        assert not (run_dir / "last.pt").exists(), stop_at  # finished like an uninterrupted run
        assert load_checkpoint(run_dir / "best.pt")["completed"], stop_at


def test_an_unfinished_best_pt_without_last_pt_is_set_aside_and_the_run_restarts(tmp_path,
                                                                                caplog):
    """What a kill between the first epoch's best.pt and last.pt leaves."""
    first = Trainer(new_model(), config(epochs=1, checkpoint_dir=tmp_path, keep_last=True))
    first.fit(loader(), loader(24, seed=1, shuffle=False))
    (tmp_path / "last.pt").unlink()
    (tmp_path / "last.pt.sha256").unlink()
    stale = (tmp_path / "best.pt").read_bytes()
    rerun = Trainer(new_model(), config(epochs=1, checkpoint_dir=tmp_path, resume=True))
    with caplog.at_level("WARNING", logger="cxrstudy.train.trainer"):
        rerun.fit(loader(), loader(24, seed=1, shuffle=False))
    moved = list(tmp_path.glob("unfinished-*/best.pt"))
    assert len(moved) == 1 and moved[0].read_bytes() == stale
    assert (moved[0].parent / "best.pt.sha256").is_file()
    assert any("starts afresh" in r.getMessage() and str(moved[0].parent) in r.getMessage()
               for r in caplog.records)
    assert load_checkpoint(tmp_path / "best.pt")["completed"]
