"""Load HF folders into a FSDP2 + expert-parallel model and export it again, measuring each rank's peak
memory; launched by tests/test_sharded_io.py (and benchmarks/checkpoint_memory.py) with torchrun.

For each `--hf FOLDER`: the sharded load, the peak RSS growth of the load and of a bf16 export,
and (with --gather) the gathered full state, written by rank 0 to `--out` as a torch file.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from ling.checkpoint import load_hf_weights, save_pretrained  # noqa: E402
from ling.checkpoint.load import pretrained_config  # noqa: E402
from ling.model import build_model  # noqa: E402
from ling.model.dtensor import local  # noqa: E402
from ling.parallel import ParallelDims, ParallelPlan, build_mesh, parallelize  # noqa: E402


def memory_config():
    """The model of the memory measurements: about 0.9 GB in bf16, 3 MoE layers of 96 experts 1024 x 512."""
    from ling import preset

    return preset(
        "tiny", vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_experts=96,
        n_group=8, topk_group=4, num_experts_per_tok=8, num_nextn_predict_layers=0, mtp_loss_scaling_factor=0.0,
    )  # fmt: skip


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


def reset_peak() -> float:
    """Reset the peak RSS to the current RSS (Linux `clear_refs` 5) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", action="append", required=True)
    parser.add_argument("--dims", default="1,2,2", help="dp_replicate,dp_shard,ep")
    parser.add_argument("--export", action="append", default=[], help="bf16 export folder, one per --hf")
    parser.add_argument("--gather", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dims = ParallelDims(*(int(v) for v in args.dims.split(",")))
    mesh = build_mesh(dims, "cpu")
    results = []
    for i, folder in enumerate(args.hf):
        model = build_model(pretrained_config(folder), device="meta")
        parallelize(model, mesh, ParallelPlan(param_dtype=None, reduce_dtype=None))
        model.to_empty(device="cpu")
        local_bytes = sum(local(t).nbytes for t in model.state_dict().values())
        dist.barrier()
        before = reset_peak()
        load_hf_weights(model, folder)
        result = {"local_bytes": local_bytes, "load_peak_mb": peak_rss_mb() - before}
        dist.barrier()
        if args.gather:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            result["state"] = get_model_state_dict(model, options=options)
        if i < len(args.export):
            dist.barrier()
            before = reset_peak()
            save_pretrained(model, args.export[i], max_shard_size="300MB", dtype=torch.bfloat16)
            result["export_peak_mb"] = peak_rss_mb() - before
            # What gathering the largest tensor alone costs (the export gathers one tensor at a time).
            largest = max(model.state_dict().values(), key=lambda t: t.numel())
            dist.barrier()
            before = reset_peak()
            gathered = largest.to(torch.bfloat16).full_tensor()
            result["gather_peak_mb"] = peak_rss_mb() - before
            result["largest_mb"] = gathered.nbytes / 2**20
            del gathered
        results.append(result)
        del model
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [{k: v for k, v in r.items() if k != "state"} for r in results])
    if dist.get_rank() == 0:
        for r, per_rank in zip(results, zip(*gathered, strict=True), strict=True):
            r["ranks"] = list(per_rank)
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
