"""Non-finite training steps: the policy, an optimizer step applied only where a device flag is true
(without the host reading it), and a finiteness check of the weights.

A step whose loss or gradient norm is NaN or inf is found on the device and, by default, not applied;
the host reads the count only where it waits for the device anyway.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch

from ling.config import ConfigError
from ling.model.dtensor import local


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradient norms (see `NonFinitePolicy`); one sentence."""


@dataclass
class NonFinitePolicy:
    """What a training step with a non-finite (NaN or inf) loss or gradient norm does.

    action: `skip` (default) leaves the weights, the optimizer state and the expert biases as they were
        before the step (the data and the learning-rate schedule move on); `stop` applies nothing
        special to the step and ends the run at the next check, with no checkpoint or export written
        after the step (no extra work per step, but the weights after the step are lost).
    max_consecutive: with `skip`, end the run once this many steps in a row were non-finite (null:
        never).

    The device keeps the counts; the host reads them where it waits for the device anyway (when the
    logger reads the step's metrics, every `trainer.log_every_n_steps` steps, before a checkpoint is
    written and at the end of the fit), so the run ends at the first of these after the condition.
    """

    action: Literal["skip", "stop"] = "skip"
    max_consecutive: int | None = 3

    def __post_init__(self) -> None:
        if self.action not in ("skip", "stop"):
            raise ConfigError(f"nonfinite.action={self.action!r} must be 'skip' or 'stop'.")
        n = self.max_consecutive
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"nonfinite.max_consecutive={n!r} must be a positive number of steps, or null.")


GUARD_CHUNK_ELEMENTS = 1 << 26
"""Elements (per rank) of the parameters stepped at a time by `guarded_optimizer`: their values and
optimizer state before the step are what it keeps, so this bounds its extra memory."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return local(t.detach())


def _chunks(groups: list[list[torch.Tensor]], limit: int):
    """The parameters of each group, cut into consecutive runs of about `limit` elements, as one list per
    group for each run (a parameter larger than `limit` is a run of its own)."""
    chunk, size = [[] for _ in groups], 0
    for g, params in enumerate(groups):
        for p in params:
            if size and size + _local(p).numel() > limit:
                yield chunk
                chunk, size = [[] for _ in groups], 0
            chunk[g].append(p)
            size += _local(p).numel()
    if size:
        yield chunk


@contextmanager
def guarded_optimizer(optimizer: torch.optim.Optimizer, finite: torch.Tensor, leave_step_counts: bool = False):
    """While active, `optimizer.step()` (however it is reached, e.g. through Lightning's wrapper) takes
    the step only where the 0-dim bool tensor `finite` is true, without reading it on the host.

    The parameters are stepped GUARD_CHUNK_ELEMENTS at a time by the optimizer's own step; after each
    chunk, its parameters and their optimizer state are put back with `torch.where(finite, after,
    before)`, bit for bit. State on another device than `finite` (AdamW's step counts, which an AdamW
    that is neither fused nor capturable keeps on the host) cannot be selected so: it is left counted,
    and `rewind_step_counts` takes the skipped steps off once the host knows how many there were
    (`leave_step_counts` leaves every `step` entry so, to test that on one device)."""
    own = optimizer.__dict__.get("step")  # e.g. the LR scheduler's wrapper, which calls the class's step
    original = optimizer.step

    def guarded_step(closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = optimizer.param_groups
        everything = [group["params"] for group in groups]
        try:
            for chunk in _chunks(everything, GUARD_CHUNK_ELEMENTS):
                kept = []
                for p in (p for params in chunk for p in params if p.grad is not None):
                    state = optimizer.state.get(p, {})
                    before = {k: _local(v).clone() for k, v in state.items() if torch.is_tensor(v)}
                    kept.append((p, _local(p).clone(), before))
                for group, params in zip(groups, chunk, strict=True):
                    group["params"] = params
                original()
                with torch.no_grad():
                    for p, value, before in kept:
                        after = _local(p)
                        torch.where(finite, after, value, out=after)
                        for k, v in optimizer.state[p].items():
                            if not torch.is_tensor(v):
                                continue
                            v = _local(v)
                            if v.device != finite.device or (leave_step_counts and k == "step"):
                                continue
                            old = before.get(k)
                            torch.where(finite, v, old if old is not None else torch.zeros_like(v), out=v)
        finally:
            for group, params in zip(groups, everything, strict=True):
                group["params"] = params
        return loss

    optimizer.step = guarded_step
    try:
        yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own


def weights_finite(trainer: L.Trainer, tensors) -> bool:
    """Whether every floating-point tensor in `tensors` (this rank's shards of DTensors) is finite, on
    all ranks (one host read and, with several ranks, one all-reduce: every rank must call it)."""
    flags = [torch.isfinite(_local(t)).all() for t in tensors if t.is_floating_point()]
    local = bool(torch.stack(flags).all()) if flags else True
    return trainer.strategy.reduce_boolean_decision(local, all=True)


def rewind_step_counts(optimizer: torch.optim.Optimizer, skipped: int, device: torch.device | None) -> None:
    """Take `skipped` steps off the step counts that `guarded_optimizer` left counted: those not on
    `device` (the device of its `finite`; None: all of them). Every parameter is stepped at every step
    (each has a gradient), so each count holds every skipped step."""
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step) and (device is None or step.device != device):
            step.sub_(skipped)
