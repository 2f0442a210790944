"""Training, shared by every method: the schedule, losses, the Accelerate-based :class:`Trainer`, checkpoints and seeding.

>>> schedule = Schedule(epochs=5, lr=1e-4)      # what a notebook declares (see .config)
>>> trainer = Trainer(model, schedule.train_config(checkpoint_dir="runs/a"),
...                   class_names=ds.classes)
>>> history = trainer.fit(train_loader, val_loader)
>>> preds = trainer.predict(test_loader)      # probs, targets, masks, indices

Each paper's own trainer and loss live in its home, :mod:`cxrstudy.methods` (e.g.
``methods.mlcak.training.MLCAKTrainer``).
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Schedule, TrainConfig
from .losses import LOSSES, list_losses, make_loss, masked_bce, register_loss
from . import imbalance_losses  # noqa: E402,F401  (registers focal, weighted_bce, asl, can_balance)
from .seeding import capture_rng_state, restore_rng_state, seed_everything
from .launch import launch, plan_launch
from .trainer import HISTORY_COLUMNS, Predictions, Trainer, resolve_mixed_precision

__all__ = ["Trainer", "TrainConfig", "Schedule", "Predictions", "launch", "plan_launch",
           "resolve_mixed_precision", "HISTORY_COLUMNS", "masked_bce", "make_loss",
           "register_loss", "list_losses", "LOSSES", "save_checkpoint", "load_checkpoint",
           "seed_everything", "capture_rng_state", "restore_rng_state"]
