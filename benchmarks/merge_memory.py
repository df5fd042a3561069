"""Time and peak memory of WSM merging for a ~1B-parameter bf16 Ling model on CPU.

The model (1.04B parameters: 5 layers, hidden 2048, 4 MoE layers of 64 experts 512 wide, vocab 32768)
is built on the meta device and materialised in bf16 (expert_bias in fp32). Then, one step at a time:
- `MergeAccumulator(state)` and `add` of `--snapshots` snapshots with the 1-sqrt weights (the model's
  tensors are changed in place between snapshots, as training would): the in-training merge. Its peak
  RSS growth must stay within one fp32 accumulator plus one tensor's fp32 cast;
- the same accumulation with the chunked cast switched off (whole tensors cast to fp32 by `add_`);
- `merged()` (a new copy of the model in its own dtypes) and `copy_into` the live tensors;
- unless `--no-offline`: `ling.merge.merge_checkpoints` over the snapshots saved as HF folders.
Peak RSS growth is Linux VmHWM after resetting it (`/proc/self/clear_refs` 5).

    .venv/bin/python benchmarks/merge_memory.py [--snapshots 4] [--threads 1] [--no-offline]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dist"))

import torch  # noqa: E402
from sharded_io import peak_rss_mb, reset_peak  # noqa: E402

import ling.wsm as wsm  # noqa: E402
from ling import preset  # noqa: E402
from ling.model import build_model  # noqa: E402

MB = 2**20


def bench_config():
    return preset(
        "tiny", vocab_size=32768, hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
        num_hidden_layers=5, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        num_experts=64, n_group=8, topk_group=4, num_experts_per_tok=8, num_nextn_predict_layers=0,
        mtp_loss_scaling_factor=0.0,
    )  # fmt: skip


def materialise(config) -> torch.nn.Module:
    """The model in bf16 (expert_bias fp32) without an fp32 copy on the way: meta -> empty -> random."""
    model = build_model(config, device="cpu", dtype=torch.bfloat16, init=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=generator)
    return model


def perturb(state: dict[str, torch.Tensor], step: int) -> None:
    """Change every floating tensor in place, as an optimizer step would (no allocation)."""
    with torch.no_grad():
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor.mul_(1.0 - 0.01 * step)


def accumulate(state, weights) -> tuple[wsm.MergeAccumulator, float, float, list[float]]:
    """Construct + add every snapshot: (accumulator, seconds, peak growth MB, seconds per add).

    The time leaves out the in-place changes between snapshots; the peak covers the whole loop."""
    before = reset_peak()
    start = time.perf_counter()
    acc = wsm.MergeAccumulator(state)
    built = time.perf_counter() - start
    adds = []
    for j, weight in enumerate(weights):
        perturb(state, j)
        tick = time.perf_counter()
        acc.add(state, weight)
        adds.append(time.perf_counter() - tick)
    return acc, built + sum(adds), peak_rss_mb() - before, adds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-offline", action="store_true", help="skip the offline merge of saved HF folders")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = bench_config()
    model = materialise(config)
    state = model.state_dict()
    params = sum(t.numel() for t in state.values())
    model_mb = sum(t.nbytes for t in state.values()) / MB
    acc_mb = sum(t.numel() * 4 for t in state.values() if t.is_floating_point()) / MB
    largest = max(t.numel() for t in state.values())
    largest_fp32_mb = largest * 4 / MB
    chunk_mb = min(largest, wsm.CAST_CHUNK) * 4 / MB
    weights = wsm.merge_weights("1-sqrt", args.snapshots)
    rows = []

    acc, seconds, growth, adds = accumulate(state, weights)
    rows.append((f"accumulate {args.snapshots} (chunked cast)", seconds, growth,
                 f"acc {acc_mb:,.0f} + largest {largest_fp32_mb:,.0f} = {acc_mb + largest_fp32_mb:,.0f}"))  # fmt: skip
    per_add = sum(adds) / len(adds)
    reference = acc.merged()
    del acc

    chunk, wsm.CAST_CHUNK = wsm.CAST_CHUNK, 1 << 62
    try:
        perturb(state, -sum(range(args.snapshots)))  # any values: only time and memory are compared
        whole, seconds, growth, whole_adds = accumulate(state, weights)
    finally:
        wsm.CAST_CHUNK = chunk
    rows.append((f"accumulate {args.snapshots} (whole-tensor cast)", seconds, growth,
                 f"acc {acc_mb:,.0f} + largest {largest_fp32_mb:,.0f} = {acc_mb + largest_fp32_mb:,.0f}"))  # fmt: skip
    del reference

    before = reset_peak()
    start = time.perf_counter()
    merged = whole.merged()
    rows.append(("merged() (new tensors)", time.perf_counter() - start, peak_rss_mb() - before,
                 f"model {model_mb:,.0f}"))  # fmt: skip
    del merged
    before = reset_peak()
    start = time.perf_counter()
    whole.copy_into(state)
    rows.append(("copy_into(live state)", time.perf_counter() - start, peak_rss_mb() - before,
                 f"largest fp32 {largest_fp32_mb:,.0f}"))  # fmt: skip
    del whole

    offline_note = "offline merge: skipped (--no-offline)"
    if not args.no_offline:
        try:
            from ling.checkpoint import save_pretrained
            from ling.merge import merge_checkpoints
        except ImportError as err:
            offline_note = f"offline merge: not measured ({err})"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                folders = []
                for j in range(args.snapshots):
                    perturb(state, j)
                    folders.append(tmp / f"step-{j}")
                    save_pretrained(model, folders[-1], max_shard_size="500MB")
                before = reset_peak()
                start = time.perf_counter()
                merge_checkpoints(folders, shape="1-sqrt", out=tmp / "merged", max_shard_size="500MB")
                rows.append((f"ling.merge of {args.snapshots} HF folders", time.perf_counter() - start,
                             peak_rss_mb() - before, "one fp32 group + one input group"))  # fmt: skip
            offline_note = "offline merge: HF folders of 500 MB shards, bf16 output, on local disk"

    print(f"model: {params / 1e9:.2f}B parameters, {model_mb:,.0f} MB in bf16 ({len(state)} tensors, largest "
          f"{largest / 1e6:.1f}M elements); fp32 accumulator {acc_mb:,.0f} MB; weights 1-sqrt "
          f"{[round(w, 4) for w in weights]}; {args.threads} thread(s)")  # fmt: skip
    whole_add = sum(whole_adds) / len(whole_adds)
    print(f"cast chunk: {chunk_mb:,.0f} MB fp32; one add: {per_add:.2f} s chunked, {whole_add:.2f} s whole-tensor")
    print(f"{'step':<40}{'time s':>9}{'peak RSS growth MB':>21}   bound / compared with (MB)")
    for name, seconds, growth, bound in rows:
        print(f"{name:<40}{seconds:>9.2f}{growth:>21,.0f}   {bound}")
    print(offline_note)


if __name__ == "__main__":
    main()
