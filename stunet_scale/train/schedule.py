"""The run length is a sample budget; steps and the poly learning rate follow from it.

The paper trains 4000 epochs x 250 steps x batch 2 = 2,000,000 patches. Measured in samples, the
same recipe holds at any world size: with a global batch of 16 it is 125,000 steps, and an
"epoch" is still 500 samples, so ``lr = lr0 * (1 - epoch/4000)^0.9`` follows the data seen, not
the number of optimizer steps.

Larger global batches may scale the peak lr (``optim.lr_scaling``):
    none:   lr0                         (nnU-Net; safe, possibly slow)
    linear: lr0 * B / B_ref             (Goyal et al. 2017; needs warm-up at large B)
    sqrt:   lr0 * sqrt(B / B_ref)       (Krizhevsky 2014; milder, common for SGD with momentum)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Schedule:
    global_batch: int
    total_samples: int
    samples_per_epoch: int
    epochs: int
    peak_lr: float
    poly_power: float
    lr_update: str  # "step" | "epoch"
    warmup_steps: int
    max_steps: int | None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Schedule:
        s, o = cfg.schedule, cfg.optim
        ratio = s.global_batch / o.reference_global_batch
        scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.lr_scaling]
        return cls(
            global_batch=s.global_batch,
            total_samples=s.epochs * s.samples_per_epoch,
            samples_per_epoch=s.samples_per_epoch,
            epochs=s.epochs,
            peak_lr=o.lr * scale,
            poly_power=s.poly_power,
            lr_update=s.lr_update,
            warmup_steps=s.warmup_steps,
            max_steps=s.max_steps,
        )

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the full recipe (the last one may be a partial epoch's)."""
        return -(-self.total_samples // self.global_batch)

    @property
    def stop_step(self) -> int:
        """Where this run stops: the recipe's end, or schedule.max_steps if earlier."""
        return min(self.total_steps, self.max_steps) if self.max_steps else self.total_steps

    def samples_seen(self, step: int) -> int:
        return step * self.global_batch

    def epoch(self, step: int) -> float:
        return self.samples_seen(step) / self.samples_per_epoch

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based: the step about to run)."""
        if self.lr_update == "epoch":
            progress = math.floor(self.epoch(step)) / self.epochs  # nnU-Net: once per epoch
        else:
            progress = self.samples_seen(step) / self.total_samples
        lr = self.peak_lr * max(0.0, 1.0 - progress) ** self.poly_power
        if self.warmup_steps and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def epoch_boundary(self, step: int, every_epochs: int = 1) -> bool:
        """True when optimizer step ``step`` (1-based count of steps done) finished an epoch block.

        Epochs are sample counts, so with a global batch that does not divide samples_per_epoch a
        boundary falls inside a step; it then counts for the step that crossed it.
        """
        block = self.samples_per_epoch * every_epochs
        return self.samples_seen(step) // block > self.samples_seen(step - 1) // block


def resume_step(samples_seen: int, global_batch: int) -> int:
    """The step to continue at when a checkpoint's sample count meets a (possibly new) global batch."""
    if samples_seen % global_batch:
        raise ConfigError(
            f"the checkpoint has seen {samples_seen} samples, not a multiple of schedule.global_batch={global_batch}; "
            f"resume with a global batch that divides {samples_seen}"
        )
    return samples_seen // global_batch
