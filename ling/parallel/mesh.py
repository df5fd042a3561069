"""The device mesh: data-parallel replicate x shard, with the expert-parallel axis carved out of shard.

World = dp_replicate x dp_shard, and dp_shard = efsdp x ep. Dense weights are sharded over dp_shard
(and replicated over dp_replicate, HSDP); routed experts are split over ep and their slices sharded
over efsdp. Every rank is a data-parallel rank: each reads its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ling.config import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer.")
        if self.dp_shard % self.ep:
            divisors = [d for d in range(1, self.dp_shard + 1) if self.dp_shard % d == 0]
            raise ConfigError(
                f"ep={self.ep} must divide dp_shard={self.dp_shard}: expert parallelism is carved out of the "
                f"data-parallel shard axis; pick ep among {divisors}."
            )

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    def check(self, world_size: int, num_experts: int | None = None) -> None:
        if world_size != self.world:
            raise ConfigError(
                f"the mesh dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} needs {self.world} processes "
                f"but the run has {world_size}; make their product equal the number of devices x nodes."
            )
        if num_experts is not None and num_experts % self.ep:
            raise ConfigError(
                f"num_experts={num_experts} is not divisible by ep={self.ep}; each expert-parallel rank must hold "
                "the same number of experts."
            )


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """One mesh ("dp_replicate", "efsdp", "ep") with the flattened "dp_shard" (= efsdp x ep) view."""
    mesh = init_device_mesh(device_type, (dims.dp_replicate, dims.efsdp, dims.ep),
                            mesh_dim_names=("dp_replicate", "efsdp", "ep"))  # fmt: skip
    mesh["efsdp", "ep"]._flatten("dp_shard")
    return mesh
