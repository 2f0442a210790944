"""How a model is trained, said once: :class:`Schedule` (what every training notebook declares)
and :class:`TrainConfig` (what the :class:`~cxrstudy.train.Trainer` runs, built from it).

A notebook's parameters cell declares every field of :class:`Schedule` under the same name, so a
profile or ``-p min_lr=1e-5`` reaches every training notebook alike, and the notebook builds the
schedule in one call::

    schedule = Schedule.from_parameters(globals())
    run = train_and_evaluate("resnet18", data, out, schedule, seed=seed)

"Off" is spelled ``None`` everywhere (notebooks, profiles as ``null``, both classes):
``ema_decay=None`` (no model EMA), ``early_stopping_patience=None`` (train every epoch),
``grad_clip=None`` (no clipping). Zero is not "off": ``grad_clip=0`` would zero every gradient
and ``ema_decay=0`` is no average, so both are refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Schedule:
    """The training recipe a notebook gives all its models, and how the work is spread.

    Recipe: ``epochs``, global ``batch_size``, AdamW ``lr`` and ``weight_decay``, linear warm-up
    over ``warmup_epochs`` (may be fractional) then cosine to ``min_lr``, ``ema_decay`` of the
    weights' moving average, ``early_stopping_patience`` (epochs without a higher validation
    macro AUC), ``grad_clip`` (global gradient norm), ``augment`` (the study's batch
    augmentation) with ``augment_options`` (changes to its defaults, e.g. ``{"elastic_p": 0.6}``).
    Spread: ``num_workers`` loader processes, ``num_processes`` data-parallel processes, or an
    ``accelerate_config`` file for several machines (see :mod:`cxrstudy.train.launch`).
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    ema_decay: float | None = None
    early_stopping_patience: int | None = None
    grad_clip: float | None = 1.0
    augment: bool = True
    augment_options: Mapping[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    num_processes: int = 1
    accelerate_config: str | None = None

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not isinstance(self.augment, bool):
            raise TypeError(f"augment must be True or False (options go in augment_options), "
                            f"got {self.augment!r}")
        if not isinstance(self.augment_options, Mapping):
            raise TypeError(f"augment_options must be a mapping, got {self.augment_options!r}")
        if self.augment_options:
            from ..data.augment import from_config

            from_config(dict(self.augment_options))  # unknown keys are refused here, not mid-run
        self.train_config()  # the recipe's own checks (epochs, lr, ema_decay, ...)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The parameter names every training notebook declares."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> Schedule:
        """The schedule a notebook's parameters declare: in a notebook, ``globals()`` is the
        table of its variables, so this reads the fields of :meth:`keys` set by the parameters
        cell (or by a profile or ``-p``, which papermill injects after it). Every field must be
        there, so no notebook trains on a default it never showed."""
        missing = [key for key in cls.keys() if key not in parameters]
        if missing:
            raise KeyError(f"the parameters do not declare the schedule keys {missing}; "
                           f"a training notebook declares all of {list(cls.keys())}")
        return cls(**{key: parameters[key] for key in cls.keys()})

    def describe(self) -> str:
        """The schedule in one line, as a notebook prints it under the cell that builds it."""
        def off(value, text):
            return "off" if value is None else text

        return (f"Schedule: {self.epochs} epochs of batch {self.batch_size}, AdamW lr {self.lr:g} "
                f"(weight decay {self.weight_decay:g}), {self.warmup_epochs:g} warm-up epoch(s) then "
                f"cosine to {self.min_lr:g}; EMA {off(self.ema_decay, f'{self.ema_decay}')}, early "
                f"stopping {off(self.early_stopping_patience, f'after {self.early_stopping_patience} epochs')}, "
                f"gradient clip {off(self.grad_clip, f'{self.grad_clip:g}')}, augmentation "
                f"{'on' if self.augment else 'off'}{' ' + str(dict(self.augment_options)) if self.augment_options else ''}")

    def replace(self, **changes) -> Schedule:
        """This schedule with some fields changed (e.g. ``epochs=teacher_epochs``)."""
        return dataclasses.replace(self, **changes)

    def train_config(self, **run_settings) -> TrainConfig:
        """The trainer's configuration: this recipe plus ``run_settings`` (seed,
        checkpoint_dir, resume, progress, ...: the other fields of :class:`TrainConfig`)."""
        recipe = {key: getattr(self, key) for key in _RECIPE_FIELDS}
        return TrainConfig(**recipe, **run_settings)

    def augmenter(self, seed: int):
        """The training augmentation, seeded (None when ``augment`` is False)."""
        from ..data.augment import BatchAugment, from_config

        if not self.augment:
            return None
        if self.augment_options:
            return from_config(dict(self.augment_options, seed=seed))
        return BatchAugment(seed=seed)


# Settings that only change how a run is watched or stored, not what it computes: a run may be
# resumed with other values of these.
_OPERATIONAL_FIELDS = {"checkpoint_dir", "resume", "overwrite", "log_every", "progress",
                       "channels_last", "compile", "keep_last"}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in its checkpoints).

    The recipe's fields and their defaults are :class:`Schedule`'s (read their meaning there);
    ``betas`` are AdamW's. ``mixed_precision``: "auto" (bf16 on CUDA, none on
    CPU), "no", "bf16" or "fp16". ``cpu`` forces the CPU even where a GPU exists.
    ``resume`` continues from ``checkpoint_dir/last.pt`` when it exists; ``overwrite`` allows
    replacing the checkpoints of another run in ``checkpoint_dir``. When a run with validation
    completes, ``last.pt`` (the resume state, optimiser included) is deleted and ``best.pt`` is
    marked complete, unless ``keep_last``; a completed run asked to resume returns at once.

    Speed only (the same computation, so a run may resume with other values): ``channels_last``
    stores weights and image batches NHWC on a CUDA device, where cuDNN's convolutions are faster
    that way (ignored on the CPU); ``compile`` wraps the model in ``torch.compile`` (first steps
    pay the compilation).
    """

    epochs: int = Schedule.epochs
    lr: float = Schedule.lr
    weight_decay: float = Schedule.weight_decay
    warmup_epochs: float = Schedule.warmup_epochs
    min_lr: float = Schedule.min_lr
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Schedule.grad_clip
    ema_decay: float | None = Schedule.ema_decay
    early_stopping_patience: int | None = Schedule.early_stopping_patience
    mixed_precision: str = "auto"
    seed: int = 0
    deterministic: bool = True
    checkpoint_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    log_every: int = 50
    progress: bool = True
    cpu: bool = False
    channels_last: bool = False
    compile: bool = False
    keep_last: bool = False

    def __post_init__(self):
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.lr < 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError("lr, min_lr and weight_decay must not be negative")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must not be negative, got {self.warmup_epochs}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None (off), got "
                             f"{self.ema_decay}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be at least 1 or None (off), got "
                             f"{self.early_stopping_patience}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None (off), got {self.grad_clip}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto/no/bf16/fp16, got "
                             f"{self.mixed_precision!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in _OPERATIONAL_FIELDS}


#: The fields a :class:`Schedule` hands to its :class:`TrainConfig` (batch size, augmentation
#: and the spread are the loaders', the augmenter's and the launcher's).
_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Schedule)
                       if f.name in {g.name for g in dataclasses.fields(TrainConfig)})

__all__ = ["Schedule", "TrainConfig"]
