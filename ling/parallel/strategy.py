"""`LingParallelStrategy`: Lightning's ModelParallelStrategy with the Ling mesh and parallel plan.

Lightning's strategy builds a fixed ("data_parallel", "tensor_parallel") mesh; this one builds the
("dp_replicate", "efsdp", "ep") mesh of `ling.parallel.mesh` instead and hands it to the LightningModule
the way Lightning does (`self.device_mesh` in `configure_model`), where `LingModule.configure_model`
calls `parallelize` with it and the strategy's `plan`. Launch it with torchrun, SLURM or Lightning's
own launcher; checkpoints are sharded DCP folders that any other layout can resume from (DCP reshards
on load).

Its saves on a local file system are atomic: all ranks write into a hidden sibling folder, which rank 0
renames into place once every rank has finished (`ling.checkpoint.atomic.swap_into_place`), so a
checkpoint under its final name, `last.ckpt` included, is always complete; what a killed save leaves
behind is cleaned up, and a checkpoint moved aside is put back, at the next start
(`recover_checkpoint_dir`). A save that fails on any rank (a full disk, a folder that cannot be
written) removes the staged folder and makes every rank raise the same `CheckpointWriteError`, naming
the checkpoint and the cause. Saves to a remote file system (a URL) or with `storage_options` go
straight to Lightning's own save.

    strategy:
      class_path: ling.parallel.strategy.LingParallelStrategy
      init_args: {dp_replicate: 1, dp_shard: 16, ep: 8, activation_checkpointing: full}
"""

from __future__ import annotations

import errno
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

from ling.checkpoint.atomic import (
    CheckpointWriteError,
    discard,
    fsync_path,
    holds_only_checkpoint_files,
    is_local_path,
    new_token,
    recover_checkpoint_dir,
    remove_path,
    sibling,
    swap_into_place,
    write_error,
)
from ling.parallel.layout import ParallelDims
from ling.parallel.mesh import build_mesh
from ling.parallel.parallelize import ParallelPlan


