"""`LingParallelStrategy`: Lightning's ModelParallelStrategy with the Ling mesh and plan.

Lightning's strategy builds a fixed ("data_parallel", "tensor_parallel") mesh; this one also builds
the ("dp_replicate", "efsdp", "ep") mesh of `ling.parallel.mesh` and hands it, with the parallel
plan, to the LightningModule, whose `configure_model` calls `parallelize`. Launch it with torchrun,
SLURM or Lightning's own launcher; checkpoints are sharded DCP folders that any other layout can
resume from (DCP reshards on load).

    strategy:
      class_path: ling.parallel.strategy.LingParallelStrategy
      init_args: {dp_replicate: 1, dp_shard: 16, ep: 8, activation_checkpointing: full}
"""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

from ling.config import ConfigError
from ling.parallel.mesh import ParallelDims, build_mesh
from ling.parallel.parallelize import ParallelPlan


class LingParallelStrategy(ModelParallelStrategy):
    def __init__(
        self,
        dp_replicate: int = 1,
        dp_shard: int | None = None,
        ep: int = 1,
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        activation_checkpointing: str = "none",
        compile: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ):
        """
        Args:
            dp_replicate: replicas of the weights (HSDP across, e.g., nodes); 1 = plain FSDP.
            dp_shard: ranks each weight is sharded over (default: world size / dp_replicate).
            ep: expert-parallel ranks, carved out of dp_shard (ep must divide it).
            param_dtype, reduce_dtype, reshard_after_forward, activation_checkpointing, compile:
                see `ling.parallel.ParallelPlan`.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        # Checked when the Trainer is built (`_configure_launcher`), before any process starts: the
        # config parser builds this class while reading YAML and would bury an error raised here.
        self._sizes = (dp_replicate, dp_shard, ep)
        self._plan_args = (param_dtype, reduce_dtype, reshard_after_forward, activation_checkpointing, compile)
        self.plan: ParallelPlan | None = None
        self.dims: ParallelDims | None = None
        self.ling_mesh = None

    def validate(self, world: int) -> None:
        """The mesh and plan for a run of `world` processes; one ConfigError sentence when impossible."""
        dp_replicate, dp_shard, ep = self._sizes
        if dp_shard is None:
            if not isinstance(dp_replicate, int) or dp_replicate < 1 or world % dp_replicate:
                raise ConfigError(f"dp_replicate={dp_replicate!r} must be a positive divisor of the {world} processes.")
            dp_shard = world // dp_replicate
        self.dims = ParallelDims(dp_replicate, dp_shard, ep)
        self.dims.check(world)
        self.plan = ParallelPlan(*self._plan_args)

    def _configure_launcher(self) -> None:
        self.validate(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        self.validate(world)
        self._data_parallel_size = world  # Lightning's own mesh: every rank is data parallel
        super().setup_environment()
        self.ling_mesh = build_mesh(self.dims, self.root_device.type)
        self.lightning_module.ling_mesh = self.ling_mesh
        self.lightning_module.parallel_plan = self.plan
