"""The run that tests/test_parallel.py trains once in one process and again under each parallel layout."""

import lightning as L
import torch

from ling.data.datamodule import LingDataModule
from ling.lightning_module import LingModule
from ling.schedules import ScheduleConfig


class Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def make_module() -> LingModule:
    torch.manual_seed(0)
    return LingModule(model="tiny", bias_update_rate=0.01, schedule=ScheduleConfig(name="wsm", warmup_steps=2))


def make_data() -> LingDataModule:
    # 8 rows of 32 tokens per step: 4 micro-batches of 2 rows on one rank, 2 per rank on two.
    return LingDataModule(seq_len=32, micro_batch_size=2, global_batch_size=8, seed=11)


def dist_trainer(strategy, steps: int, callbacks: list, root: str, **kwargs) -> L.Trainer:
    """The Trainer of the torchrun scripts in tests/dist: CPU, one process per rank, no logger or validation."""
    import os

    return L.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        default_root_dir=root, **kwargs,
    )  # fmt: skip


def finish() -> None:
    """End a torchrun script with every rank together: a rank that exits while another still talks to
    it can abort in gloo's teardown."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
