"""The training loop every notebook uses, on Hugging Face Accelerate.

One :class:`Trainer` covers CPU, one GPU and several GPUs or machines (processes started by
:mod:`cxrstudy.train.launch`, e.g. by ``train_and_evaluate`` with ``Schedule(num_processes=4)``):
Accelerate places the model, wraps it for DDP and autocast, and splits every batch over the
processes. The loop itself is plain:

    for each batch: loss = training_step(batch); backward; clip; AdamW step; LR step; EMA update
    after each epoch: validation macro AUC → best.pt, early stopping; last.pt

Optimiser: AdamW (Loshchilov & Hutter, 2019) without weight decay on biases, norm parameters
and the model's ``no_weight_decay()`` set. Learning rate per step t of T, with W warm-up steps:

    lr(t) = lr · (t + 1) / W                                            for t < W
    lr(t) = min_lr + (lr − min_lr) · ½ · (1 + cos(π · (t − W) / (T − W)))  otherwise

EMA of the weights (timm ``ModelEmaV3``): θ_ema ← d · θ_ema + (1 − d) · θ after every step;
validation, best-checkpoint selection and :meth:`Trainer.predict` use θ_ema when it is on.

Batches are dicts with ``image`` [B,1,S,S], ``target`` [B,C], ``mask`` [B,C] (1 = known) and
``index`` [B]; any iterable of them works (a DataLoader, :class:`cxrstudy.data.loader.BatchLoader`,
a list). Subclasses override :meth:`Trainer.training_step` (e.g. knowledge distillation).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.std import tqdm as text_tqdm

from ..files import move_aside
from . import checkpoint as ckpt
from .config import _OPERATIONAL_FIELDS, TrainConfig
from .losses import masked_bce, make_loss
from .predict import Predictions, predict_batches
from .seeding import capture_rng_state, restore_rng_state, seed_everything

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_macro_auc", "lr", "seconds",
                   "images_per_s"]
# What only continuing a run needs: kept in last.pt, never in best.pt (which is read for its
# weights). An AdamW state is twice the model's size, so best.pt is a third of last.pt.
_RESUME_ONLY = ("optimizer", "scheduler", "rng", "loader_rng", "augment")



def resolve_mixed_precision(setting: str, cpu: bool = False) -> str:
    """"auto" → "bf16" on a CUDA GPU that supports it, else "no"."""
    if setting != "auto":
        return setting
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def warmup_cosine_factor(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable:
    """LR multiplier per optimiser step: linear warm-up, then cosine to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _loader_generators(loader) -> list[torch.Generator]:
    """torch generators that decide a loader's order (resumed runs restore their states)."""
    found: list[torch.Generator] = []
    candidates = [getattr(loader, "generator", None),
                  getattr(getattr(loader, "sampler", None), "generator", None),
                  getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None),
                          "generator", None),
                  getattr(loader, "synchronized_generator", None)]
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found



