"""WSM (warmup-stable-merge): checkpoint merge weights from decay shapes, and an fp32 merge accumulator.

WSM replaces the learning-rate decay by a weighted average of checkpoints saved at constant LR. Writing
each snapshot as the first one minus the updates in between, a merge sum_j c_j theta_j applies update
interval i with the LR multiplier w_i = sum_{j>=i} c_j, so a decay shape f (f(0) = 1, non-increasing)
sampled on the window gives the w_i, and the unique inverse gives the merge weights:
c_k = w_k, c_j = w_j - w_{j+1} (1 <= j < k), c_0 = 1 - w_1.

Grid convention: a window of `count` snapshots theta_0 .. theta_k (k = count - 1, oldest first) has k
update intervals; interval i (1-based) sits at x_i = i / (k + 1) and gets w_i = f(x_i). With this grid
linear decay (f = 1 - x) gives c_j = 1 / (k + 1) for every snapshot: the plain mean, which is the
`mean` shape. `ema` with rate alpha is the exponential moving average over the snapshots,
c_j = alpha (1 - alpha)^(k - j) for j >= 1 and c_0 = (1 - alpha)^k, i.e. w_i = 1 - (1 - alpha)^(k - i + 1).

`MergeAccumulator` sums weight x tensor in fp32 one snapshot at a time, so merging needs one fp32 copy of
the model (the accumulator) and at most one chunk of one tensor in flight, whatever the window length.
For DTensors it holds the local shard only, so every rank accumulates its own part of the model.
This module is pure torch: the Lightning callback and the offline merge command both build on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ling.config import ConfigError
from ling.model.dtensor import local as _local

SHAPES = ("mean", "cosine", "1-sqrt", "ema")
WEIGHT_TOLERANCE = 1e-6
# Elements added per step: bounds the fp32 cast of a low-precision tensor to 16 MiB, not a whole tensor.
CAST_CHUNK = 1 << 22

_DECAY = {
    "mean": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def _check_count(count: Any) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"A WSM merge window needs at least one snapshot, got count={count!r}.")
    return count


def _check_shape(shape: Any, alpha: float | None) -> None:
    if shape not in SHAPES:
        valid = ", ".join(repr(s) for s in SHAPES)
        raise ConfigError(f"Unknown WSM merge shape {shape!r}; valid shapes are {valid}.")
    if shape == "ema":
        if alpha is None:
            raise ConfigError("The 'ema' WSM merge shape needs alpha, the EMA rate in (0, 1].")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"The 'ema' WSM merge rate alpha={alpha!r} is outside (0, 1]; use e.g. 0.1.")
    elif alpha is not None:
        raise ConfigError(f"alpha={alpha!r} only applies to the 'ema' WSM merge shape, not {shape!r}; remove it.")


def decay_multipliers(shape: str, count: int, alpha: float | None = None) -> list[float]:
    """The LR multipliers w_1..w_k (k = count - 1) that `shape` emulates over a window of `count` snapshots.

    Interval i sits at x_i = i / count on the window (see the module docstring); `ema` uses its closed
    form w_i = 1 - (1 - alpha)^(k - i + 1). The list is non-increasing, in [0, 1], and empty for count 1.
    """
    _check_shape(shape, alpha)
    k = _check_count(count) - 1
    if shape == "ema":
        return [1.0 - (1.0 - float(alpha)) ** (k - i + 1) for i in range(1, k + 1)]
    f = _DECAY[shape]
    return [f(i / (k + 1)) for i in range(1, k + 1)]


def merge_coefficients(w: Sequence[float]) -> list[float]:
    """The merge weights c_0..c_k (oldest snapshot first) whose suffix sums are w_1..w_k (Theorem 3.1).

    Needs 1 >= w_1 >= ... >= w_k >= 0 so that every c_j is non-negative; the c_j sum to 1 by construction.
    """
    w = [float(v) for v in w]
    for i, v in enumerate(w):
        prev = 1.0 if i == 0 else w[i - 1]
        if not math.isfinite(v) or v < 0.0 or v > prev:
            raise ConfigError(
                f"LR multipliers must be non-increasing in [0, 1] to give merge weights, got w_{i + 1}={v!r} "
                f"after {prev!r}."
            )
    if not w:
        return [1.0]
    return [1.0 - w[0]] + [w[j] - w[j + 1] for j in range(len(w) - 1)] + [w[-1]]


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    values = [float(v) for v in weights]
    if len(values) != count:
        raise ConfigError(
            f"Got {len(values)} merge weights for a window of {count} snapshots; give one weight per snapshot."
        )
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ConfigError(f"Merge weights must be finite numbers, got {v!r} at position {i}.")
        if v < 0.0:
            raise ConfigError(f"Merge weights must be non-negative, got {v!r} at position {i}.")
    total = math.fsum(values)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ConfigError(
            f"Merge weights must sum to 1 (within {WEIGHT_TOLERANCE:g}), got {values} summing to {total!r}."
        )
    return values


def merge_weights(
    shape: str | None,
    count: int,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """One non-negative weight per snapshot of the window (oldest first), summing to 1.

    Either from a decay `shape` (count snapshots = k + 1 checkpoints, k intervals) or from an explicit
    `weights` list, which is validated and returned as given; pass exactly one of the two.
    """
    count = _check_count(count)
    if weights is not None:
        if shape is not None:
            raise ConfigError(f"Give either a WSM merge shape or explicit weights, not both (shape={shape!r}).")
        if alpha is not None:
            raise ConfigError(f"alpha={alpha!r} only applies to the 'ema' WSM merge shape, not to explicit weights.")
        return _check_weights(weights, count)
    if shape is None:
        valid = ", ".join(repr(s) for s in SHAPES)
        raise ConfigError(f"A WSM merge needs a shape ({valid}) or explicit weights, got neither.")
    return merge_coefficients(decay_multipliers(shape, count, alpha))


def _add_scaled(acc: Tensor, src: Tensor, weight: float) -> None:
    """acc += weight * src in fp32, casting at most one chunk of `src` at a time."""
    if src.dtype == torch.float32 or not (acc.is_contiguous() and src.is_contiguous()) or src.numel() <= CAST_CHUNK:
        acc.add_(src, alpha=weight)
        return
    flat_acc, flat_src = acc.view(-1), src.view(-1)
    for start in range(0, flat_src.numel(), CAST_CHUNK):
        flat_acc[start : start + CAST_CHUNK].add_(flat_src[start : start + CAST_CHUNK], alpha=weight)


class MergeAccumulator:
    """A running fp32 sum of weight x snapshot over a WSM window, one snapshot at a time.

    Floating-point tensors are accumulated in fp32 (a DTensor by its local shard); every other entry
    (integer and bool tensors, non-tensors) is kept as it is in the last snapshot added. `merged()` is
    sum(w x theta) / sum(w): with weights from `merge_weights` that is the WSM merge, and a window that is
    only partly filled gives the weighted mean of what it holds so far.
    """

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self._sums: dict[str, Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._kept: dict[str, Any] = {}
        self._kept_keys: list[str] = []
        for name, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                local = _local(value)
                self._sums[name] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
                self._dtypes[name] = value.dtype
            else:
                self._kept_keys.append(name)
        self._keys = list(state.keys())
        self.count = 0
        self.total_weight = 0.0

    def _check_keys(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in self._keys if k not in state]
        extra = [k for k in state if k not in self._sums and k not in self._kept_keys]
        if missing or extra:
            bad = missing[0] if missing else extra[0]
            what = "lacks" if missing else "has the unexpected entry"
            raise ConfigError(
                f"A merge snapshot {what} {bad!r}; every snapshot must hold the same tensors as the first "
                f"({len(self._keys)} entries)."
            )

    @torch.no_grad()
    def add(self, state: Mapping[str, Tensor], weight: float) -> None:
        """Add weight x state to the running sum, in place (one chunk of one tensor cast to fp32 at a time)."""
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0.0:
            raise ConfigError(f"A merge weight must be a non-negative finite number, got {weight!r}.")
        self._check_keys(state)
        for name, acc in self._sums.items():
            local = _local(state[name])
            if tuple(local.shape) != tuple(acc.shape):
                raise ConfigError(
                    f"Merge snapshot tensor {name!r} has shape {tuple(local.shape)}, but the window's is "
                    f"{tuple(acc.shape)}; all snapshots must come from the same model and layout."
                )
            if weight != 0.0:
                _add_scaled(acc, local.to(acc.device), weight)
        for name in self._kept_keys:
            value = state[name]
            self._kept[name] = _local(value).detach().clone() if isinstance(value, Tensor) else value
        self.count += 1
        self.total_weight += weight

    def _check_ready(self) -> None:
        if self.count == 0 or self.total_weight <= 0.0:
            raise ConfigError(
                f"The merge window holds no weight yet ({self.count} snapshots, total weight "
                f"{self.total_weight!r}); add a snapshot with a positive weight first."
            )

    def _value(self, name: str, dtype: torch.dtype) -> Tensor:
        acc = self._sums[name]
        if self.total_weight == 1.0:
            return acc.to(dtype, copy=True)
        return (acc / self.total_weight).to(dtype)

    @torch.no_grad()
    def merged(self) -> dict[str, Tensor]:
        """The merged tensors (local shards, in each tensor's own dtype), in the order of the first snapshot."""
        self._check_ready()
        out: dict[str, Tensor] = {}
        for name in self._keys:
            if name in self._sums:
                out[name] = self._value(name, self._dtypes[name])
            else:
                value = self._kept[name]
                out[name] = value.clone() if isinstance(value, Tensor) else value
        return out

    @torch.no_grad()
    def copy_into(self, state: Mapping[str, Tensor]) -> None:
        """Write the merged values into `state`'s tensors in place (local shards for DTensors).

        Used to swap the merge into a live model: save a copy of its state first to swap back.
        """
        self._check_ready()
        self._check_keys(state)
        for name in self._keys:
            target = state[name]
            if not isinstance(target, Tensor):
                continue
            dst = _local(target)
            if name in self._sums:
                acc = self._sums[name]
                dst.copy_(acc if self.total_weight == 1.0 else acc / self.total_weight)
            elif isinstance(self._kept[name], Tensor):
                dst.copy_(self._kept[name])

    def state_dict(self) -> dict[str, Any]:
        """The running sums (this rank's fp32 local shards, not copies), the kept entries and the counters."""
        return {
            "count": self.count,
            "total_weight": self.total_weight,
            "sums": dict(self._sums),
            "kept": dict(self._kept),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` into an accumulator built from the same model layout."""
        sums = state_dict["sums"]
        if set(sums) != set(self._sums):
            bad = sorted(set(sums) ^ set(self._sums))[0]
            raise ConfigError(
                f"The saved merge state does not match this model at {bad!r}; resume with the model it was saved from."
            )
        for name, acc in self._sums.items():
            saved = sums[name]
            if tuple(saved.shape) != tuple(acc.shape):
                raise ConfigError(
                    f"The saved merge sum {name!r} has shape {tuple(saved.shape)}, but this model's is "
                    f"{tuple(acc.shape)}; resume with the same model and parallel layout."
                )
            acc.copy_(saved)
        self._kept = dict(state_dict.get("kept", {}))
        self.count = int(state_dict["count"])
        self.total_weight = float(state_dict["total_weight"])

    def reset(self) -> None:
        """Empty the window, keeping the fp32 buffers for the next one."""
        for acc in self._sums.values():
            acc.zero_()
        self._kept = {}
        self.count = 0
        self.total_weight = 0.0
