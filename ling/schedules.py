"""Learning-rate schedules (WSM, WSD, cosine) and the Megatron-style global batch-size ramp.

Ling 2.0 trains with WSM (warmup-stable-merge): linear warmup, then a constant LR to the end. There is
no decay phase; the annealing effect comes from averaging checkpoints afterwards, so training can be
continued at any point. WSD and cosine are here as baselines and for short continued-pretraining runs.

Step convention: `step` is the 0-based optimizer step, and the multiplier is the factor on the peak LR
used by the update that completes step + 1. Warmup counts that update, min(1, (step + 1) / warmup), so
the first update is never at LR 0. A decay window counts from its start, p = (step - start) / length,
which reaches min_lr_ratio at step == total_steps: every update of a `total_steps`-step run therefore
has a non-zero LR even when min_lr_ratio is 0 (the same endpoint convention as Megatron and
torch's CosineAnnealingLR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ling.config import ConfigError


@dataclass
class ScheduleConfig:
    """LR schedule settings, exposed as a LightningCLI / jsonargparse init argument."""

    name: Literal["wsm", "wsd", "cosine"] = "wsm"
    warmup_steps: int = 2000
    # None: use the trainer's max_steps. Only WSD and cosine need an end.
    total_steps: int | None = None
    # WSD only: the share of total_steps spent decaying at the end.
    decay_fraction: float = 0.1
    # WSD only: 1-sqrt is the cooldown shape that WSD/WSM papers found best.
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    # WSD and cosine: the final LR as a fraction of the peak.
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("wsm", "wsd", "cosine"):
            raise ConfigError(f"ScheduleConfig.name must be 'wsm', 'wsd' or 'cosine', got {self.name!r}.")
        if self.decay_shape not in ("linear", "cosine", "1-sqrt"):
            raise ConfigError(
                f"ScheduleConfig.decay_shape must be 'linear', 'cosine' or '1-sqrt', got {self.decay_shape!r}."
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"ScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ConfigError(f"ScheduleConfig.total_steps must be > 0 or None, got {self.total_steps}.")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"ScheduleConfig.decay_fraction must be in (0, 1], got {self.decay_fraction}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"ScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.name != "wsm" and self.total_steps is not None:
            _resolve_total(self, None)


def _resolve_total(cfg: ScheduleConfig, total_steps: int | None) -> int:
    """The end step of a WSD/cosine run: the config's own value wins over the trainer's max_steps."""
    total = cfg.total_steps if cfg.total_steps is not None else total_steps
    # Lightning's "no limit" max_steps is -1, so anything <= 0 counts as unset.
    if total is None or total <= 0:
        raise ConfigError(
            f"The {cfg.name!r} schedule needs an end step: set schedule.total_steps or trainer.max_steps "
            "(neither is set; trainer.max_steps=-1 means no limit)."
        )
    if cfg.warmup_steps >= total:
        raise ConfigError(
            f"The {cfg.name!r} schedule needs warmup_steps < total_steps, got warmup_steps={cfg.warmup_steps} "
            f"and total_steps={total}."
        )
    return total


def check_schedule(cfg: ScheduleConfig, total_steps: int | None) -> None:
    """Whether the schedule can run with the trainer's max_steps (`total_steps`; <= 0 or None: no limit):
    WSD and cosine need an end step after the warmup. Raises ConfigError, for a check before training."""
    if cfg.name != "wsm":
        _resolve_total(cfg, total_steps)


def _decay_shape(shape: str, p: float) -> float:
    """The decay curve from 1 (p = 0) to 0 (p = 1)."""
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - math.sqrt(p)


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int | None) -> float:
    """The factor on the peak LR at 0-based optimizer step `step` (see the module docstring).

    `total_steps` (normally trainer.max_steps) is used by WSD and cosine when cfg.total_steps is None.
    WSD decays over the last round(decay_fraction * total) steps, but never starts before warmup ends:
    with decay_fraction 1 it is warmup followed by a decay over the remaining steps.
    """
    if step < 0:
        raise ValueError(f"lr_multiplier needs step >= 0, got {step}.")
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.name == "wsm":
        return warmup
    total = _resolve_total(cfg, total_steps)
    if cfg.name == "cosine":
        start, length, shape = cfg.warmup_steps, total - cfg.warmup_steps, "cosine"
    else:
        start = max(cfg.warmup_steps, total - max(1, round(cfg.decay_fraction * total)))
        length, shape = total - start, cfg.decay_shape
    if step < start:
        return warmup
    p = min(1.0, (step - start) / length)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * _decay_shape(shape, p)


class LRSchedule:
    """The learning rate of each optimizer step: `peak` x `lr_multiplier(config, step, total_steps)`.

    `peak` is the one value that changes during a run (a curriculum stage's lr, a resumed run's own):
    set it, and the next step uses it. `total_steps` (normally trainer.max_steps) is used by WSD and
    cosine when config.total_steps is None; config errors are raised here, at setup, not at the first
    step that needs the end step.

    It is the callable of the run's LambdaLR (`build_scheduler`), whose state_dict holds the callable's
    `__dict__`: only `peak` lives there (config and total_steps are slots), so a checkpoint holds a plain
    number (it loads with weights_only=True) and a resumed run keeps its own schedule settings.
    """

    __slots__ = ("config", "total_steps", "__dict__")

    def __init__(self, config: ScheduleConfig, total_steps: int | None, peak: float):
        self.config = config
        self.total_steps = _resolve_total(config, total_steps) if config.name != "wsm" else total_steps
        self.peak = peak

    def __call__(self, step: int) -> float:
        return self.peak * lr_multiplier(self.config, step, self.total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR (to be stepped with Lightning's interval "step") giving every parameter group
    the learning rate `schedule(step)`."""
    # LambdaLR multiplies the callable's value by each group's initial_lr: 1, as the schedule gives the rate.
    for group in optimizer.param_groups:
        group["initial_lr"] = 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class BatchRamp:
    """Megatron's `--rampup-batch-size start increment ramp_samples`: the global batch grows from `start`
    by `increment` in equal steps, reaching the target after `ramp_samples` consumed samples. Ling 2.0
    ramps from 3,024 sequences over roughly the first 500B tokens."""

    start: int
    increment: int
    ramp_samples: int

    def __post_init__(self) -> None:
        if self.start <= 0:
            raise ConfigError(f"BatchRamp.start must be > 0, got {self.start}.")
        if self.increment <= 0:
            raise ConfigError(f"BatchRamp.increment must be > 0, got {self.increment}.")
        if self.ramp_samples < 0:
            raise ConfigError(f"BatchRamp.ramp_samples must be >= 0, got {self.ramp_samples}.")


