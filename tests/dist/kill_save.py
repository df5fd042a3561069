"""Train the tiny model on 2 gloo ranks under LingParallelStrategy, saving every 2 steps (and `last`),
and optionally kill every process of the run with SIGKILL at a chosen point inside one save; launched by
tests/test_atomic_dcp.py with torchrun.

--kill POINT:NAME@STEP picks the save of checkpoint NAME at global step STEP and the point:
  shards   rank 1 has written its shard file (no `.metadata` yet)
  written  every rank has finished writing, before rank 0 renames anything
  aside    rank 0 has moved the old checkpoint aside, before renaming the new one in
Rank 0 appends "step loss" lines to OUT.losses as it trains and, if the run ends, writes the full
final weights to OUT.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

import ling.checkpoint.atomic as atomic  # noqa: E402
import ling.parallel.strategy as strategy_module  # noqa: E402
from ling.parallel.strategy import LingParallelStrategy  # noqa: E402
from tests.parallel_setup import dist_trainer, finish, make_data, make_module  # noqa: E402


class LogLosses(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(f"{trainer.global_step} {float(trainer.callback_metrics['train/loss']).hex()}\n")
                fh.flush()
                os.fsync(fh.fileno())


def kill_everything(pid_dir: Path) -> None:
    """SIGKILL the other rank, the torchrun agent and this process, like a node losing power."""
    for entry in pid_dir.iterdir():
        pid = int(entry.read_text())
        if pid != os.getpid():
            os.kill(pid, signal.SIGKILL)
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(spec: str, pid_dir: Path, trainer: L.Trainer) -> None:
    point, rest = spec.split(":")
    name, step = rest.split("@")
    rank = dist.get_rank
    current = {"path": None}

    def armed() -> bool:
        return current["path"] is not None and Path(current["path"]).name == name and trainer.global_step == int(step)

    save = LingParallelStrategy.save_checkpoint

    def tracked_save(self, checkpoint, filepath, storage_options=None):
        current["path"] = filepath
        try:
            return save(self, checkpoint, filepath, storage_options)
        finally:
            current["path"] = None

    LingParallelStrategy.save_checkpoint = tracked_save

    if point == "shards":
        write_data = FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            result = write_data(self, plan, planner)
            if armed() and rank() == 1:
                kill_everything(pid_dir)
            return result

        FileSystemWriter.write_data = write_then_die
    elif point == "written":
        swap = strategy_module.swap_into_place

        def die_before_swap(staged, target, token):
            if armed() and rank() == 0:
                kill_everything(pid_dir)
            return swap(staged, target, token)

        strategy_module.swap_into_place = die_before_swap
    elif point == "aside":
        move = atomic._move

        def move_then_die(src, dst):
            move(src, dst)
            if armed() and rank() == 0 and ".old-" in Path(dst).name:
                kill_everything(pid_dir)

        atomic._move = move_then_die
    else:
        raise ValueError(f"unknown kill point {point!r}")


class KillSetup(L.Callback):
    """Arms the kill once the process group exists (ranks are known)."""

    def __init__(self, spec: str | None, pid_dir: Path):
        self.spec, self.pid_dir = spec, pid_dir

    def setup(self, trainer, pl_module, stage):
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        (self.pid_dir / str(trainer.global_rank)).write_text(str(os.getpid()))
        trainer.strategy.barrier()
        if self.spec:
            install_kill(self.spec, self.pid_dir, trainer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--resume")
    parser.add_argument("--kill", help="POINT:NAME@STEP")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    strategy = LingParallelStrategy(1, 2, 1, param_dtype=None, reduce_dtype=None)
    callbacks = [
        LogLosses(args.out + ".losses"),
        KillSetup(args.kill, Path(args.out + ".pids")),
        ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=2, save_top_k=-1, save_last=True),
    ]
    trainer = dist_trainer(strategy, args.steps, callbacks, args.out + ".root")
    module = make_module()
    trainer.fit(module, datamodule=make_data(), ckpt_path=args.resume)
    state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        torch.save(state, args.out)
    finish()


if __name__ == "__main__":
    main()
