"""The parallel layout: how many ranks replicate, shard and split the experts, and what is recomputed.

World = dp_replicate x dp_shard, and dp_shard = efsdp x ep. Dense weights are sharded over dp_shard
(and replicated over dp_replicate, HSDP); routed experts are split over ep and their slices sharded
over efsdp. Every rank is a data-parallel rank: each reads its own rows. The strategy, the mesh,
`parallelize` and the memory estimate all take their sizes, checks and error sentences from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ling.config import ConfigError

# Activation checkpointing: none, full (each decoder/MTP block) or moe (the MoE part of each block).
AC_MODES = ("none", "full", "moe")


def check_ac_mode(mode: str) -> None:
    if mode not in AC_MODES:
        raise ConfigError(f"activation_checkpointing={mode!r} is not one of {', '.join(AC_MODES)}.")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer.")
        if self.dp_shard % self.ep:
            raise ConfigError(
                f"ep={self.ep} must divide dp_shard={self.dp_shard}: expert parallelism is carved out of the "
                f"data-parallel shard axis; pick ep among {_divisors(self.dp_shard)}."
            )

    @classmethod
    def for_world(cls, world: int, dp_replicate: int = 1, dp_shard: int | None = None, ep: int = 1) -> ParallelDims:
        """The layout of a run of `world` processes; `dp_shard` defaults to world / dp_replicate."""
        if dp_shard is None:
            if not isinstance(dp_replicate, int) or isinstance(dp_replicate, bool) or dp_replicate < 1:
                raise ConfigError(f"dp_replicate={dp_replicate!r} must be a positive integer.")
            if world % dp_replicate:
                raise ConfigError(
                    f"dp_replicate={dp_replicate} must divide the {world} processes; pick one of {_divisors(world)}."
                )
            dp_shard = world // dp_replicate
        dims = cls(dp_replicate, dp_shard, ep)
        dims.check(world)
        return dims

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Ranks that FSDP-shard each expert-parallel rank's experts (dp_shard / ep)."""
        return self.dp_shard // self.ep

    def check(self, world: int | None = None, num_experts: int | None = None) -> None:
        """That the layout fits a run of `world` processes and a model of `num_experts` routed experts."""
        if world is not None and world != self.world:
            raise ConfigError(
                f"the mesh dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} needs {self.world} processes "
                f"but the run has {world}; make their product equal the number of devices x nodes."
            )
        if num_experts is not None and num_experts % self.ep:
            valid = [e for e in _divisors(num_experts) if self.dp_shard % e == 0]
            raise ConfigError(
                f"ep={self.ep} must divide num_experts={num_experts} so that every expert-parallel rank holds "
                f"whole experts; with dp_shard={self.dp_shard} use one of {valid}."
            )

    def describe(self) -> str:
        return f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} (ep {self.ep} x efsdp {self.efsdp})"