def ramp_global_batch(ramp: BatchRamp | None, target: int, consumed_samples: int) -> int:
    """The global batch size once `consumed_samples` samples have been trained on.

    With n = (target - start) // increment increments spread over ramp_samples, the batch is
    min(target, start + increment * floor(consumed_samples / (ramp_samples / n))). The floor is taken
    as (consumed_samples * n) // ramp_samples, the same value in exact integer arithmetic.
    """
    check_ramp(ramp, target)
    if ramp is None:
        return target
    num_increments = (target - ramp.start) // ramp.increment
    if num_increments == 0 or ramp.ramp_samples == 0:
        return target
    done = (consumed_samples * num_increments) // ramp.ramp_samples
    return min(target, ramp.start + ramp.increment * done)


def check_ramp(ramp: BatchRamp | None, target: int) -> None:
    """A ramp that reaches the target global batch size in whole increments (no ramp: any positive target)."""
    if target <= 0:
        raise ConfigError(f"The target global batch size must be > 0, got {target}.")
    if ramp is None:
        return
    if ramp.start > target:
        raise ConfigError(f"BatchRamp.start ({ramp.start}) must be <= the target global batch size ({target}).")
    if (target - ramp.start) % ramp.increment:
        raise ConfigError(
            f"The ramp from {ramp.start} to the target {target} is not a whole number of "
            f"increments of {ramp.increment}."
        )
