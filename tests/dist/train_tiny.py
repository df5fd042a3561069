"""Train the tiny model under LingParallelStrategy on CPU/gloo; launched by tests/test_parallel.py with
torchrun. Rank 0 writes the per-step losses, the full final weights and the expert biases."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from callbacks.hf_export import HFExport  # noqa: E402
from callbacks.sample_text import SampleText  # noqa: E402
from ling.parallel.strategy import LingParallelStrategy  # noqa: E402
from tests.parallel_setup import Record, dist_trainer, finish, make_data, make_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="1,2,1", help="dp_replicate,dp_shard,ep")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume")
    parser.add_argument("--export", help="also write a Hugging Face folder here when training ends")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dp_replicate, dp_shard, ep = (int(v) for v in args.dims.split(","))
    strategy = LingParallelStrategy(dp_replicate, dp_shard, ep, param_dtype=None, reduce_dtype=None)
    record, sample = Record(), SampleText(max_new_tokens=12)
    callbacks = [record, sample]
    if args.export:
        callbacks.append(HFExport(dirpath=args.export))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = dist_trainer(strategy, args.steps, callbacks, args.out + ".root")
    module = make_module()
    trainer.fit(module, datamodule=make_data(), ckpt_path=args.resume)
    state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        out = {"losses": record.losses, "state": state, "tokens_seen": module.tokens_seen, "sample": sample.text}
        torch.save(out, args.out)
    finish()


if __name__ == "__main__":
    main()
