"""Train the tiny model with WSM merging under LingParallelStrategy on CPU/gloo; launched by
tests/test_wsm_callback.py with torchrun. Rank 0 writes the per-step losses and every merge: its record
and the full merged weights, gathered while the merge is swapped in."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from callbacks.wsm import WSM  # noqa: E402
from ling.parallel.strategy import LingParallelStrategy  # noqa: E402
from tests.parallel_setup import Record, dist_trainer, finish, make_data, make_module  # noqa: E402


class GatherWSM(WSM):
    """Keeps each merge's full weights (a collective gather: every rank is in `on_merged`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full: list[dict] = []

    def on_merged(self, trainer, pl_module, record):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(pl_module.model, options=options)
        # On CPU a plain (unsharded) buffer comes back as the live tensor itself: copy it.
        self.full.append({name: t.clone() for name, t in state.items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="1,2,2", help="dp_replicate,dp_shard,ep")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dp_replicate, dp_shard, ep = (int(v) for v in args.dims.split(","))
    strategy = LingParallelStrategy(dp_replicate, dp_shard, ep, param_dtype=None, reduce_dtype=None)
    record = Record()
    wsm = GatherWSM(interval=2, count=2, shape="1-sqrt", val_batches=1, save_hf=True)
    trainer = dist_trainer(strategy, args.steps, [record, wsm], args.out + ".root")
    module = make_module()
    trainer.fit(module, datamodule=make_data())
    if trainer.is_global_zero:
        torch.save({"losses": record.losses, "merges": wsm.merges, "full": wsm.full}, args.out)
    finish()


if __name__ == "__main__":
    main()
