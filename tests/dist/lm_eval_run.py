"""Train the tiny model under LingParallelStrategy on CPU/gloo with the LMEval callback; launched by
tests/test_lm_eval_callback.py with torchrun. Every rank writes the scores it logged to `<out>.rank<r>`."""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from callbacks.lm_eval import LMEval  # noqa: E402
from ling.parallel.strategy import LingParallelStrategy  # noqa: E402
from tests.parallel_setup import dist_trainer, finish, make_data, make_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="1,2,2", help="dp_replicate,dp_shard,ep")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--callback", required=True, help="LMEval's arguments as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dp_replicate, dp_shard, ep = (int(v) for v in args.dims.split(","))
    strategy = LingParallelStrategy(dp_replicate, dp_shard, ep, param_dtype=None, reduce_dtype=None)
    callback = LMEval(**json.loads(args.callback), output_dir=args.out + ".lm_eval")
    trainer = dist_trainer(strategy, args.steps, [callback], args.out + ".root")
    trainer.fit(make_module(), datamodule=make_data())
    record = {"scores": callback.scores, "output_dir": str(callback.output_dir)}
    Path(f"{args.out}.rank{trainer.global_rank}").write_text(json.dumps(record))
    finish()


if __name__ == "__main__":
    main()
