"""Data-parallel training (DDP through HF Accelerate) on the CPU: two gloo processes forked from a
fresh process, as from a notebook kernel, train one arm and write what a one-process run writes.

The arm: a tiny convolution without batch norm on synthetic 16-px images, 70 training images in
global batches of 14 (5 full batches, so no image is repeated to even out the last one), 2 epochs,
no augmentation. Each process computes the loss of its 7 images; DDP averages the two gradients,
which is the one-process gradient of the 14, up to the order of float additions. Measured
difference between the two runs: ~1e-7 on test probabilities and losses, identical macro AUC
(the test allows 1e-5). Models with batch norm differ more (statistics per process's slice: 7e-3
on probabilities, 1e-3 on macro AUC, measured with one BatchNorm2d), as do training sets that are
not a multiple of the batch (the last batch is filled up with the epoch's first images).
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrstudy.data.loader import BatchLoader
from cxrstudy.models import register_model
from cxrstudy.train import load_checkpoint
from cxrstudy.train.launch import LaunchPlan, launch, plan_launch
from cxrstudy.train.sharding import split_ready_loader

SIZE, IMAGES, BATCH = 16, 100, 14  # synthetic splits: 70 train, 10 validation, 20 test
ARM = dict(n_boot=20, progress=False, cpu=True, seed=3)
RECIPE = dict(epochs=2, batch_size=BATCH, lr=0.01, augment=False)


class PlainCNN(nn.Module):
    """Convolution → ReLU → 2×2 pooling → linear: no batch norm, no dropout."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


@register_model("test_ddp_cnn", overwrite=True)
def build_plain_cnn(num_classes, in_chans, image_size, pretrained=False, **kwargs):
    return PlainCNN(num_classes)


def _train_on_two_then_one(root: str) -> None:
    """The notebook's side: the same arm with num_processes=2, then 1 (a launch must come before
    any Accelerator exists in this process, as in a fresh kernel)."""
    from cxrstudy.experiment import prepare_data, train_and_evaluate
    from cxrstudy.outputs import Outputs
    from cxrstudy.tables import run_metrics
    from cxrstudy.train import Schedule

    data = prepare_data("synthetic", image_size=SIZE, seed=0, n_images=IMAGES, progress=False)
    assert (len(data.train), len(data.val), len(data.test)) == (70, 10, 20)
    for processes in (2, 1):
        out = Outputs(Path(root) / f"{processes}_processes")
        schedule = Schedule(num_processes=processes, **RECIPE)
        run = train_and_evaluate("test_ddp_cnn", data, out, schedule, tag="arm", **ARM)
        out.save_metrics(runs=run_metrics({"arm": run}))
        (out.root / "model_device.txt").write_text(str(next(run.model.parameters()).device))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Both runs in a fresh (spawned) Python process: this pytest process may already hold the
    Accelerator state of other tests, which Accelerate's launcher refuses to fork from."""
    root = tmp_path_factory.mktemp("ddp")
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_train_on_two_then_one, args=(str(root),))
    # The child inherits the environment at start: its own cache folder, and one thread per
    # process (two processes on a small CPU would otherwise oversubscribe its cores).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CXRSTUDY_CACHE_DIR", str(root / "cache"))
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        process.start()
    process.join(timeout=600)
    if process.is_alive():
        process.kill()
        pytest.fail("the data-parallel comparison did not finish within 10 minutes")
    assert process.exitcode == 0, "the data-parallel comparison failed (its traceback is above)"
    return root / "2_processes", root / "1_processes"


def test_two_processes_write_one_checkpoint_in_the_one_process_format(two_runs):
    ddp, single = two_runs
    for run in two_runs:
        assert sorted(p.name for p in (run / "checkpoints" / "arm").iterdir()) == ["best.pt", "best.pt.sha256"]
        assert (run / "tables" / "history_arm.csv").is_file()
        assert (run / "predictions" / "arm.npz").is_file()
    ours = load_checkpoint(ddp / "checkpoints" / "arm" / "best.pt")
    theirs = load_checkpoint(single / "checkpoints" / "arm" / "best.pt")
    assert ours["completed"] and theirs["completed"]
    assert set(ours) == set(theirs)
    assert ({k: v for k, v in ours["train_config"].items() if k != "checkpoint_dir"}
            == {k: v for k, v in theirs["train_config"].items() if k != "checkpoint_dir"})
    assert ours["epoch"] == theirs["epoch"] and ours["final_epoch"] == 2
    for name, tensor in theirs["model"].items():  # no "module." prefix from the DDP wrapper
        assert torch.allclose(ours["model"][name], tensor, atol=1e-5), name
    assert (ddp / "model_device.txt").read_text() == "cpu"  # the notebook's copy of the weights