def freeze(module: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients, for good (the teacher is never updated)."""
    module.requires_grad_(False)
    return module.eval()


class Trainer:
    """Fit, validate, checkpoint and predict a multi-label classifier (see module docstring).

    ``loss_fn(logits, target, mask) -> scalar`` or the name of a registered loss.
    ``augment`` is applied to the image tensor on the device, in training only; when it has
    ``state_dict``/``load_state_dict`` (its own generator), checkpoints carry that state.
    ``class_names`` are stored in checkpoints so evaluation can match label spaces by name.
    Seed the model's initialisation yourself (``seed_everything`` before ``create_model``);
    ``fit`` seeds everything it draws (data order, dropout) from ``config.seed``.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None,
                 loss_fn: Callable | str = masked_bce, augment: Callable | None = None,
                 class_names: list[str] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        self.config = config or TrainConfig()
        self.loss_fn = make_loss(loss_fn) if isinstance(loss_fn, str) else loss_fn
        self.augment = augment
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.mixed_precision = resolve_mixed_precision(self.config.mixed_precision,
                                                       self.config.cpu)
        # split_batches: a DataLoader's batch is the global batch, cut into one slice per
        # process, so batch_size, the optimiser steps and the LR schedule do not depend on how
        # many processes run (and one process is unchanged).
        # Without a GPU, Accelerate joins launched processes into a (gloo) group only when told
        # the run is on the CPU; one process on the CPU is the same run either way.
        self.accelerator = Accelerator(cpu=self.config.cpu or not torch.cuda.is_available(),
                                       mixed_precision=self.mixed_precision,
                                       dataloader_config=DataLoaderConfiguration(
                                           split_batches=True))
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes != launched:
            raise RuntimeError(f"this process was launched as one of {launched} (WORLD_SIZE) but "
                               f"Accelerate sees {self.accelerator.num_processes}: each would "
                               f"train alone and overwrite the others' checkpoints")
        self.model_config = dict(getattr(model, "cxr_config", {}) or {})
        self.channels_last = bool(self.config.channels_last) and self.device.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = self._make_optimizer(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.config.compile:
            self.model = torch.compile(self.model)  # unwrap_model() still finds the module
        self.ema = None
        if self.config.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.unwrapped_model, decay=self.config.ema_decay)
        self.scheduler = None
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.best_val_macro_auc = -math.inf
        self.best_epoch = None
        self.epochs_without_improvement = 0
        self.stopped_early = False
        self._prepared_loaders: dict[int, Any] = {}

    # ---- pieces ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """The weights used for validation and prediction: EMA when on, else the live model."""
        return self.ema.module if self.ema is not None else self.unwrapped_model

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from timm.optim import param_groups_weight_decay

        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, self.config.weight_decay,
                                           no_weight_decay_list=skip)
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)

    def _make_scheduler(self, steps_per_epoch: int):
        cfg = self.config
        total = cfg.epochs * steps_per_epoch
        warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
        min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        return torch.optim.lr_scheduler.LambdaLR(base, warmup_cosine_factor(total, warmup,
                                                                            min_ratio))

    def _prepare_loader(self, loader):
        """Shard a DataLoader across processes; other iterables are used as they are.

        When several processes run, a :class:`~cxrstudy.data.loader.BatchLoader` becomes a
        DataLoader of its own batches in its own order (:func:`.sharding.split_ready_loader`) and
        Accelerate gives each process its slice of every batch. The last, incomplete batch of an
        epoch is filled up with the epoch's first rows so every process gets a slice (Accelerate's
        ``even_batches``); :meth:`predict` drops those repeats again.
        """
        if loader is None:
            return None
        key = id(loader)
        if key in self._prepared_loaders:
            return self._prepared_loaders[key][1]
        if any(loader is prepared for _, prepared in self._prepared_loaders.values()):
            return loader  # fit() hands validate() a loader it already prepared
        source = loader
        if self.accelerator.num_processes > 1 and hasattr(loader, "batch_indices"):
            from .sharding import split_ready_loader

            loader = split_ready_loader(loader)
        if isinstance(loader, torch.utils.data.DataLoader):
            self._prepared_loaders[key] = (source, self.accelerator.prepare_data_loader(loader))
            return self._prepared_loaders[key][1]
        if self.accelerator.num_processes > 1:
            raise ValueError(
                f"{type(loader).__name__} is not a torch DataLoader, so it cannot be sharded over "
                f"{self.accelerator.num_processes} processes; pass a DataLoader for multi-GPU runs")
        return loader

    def _to_device(self, batch: dict) -> dict:
        """Non-blocking copies (the loader pins host memory on CUDA); NHWC images if asked."""
        moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        image = moved.get("image")
        if self.channels_last and isinstance(image, torch.Tensor) and image.ndim == 4:
            moved["image"] = image.contiguous(memory_format=torch.channels_last)
        return moved

    def _bar(self, iterable, total, desc):
        show = self.config.progress and self.accelerator.is_local_main_process
        # A process forked from a notebook kernel cannot draw widgets (ipykernel refuses to send
        # from a fork); text bars reach the notebook through its output stream.
        bar = tqdm if self.accelerator.num_processes == 1 else text_tqdm
        return bar(iterable, total=total, desc=desc, leave=False, disable=not show,
                   dynamic_ncols=True)

    # ---- the overridable step ------------------------------------------------------------------
    def training_step(self, batch: dict) -> torch.Tensor:
        """Loss of one batch (already on the device); the model is in training mode."""
        images = batch["image"]
        if self.augment is not None:
            images = self.augment(images)
        logits = self.model(images)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"the model returned {type(logits).__name__} in training mode, not a "
                            f"logits tensor: a model with extra heads (distilled=True) needs its "
                            f"own trainer, e.g. cxrstudy.methods.mxa.distillation.DistillationTrainer")
        return self.loss_fn(logits, batch["target"], batch["mask"])

    # ---- inference -----------------------------------------------------------------------------
    def predict(self, loader: Iterable[dict], desc: str = "predict") -> Predictions:
        """Probabilities on every batch of ``loader`` (EMA weights when EMA is on), gathered from
        every process: :func:`.predict.predict_batches` under this trainer's device, precision
        and processes."""
        loader = self._prepare_loader(loader)
        total = len(loader) if hasattr(loader, "__len__") else None
        return predict_batches(self.eval_model, self._bar(loader, total, desc),
                               to_device=self._to_device, autocast=self.accelerator.autocast,
                               gather=self.accelerator.gather_for_metrics)

    def validate(self, loader) -> tuple[float, float]:
        """(masked BCE, macro AUC) on ``loader``: BCE is the task loss whatever we train with."""
        from cxrstudy.metrics import macro_auc

        preds = self.predict(loader, desc="validate")
        loss = float(masked_bce(torch.from_numpy(preds.logits), torch.from_numpy(preds.targets),
                                torch.from_numpy(preds.masks)))
        return loss, float(macro_auc(preds.targets, preds.probs, preds.masks))

    # ---- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.config.checkpoint_dir is None else Path(self.config.checkpoint_dir)

    def method_settings(self) -> dict[str, dict]:
        """What a subclass adds to the run's ``train_config`` (e.g. ``{"can": {...}}``): saved
        in every checkpoint and compared when a run resumes."""
        return {}

    def _identity(self) -> dict:
        return {"model_config": self.model_config,
                "train_config": {**self.config.run_identity(), **self.method_settings()},
                "class_names": self.class_names}

    def state_payload(self, kind: str, epoch: int, train_loader=None) -> dict:
        """Everything needed to continue this run exactly, as a weights-only dict."""
        generators = _loader_generators(train_loader) if train_loader is not None else []
        return {
            "kind": kind, "epoch": int(epoch),
            "model": self.unwrapped_model.state_dict(),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "global_step": int(self.global_step),
            "history": [dict(row) for row in self.history],
            "rng": capture_rng_state(),
            "loader_rng": [g.get_state() for g in generators],
            "augment": (self.augment.state_dict() if hasattr(self.augment, "state_dict")
                        else None),
            "model_config": self.model_config,
            "class_names": self.class_names,
            "train_config": {**self.config.to_dict(), **self.method_settings()},
            "best_val_macro_auc": float(self.best_val_macro_auc),
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": int(self.epochs_without_improvement),
            "stopped_early": bool(self.stopped_early),
        }

    def save(self, name: str, epoch: int, train_loader=None) -> Path | None:
        """Write ``checkpoint_dir/name`` (main process only)."""
        if self.checkpoint_dir is None:
            return None
        payload = self.state_payload(name.removesuffix(".pt"), epoch, train_loader)
        if name == ckpt.BEST_NAME:  # read for its weights only: no resume state
            payload.update(dict.fromkeys(_RESUME_ONLY))
        path = None
        if self.accelerator.is_main_process:
            path = ckpt.save_checkpoint(payload, self.checkpoint_dir / name)
        self.accelerator.wait_for_everyone()
        return path

    def _check_same_run(self, payload: dict, path: Path) -> None:
        """Refuse to continue a checkpoint of another model, label space or recipe."""
        stored = {"model_config": payload.get("model_config") or {},
                  "train_config": {k: v for k, v in (payload.get("train_config") or {}).items()
                                   if k not in _OPERATIONAL_FIELDS},
                  "class_names": payload.get("class_names")}
        differences = []
        for section, ours in self._identity().items():
            theirs = stored[section]
            if isinstance(ours, dict) and isinstance(theirs, dict):
                differences += [f"{section}.{k}: checkpoint {theirs.get(k)!r} vs now "
                                f"{ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                                if theirs.get(k) != ours.get(k)]
            elif theirs != ours:
                differences.append(f"{section}: checkpoint {theirs!r} vs now {ours!r}")
        if differences:
            raise ValueError(f"cannot resume from {path}: it holds a different run:\n  "
                             + "\n  ".join(differences)
                             + "\nUse another checkpoint_dir, or overwrite=True with resume=False.")

    def load_state(self, payload: dict, train_loader=None) -> None:
        """Restore model, EMA, optimiser, scheduler, counters, history and RNG from a payload."""
        self.unwrapped_model.load_state_dict(payload["model"])
        if self.ema is not None:
            if payload.get("ema") is None:
                raise ValueError("the checkpoint has no EMA weights but ema_decay is set")
            self.ema.module.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.global_step = int(payload.get("global_step", 0))
        self.history = [dict(row) for row in payload.get("history", [])]
        self.best_val_macro_auc = float(payload.get("best_val_macro_auc", -math.inf))
        self.best_epoch = payload.get("best_epoch")
        self.epochs_without_improvement = int(payload.get("epochs_without_improvement", 0))
        self.stopped_early = bool(payload.get("stopped_early", False))
        restore_rng_state(payload["rng"])
        generators = _loader_generators(train_loader) if train_loader is not None else []
        for gen, state in zip(generators, payload.get("loader_rng") or []):
            gen.set_state(state)
        if payload.get("augment") is not None and hasattr(self.augment, "load_state_dict"):
            self.augment.load_state_dict(payload["augment"])  # its own random stream

    def _load_completed(self, payload: dict) -> None:
        """Weights and the whole run's history from a completed run's checkpoint."""
        self.unwrapped_model.load_state_dict(payload["model"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.module.load_state_dict(payload["ema"])
        self.history = [dict(row) for row in payload["final_history"]]
        self.best_val_macro_auc = float(payload.get("best_val_macro_auc", -math.inf))
        self.best_epoch = payload.get("best_epoch")
        self.stopped_early = bool(payload.get("final_stopped_early", False))
        self.global_step = int(payload.get("global_step", 0))

    def _finish(self) -> None:
        """Mark the run complete in its checkpoint and drop last.pt's resume state (unless
        ``keep_last``): a completed run keeps only what evaluation reads."""
        directory = self.checkpoint_dir
        if directory is None or self.config.keep_last or not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        best, last = directory / ckpt.BEST_NAME, directory / ckpt.LAST_NAME
        done = {"completed": True, "final_epoch": len(self.history),
                "final_history": [dict(row) for row in self.history],
                "final_stopped_early": bool(self.stopped_early)}
        if best.is_file():
            ckpt.save_checkpoint({**ckpt.load_checkpoint(best), **done}, best)
            ckpt.remove_checkpoint(last)
        elif last.is_file():  # no validation, so no best.pt: last.pt holds the weights
            payload = ckpt.load_checkpoint(last)
            payload.update(dict.fromkeys(_RESUME_ONLY))
            ckpt.save_checkpoint({**payload, **done}, last)
        self.accelerator.wait_for_everyone()

    def load_best(self) -> dict:
        """Load ``best.pt``'s weights (and EMA) into this trainer's model; returns the payload."""
        if self.checkpoint_dir is None:
            raise ValueError("no checkpoint_dir is configured")
        payload = ckpt.load_checkpoint(self.checkpoint_dir / ckpt.BEST_NAME)
        self.unwrapped_model.load_state_dict(payload["model"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.module.load_state_dict(payload["ema"])
        return payload

    def _set_aside_unresumable(self, directory: Path) -> None:
        """An unfinished best.pt without last.pt (a run stopped between writing the two in its
        first epoch) cannot be continued: move it aside so this run starts afresh."""
        stale = [p for name in (ckpt.BEST_NAME, ckpt.LAST_NAME)
                 for p in (directory / name, ckpt.digest_path(directory / name)) if p.is_file()]
        self.accelerator.wait_for_everyone()  # every process has looked before the move
        if self.accelerator.is_main_process:
            target = move_aside(stale, directory / f"unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
            logger.warning("%s held %s without last.pt (a run interrupted before it could be "
                           "resumed): moved to %s; training starts afresh", directory,
                           ckpt.BEST_NAME, target)
        self.accelerator.wait_for_everyone()

    def _start(self, train_loader) -> int:
        """Resume or start fresh; returns the number of epochs already done."""
        cfg = self.config
        directory = self.checkpoint_dir
        if directory is None:
            if cfg.resume:
                raise ValueError("resume=True needs a checkpoint_dir")
        else:
            existing = ckpt.existing_checkpoints(directory)
            last = directory / ckpt.LAST_NAME
            best = directory / ckpt.BEST_NAME
            if cfg.resume and not last.is_file() and best.is_file():
                payload = ckpt.load_checkpoint(best)
                if payload.get("completed"):  # a finished run whose last.pt was dropped
                    self._check_same_run(payload, best)
                    self._load_completed(payload)
                    logger.info("%s holds a completed run: nothing to train", best)
                    return int(payload["final_epoch"])
            if cfg.resume and last.is_file():
                payload = ckpt.load_checkpoint(last)
                self._check_same_run(payload, last)
                if payload.get("completed"):
                    self._load_completed(payload)
                    return int(payload["final_epoch"])
                self.load_state(payload, train_loader)
                self._unfinished_resume = True
                logger.info("resumed from %s after epoch %d", last, payload["epoch"])
                return int(payload["epoch"])
            if existing and not cfg.resume:
                if not cfg.overwrite:
                    raise FileExistsError(
                        f"{directory} already holds checkpoints of a run "
                        f"({', '.join(p.name for p in existing)}); pass resume=True to continue "
                        f"it, overwrite=True to replace it, or choose another checkpoint_dir")
                self.accelerator.wait_for_everyone()  # every process has looked before removal
                if self.accelerator.is_main_process:
                    for path in existing:
                        ckpt.remove_checkpoint(path)
            if existing and cfg.resume:
                self._set_aside_unresumable(directory)
        seed_everything(cfg.seed, cfg.deterministic)
        self.history, self.global_step = [], 0
        self.best_val_macro_auc, self.best_epoch = -math.inf, None
        self.epochs_without_improvement, self.stopped_early = 0, False
        return 0

    # ---- training ------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable[dict], val_loader: Iterable[dict] | None = None
            ) -> pd.DataFrame:
        """Train for ``config.epochs`` (or until early stopping); returns the history table.

        History columns: epoch (1-based), train_loss (mean over images), val_loss (masked BCE),
        val_macro_auc (NaN without ``val_loader``), lr (of the epoch's last step), seconds
        (whole epoch with validation), images_per_s (training throughput, all processes).
        """
        cfg = self.config
        loader = self._prepare_loader(train_loader)
        val = self._prepare_loader(val_loader)
        try:
            steps_per_epoch = len(loader)
        except TypeError as exc:
            raise TypeError(f"the training loader ({type(train_loader).__name__}) must have a "
                            f"length: the LR schedule is defined in optimiser steps") from exc
        if steps_per_epoch == 0:
            raise ValueError("the training loader yields no batches")
        self.scheduler = self._make_scheduler(steps_per_epoch)
        self._unfinished_resume = False
        done = self._start(loader)
        if done >= cfg.epochs or self.stopped_early:
            if self._unfinished_resume:  # stopped while finishing: mark the run complete now
                self._finish()
            return self.history_frame()

        for epoch in range(done, cfg.epochs):
            started = time.perf_counter()
            row = self._train_epoch(loader, epoch, steps_per_epoch)
            if val is not None:
                row["val_loss"], row["val_macro_auc"] = self.validate(val)
                improved = row["val_macro_auc"] > self.best_val_macro_auc  # NaN never improves
                if improved:
                    self.best_val_macro_auc, self.best_epoch = row["val_macro_auc"], epoch + 1
                    self.epochs_without_improvement = 0
                else:
                    self.epochs_without_improvement += 1
                patience = cfg.early_stopping_patience
                self.stopped_early = (patience is not None
                                      and self.epochs_without_improvement >= patience
                                      and epoch + 1 < cfg.epochs)
            else:
                row["val_loss"] = row["val_macro_auc"] = float("nan")
                improved = False
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            self._report(row)
            # best.pt before last.pt: stopped between the two, the rerun repeats this epoch from
            # the previous last.pt and rewrites best.pt (with no last.pt yet, best.pt is set
            # aside and the run restarts); the other order would resume believing a best.pt
            # that was never written
            if improved:
                self.save(ckpt.BEST_NAME, epoch + 1, loader)
            self.save(ckpt.LAST_NAME, epoch + 1, loader)
            if self.stopped_early:
                logger.info("early stopping after epoch %d: no better validation macro AUC "
                            "for %d epochs", epoch + 1, cfg.early_stopping_patience)
                break
        self._finish()
        return self.history_frame()

    def _train_epoch(self, loader, epoch: int, steps_per_epoch: int) -> dict[str, Any]:
        cfg = self.config
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if self.accelerator.num_processes > 1:
            self._seed_augment_per_process(epoch)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        images = 0
        lr = self.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        bar = self._bar(loader, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        for step, batch in enumerate(bar):
            batch = self._to_device(batch)
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.training_step(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at epoch "
                                         f"{epoch + 1}, step {step + 1}")
            self.accelerator.backward(loss)
            if cfg.grad_clip is not None:
                self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            if self.ema is not None:
                self.ema.update(self.unwrapped_model, step=self.global_step)
            size = batch["image"].shape[0]
            loss_sum += loss.detach().double() * size
            images += size
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                running = loss_sum.item() / max(images, 1)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
                if not cfg.progress:
                    logger.info("epoch %d step %d/%d loss %.4f lr %.2e", epoch + 1, step + 1,
                                steps_per_epoch, running, lr)
        seconds = time.perf_counter() - started  # training only, for the throughput
        totals = torch.stack([loss_sum, torch.tensor(float(images), dtype=torch.float64,
                                                     device=self.device)])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return {"epoch": epoch + 1, "train_loss": float(totals[0] / totals[1].clamp_min(1)),
                "lr": float(lr),
                "images_per_s": float(totals[1]) / seconds if seconds > 0 else float("nan")}

    def _seed_augment_per_process(self, epoch: int) -> None:
        """Several processes: give each its own augmentation stream, fixed by (seed, epoch,
        process). Copies of one seeded stream would transform the processes' slices of a global
        batch alike; seeding at each epoch start keeps a run resumed from last.pt exact."""
        generator = getattr(self.augment, "generator", None)
        if isinstance(generator, torch.Generator):
            entropy = [int(self.config.seed), int(epoch), int(self.accelerator.process_index)]
            generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def _report(self, row: dict) -> None:
        line = (f"epoch {row['epoch']}/{self.config.epochs}: train_loss {row['train_loss']:.4f}"
                f"  val_loss {row['val_loss']:.4f}  val_macro_auc {row['val_macro_auc']:.4f}"
                f"  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s")
        logger.info(line)
        if self.config.progress and self.accelerator.is_local_main_process:
            tqdm.write(line)

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history, columns=HISTORY_COLUMNS)


__all__ = ["freeze", "TrainConfig", "Trainer", "Predictions", "resolve_mixed_precision",
           "warmup_cosine_factor", "HISTORY_COLUMNS"]