class LingParallelStrategy(ModelParallelStrategy):
    """What the LightningModule can read from it (through `trainer.strategy`, once the Trainer is built):

    - `dims`: the `ParallelDims` of the run (dp_replicate, dp_shard, ep, efsdp, world);
    - `plan`: the `ParallelPlan` (dtypes, resharding, activation checkpointing, compile, float8);
    - `device_mesh` (from `setup_environment` on): the mesh of `ling.parallel.mesh.build_mesh`, which
      the LightningModule also has as its own `device_mesh`, as under Lightning's ModelParallelStrategy.
    """

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
        float8: dict | None = None,
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
            float8: torchao float8 training, e.g. {dense: rowwise, experts: fp8_rowwise}; see
                `ling.parallel.float8.Float8Config` (default: off).
        """
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        # Checked when the Trainer is built (`_configure_launcher`), before any process starts: the
        # config parser builds this class while reading YAML and would bury an error raised here.
        self._sizes = (dp_replicate, dp_shard, ep)
        self._plan_args = (param_dtype, reduce_dtype, reshard_after_forward, activation_checkpointing, compile, float8)
        self.plan: ParallelPlan | None = None
        self.dims: ParallelDims | None = None

    def validate(self, world: int) -> None:
        """The layout and plan for a run of `world` processes; one ConfigError sentence when impossible."""
        dp_replicate, dp_shard, ep = self._sizes
        self.dims = ParallelDims.for_world(world, dp_replicate, dp_shard, ep)
        self.plan = ParallelPlan(*self._plan_args)

    def _configure_launcher(self) -> None:
        # Lightning's own hook, overridden as its strategies do: the one that runs when the Trainer is
        # built, before any process is launched (Lightning has no public hook at that point).
        self.validate(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def setup_environment(self) -> None:
        self.validate(self.num_nodes * self.num_processes)
        super().setup_environment()  # the process group (and Lightning's own mesh, replaced below)
        self.plan.float8.check_device(self.root_device, compiled=self.plan.compile)
        # What ModelParallelStrategy.setup_environment does with its mesh: its `device_mesh` reads
        # `_device_mesh`, and so does `LightningModule.device_mesh` (Lightning has no setter for either).
        self._device_mesh = build_mesh(self.dims, self.root_device.type)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Lightning's reads the "data_parallel" axis of its own mesh; here every rank is data parallel.
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup(self, trainer: L.Trainer) -> None:
        # The checkpoint callbacks know their folders by now (their `setup` ran); tidy them before any save.
        folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        self._recover(folders)
        super().setup(trainer)

    def _recover(self, folders: list) -> None:
        if self.is_global_zero:
            for folder in folders:
                if is_local_path(folder):
                    recover_checkpoint_dir(folder)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        if is_local_path(path):
            self._recover([Path(path).parent])  # a resume path saved by a killed run may sit aside
            meta = Path(path) / "meta.pt"
            from ling.lightning_module import LingModule  # here: LingModule imports this module

            if meta.is_file() and isinstance(self.lightning_module, LingModule):
                # Lightning loads a sharded checkpoint's weights before the module's on_load_checkpoint runs,
                # so a model of another shape would fail inside DCP with a message about tensors; check first.
                self.lightning_module.check_resume(torch.load(meta, map_location="cpu", weights_only=True))
        return super().load_checkpoint(path, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Write into a hidden sibling on every rank, then rename it into place once all have finished.

        When any rank cannot write its part, the sibling is removed and every rank raises the same
        `CheckpointWriteError`; what was under `filepath` stays as it was.
        """
        if storage_options is not None or not is_local_path(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        error = None
        if self.is_global_zero:
            target = Path(filepath)
            recover_checkpoint_dir(target.parent)  # before the broadcast: no rank has staged anything yet
            if target.is_dir() and not target.is_symlink() and not holds_only_checkpoint_files(target):
                error = f"The checkpoint path {target} is a folder holding other files; pass a new path or remove it."
        filepath, token, error = self.broadcast((os.fspath(filepath), new_token(), error))
        if error:
            raise CheckpointWriteError(filepath, errno.EEXIST, "File exists", message=error)
        target = Path(filepath)
        staged = sibling(target, "tmp", token)
        failure = None
        try:
            super().save_checkpoint(checkpoint, staged)
            if self.is_global_zero:  # DCP syncs its own files; `meta.pt` or the single file is rank 0's
                fsync_path(staged / "meta.pt" if staged.is_dir() else staged)
                fsync_path(staged.parent if staged.is_file() else staged)
        except BaseException as exc:
            failure = write_error(exc, target)
            if failure is None:  # an interrupt or a bug: no rank waits for this one
                if self.is_global_zero:
                    remove_path(staged)
                raise
            failure.__cause__ = exc
        # Every rank has written its shards, and learns whether any failed (`meta.pt` is rank 0's alone).
        failures = self._gather_objects(None if failure is None else (failure.errno, failure.strerror))
        first = next((f for f in failures if f is not None), None)
        if first is not None:
            if self.is_global_zero:
                remove_path(staged)
            raise failure or CheckpointWriteError(target, *first)
        if self.is_global_zero:
            try:
                swap_into_place(staged, target, token)
            except OSError as exc:
                error = (
                    exc.errno,
                    exc.strerror or str(exc),
                    f"Could not move the checkpoint written at {staged} to {target}: {exc}.",
                )
        error = self.broadcast(error)  # also the barrier that keeps the others until the swap is done
        if error:
            raise CheckpointWriteError(target, *error)

    def _gather_objects(self, obj: Any) -> list:
        """`obj` of every rank (a collective call)."""
        if not (dist.is_available() and dist.is_initialized()):
            return [obj]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def remove_checkpoint(self, filepath) -> None:
        """Rename the checkpoint away before deleting it, so a crash never leaves half of one under its name."""
        if not is_local_path(filepath):
            return super().remove_checkpoint(filepath)
        if self.is_global_zero:
            discard(filepath)