def test_two_processes_match_one_process_of_the_same_seed(two_runs):
    ddp, single = two_runs
    ours = pd.read_csv(ddp / "tables" / "history_arm.csv")
    theirs = pd.read_csv(single / "tables" / "history_arm.csv")
    assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs) == 2
    assert np.array_equal(ours["lr"], theirs["lr"])  # the same optimiser steps
    for column in ("train_loss", "val_loss", "val_macro_auc"):
        assert np.allclose(ours[column], theirs[column], atol=1e-5), column

    ours, theirs = (np.load(run / "predictions" / "arm.npz", allow_pickle=True) for run in two_runs)
    assert set(ours.files) == set(theirs.files)
    assert ours["probs"].shape == theirs["probs"].shape == (20, theirs["targets"].shape[1])
    # every test image once (the 6 padding rows of the last batch dropped), in the same order
    assert np.array_equal(ours["image_ids"], theirs["image_ids"])
    assert np.array_equal(ours["targets"], theirs["targets"])
    assert np.abs(ours["probs"] - theirs["probs"]).max() < 1e-5

    ours = json.loads((ddp / "metrics.json").read_text())["runs"]["arm"]
    theirs = json.loads((single / "metrics.json").read_text())["runs"]["arm"]
    assert set(ours) == set(theirs) and ours["best_epoch"] == theirs["best_epoch"]
    assert abs(ours["overall"]["macro_auc"] - theirs["overall"]["macro_auc"]) < 1e-5


def test_split_ready_loader_yields_the_batch_loaders_batches_epoch_by_epoch():
    """What Accelerate splits must be BatchLoader's own order, not torch's shuffle."""
    from cxrstudy.data import load_dataset

    dataset = load_dataset("synthetic", split="all", image_size=SIZE, n_images=30, seed=0)
    ours = BatchLoader(dataset, batch_size=8, shuffle=True, seed=5)
    theirs = split_ready_loader(BatchLoader(dataset, batch_size=8, shuffle=True, seed=5))
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        theirs.batch_sampler.sampler.set_epoch(epoch)  # where Accelerate passes the epoch
        pairs = list(zip(ours, theirs, strict=True))
        assert [len(b["index"]) for b, _ in pairs] == [8, 8, 8, 6]
        for a, b in pairs:
            assert set(a) == set(b) and torch.equal(a["index"], b["index"])
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(pairs[0][0]["index"], torch.arange(8))  # shuffled


def test_launch_plan_from_num_processes_or_an_accelerate_config(tmp_path):
    assert not plan_launch(1).distributed and plan_launch(4).world_size == 4
    config = tmp_path / "two_nodes.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 16\n"
                      "machine_rank: 1\nmain_process_ip: 10.0.0.1\nmain_process_port: 29555\n")
    plan = plan_launch(accelerate_config=config)
    assert plan == LaunchPlan(num_processes=8, num_machines=2, machine_rank=1,
                              main_process_ip="10.0.0.1", main_process_port=29555)
    assert plan.world_size == 16
    config.write_text("num_machines: 2\nnum_processes: 3\nmain_process_port: 1\n")
    with pytest.raises(ValueError, match="not a multiple"):
        plan_launch(accelerate_config=config)
    with pytest.raises(FileNotFoundError, match="accelerate config"):
        plan_launch(accelerate_config=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="main_process_port"):
        LaunchPlan(num_processes=2, num_machines=2)
    with pytest.raises(ValueError, match="machine_rank"):
        LaunchPlan(num_processes=2, num_machines=2, machine_rank=2, main_process_port=1)


def test_launches_that_cannot_work_are_refused_before_forking(monkeypatch):
    with pytest.raises(ValueError, match="accelerate launch"):  # one process on each machine
        launch(print, plan=LaunchPlan(num_processes=1, num_machines=2, main_process_port=29555))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already used CUDA"):
        launch(print, plan=LaunchPlan(num_processes=2))
