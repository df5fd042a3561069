"""Train the tiny model under LingParallelStrategy with float8 settings on CPU/gloo; launched by
tests/test_float8_parallel.py with torchrun (one or two processes).

Rank 0 writes to OUT: the per-step losses, the full weights when training starts (after any resume)
and at each checkpoint step, the full final weights, the class names (with their bases) of every
Linear and routed-expert module as the run trained them, and what Lightning's loggers wrote (the
float8 conversion's summary among it). `--then` trains further runs one after another in the same
processes."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from callbacks.hf_export import HFExport  # noqa: E402
from ling.model.moe import GroupedExperts  # noqa: E402
from ling.parallel.strategy import LingParallelStrategy  # noqa: E402
from tests.parallel_setup import Record, dist_trainer, finish, make_data, make_module  # noqa: E402

EVERY = 2  # checkpoint interval (steps)


def full_state(model: nn.Module) -> dict:
    """A copy of the gathered weights and buffers (a collective: every rank calls it). Copied: on one
    rank, and for the replicated expert biases, the gathered tensors are the live ones."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: value.detach().clone() for name, value in state.items()}


class Snapshots(L.Callback):
    """The full state when training starts and after every checkpoint step, and the module classes."""

    def __init__(self):
        self.start, self.at_step, self.classes = None, {}, {}

    def on_train_start(self, trainer, pl_module):
        self.start = full_state(pl_module.model)
        self.classes = {
            name: [cls.__name__ for cls in type(module).__mro__]
            for name, module in pl_module.model.named_modules()
            if isinstance(module, nn.Linear | GroupedExperts)
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % EVERY == 0:
            self.at_step[trainer.global_step] = full_state(pl_module.model)


class Lines(logging.Handler):
    """The messages Lightning's loggers (and `rank_zero_info`) write during one fit."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def train(args: argparse.Namespace) -> None:
    dp_replicate, dp_shard, ep = (int(v) for v in args.dims.split(","))
    strategy = LingParallelStrategy(dp_replicate, dp_shard, ep, param_dtype=None, reduce_dtype=None,
                                    float8=args.float8)  # fmt: skip
    record, snapshots = Record(), Snapshots()
    callbacks = [record, snapshots]
    if args.export:
        callbacks.append(HFExport(dirpath=args.export))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=EVERY, save_top_k=-1))
    trainer = dist_trainer(strategy, args.steps, callbacks, args.out + ".root",
                           enable_checkpointing=bool(args.ckpt_dir))  # fmt: skip
    module = make_module()
    lines = Lines()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(lines)
    try:
        trainer.fit(module, datamodule=make_data(), ckpt_path=args.resume)
    finally:
        for logger in loggers:
            logger.removeHandler(lines)
    state = full_state(module.model)
    if trainer.is_global_zero:
        out = {"losses": record.losses, "state": state, "start": snapshots.start, "at_step": snapshots.at_step,
               "classes": snapshots.classes, "log": "\n".join(lines.lines)}  # fmt: skip
        torch.save(out, args.out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="1,2,2", help="dp_replicate,dp_shard,ep")
    parser.add_argument("--float8", type=json.loads, default={}, help='the settings as JSON, e.g. {"dense": "rowwise"}')
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ckpt-dir", help=f"save a sharded checkpoint here every {EVERY} steps")
    parser.add_argument("--resume", help="a checkpoint to resume from")
    parser.add_argument("--export", help="also write a Hugging Face folder here when training ends")
    parser.add_argument("--out", required=True)
    parser.add_argument("--then", type=json.loads, action="append", default=[], metavar="JSON",
                        help="after this run, train another in the same processes (saving the start-up of new "
                        "ones): a JSON object of the options that differ, e.g. "
                        '{"float8": {}, "resume": "ck/epoch=0-step=2.ckpt", "out": "b.pt"}')  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [args]
    for changes in args.then:
        assert set(changes) <= set(vars(args)) - {"dims", "then"}, f"--then cannot set {changes}"
        runs.append(argparse.Namespace(**{**vars(args), **changes}))
    assert len({run.out for run in runs}) == len(runs), "each run needs its own out"
    for run in runs:
        train(run)
    finish()


if __name__ == "__main__":
    main()
