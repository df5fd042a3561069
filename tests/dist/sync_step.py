"""Two training steps of the tiny model under LingParallelStrategy on CPU/gloo with a `SyncCounter`
around each; launched by tests/test_host_sync.py with torchrun. Each rank writes what its steps
asked the host for to <out>.<rank>.json."""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from ling.parallel.strategy import LingParallelStrategy  # noqa: E402
from tests.parallel_setup import dist_trainer, finish, make_data, make_module  # noqa: E402
from tests.test_host_sync import CountSteps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="1,2,2", help="dp_replicate,dp_shard,ep")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dp_replicate, dp_shard, ep = (int(v) for v in args.dims.split(","))
    strategy = LingParallelStrategy(dp_replicate, dp_shard, ep, param_dtype=None, reduce_dtype=None)
    count = CountSteps()
    trainer = dist_trainer(strategy, 2, [count], args.out + ".root", enable_checkpointing=False)
    module = make_module()
    trainer.fit(module, datamodule=make_data())
    report = count.report(module, ep=ep)
    Path(f"{args.out}.{trainer.global_rank}.json").write_text(json.dumps(report))
    finish()


if __name__ == "__main__":
    main()
