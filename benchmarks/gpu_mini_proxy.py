"""GPU benchmark: the "mini-e32 proxy", Ling-mini-2.0 shapes with 32 routed experts, on one GPU.

Ling-mini-2.0 (hidden 2048, 16 heads / 4 KV heads, expert width 512, first layer dense, one shared
expert, one MTP layer, the full 157K vocabulary) with 32 instead of 256 routed experts so that 20
layers fit one 80 GB GPU. bf16 weights, sequence 4096, micro-batch 2; each step is forward with
labels (main + MTP loss) and backward, no optimizer. Reports the median tokens/s after warm-up and
the peak allocated memory, after checking that the grouped-GEMM expert path matches the
per-expert loop. The table is printed last.

    python benchmarks/gpu_mini_proxy.py                  # grouped experts, eager
    python benchmarks/gpu_mini_proxy.py --compile        # torch.compile per decoder layer
    python benchmarks/gpu_mini_proxy.py --loop           # per-expert loop baseline
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

# Runnable from a checkout without installing the project (ling.model needs only torch).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ling.model import IGNORE_INDEX, build_model  # noqa: E402
from ling.model.moe import MoE  # noqa: E402
from ling.presets import preset  # noqa: E402


def proxy_config(layers: int, experts: int, seq: int):
    # 32 experts in 8 groups of 4: top-8 from the 4 best groups (16 candidates), as in the report's
    # group-limited routing; validation rejects shapes where top-8 is unreachable.
    return preset(
        "mini",
        num_hidden_layers=layers,
        num_experts=experts,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        num_nextn_predict_layers=1,
        max_position_embeddings=max(seq, 4096),
    )


def expert_path_check(cfg, device: torch.device, tokens: int) -> dict[str, str]:
    """Max |grouped - loop| of one MoE block's output, bf16 and fp32, on a small random input."""
    torch.manual_seed(0)
    moe = MoE(cfg).to(device)
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0.0, cfg.initializer_range)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device)
    diffs = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        moe = moe.to(dtype)
        try:
            with torch.no_grad():
                moe.use_loop = True
                ref, _ = moe(x.to(dtype))
                moe.use_loop = False
                got, _ = moe(x.to(dtype))
        except RuntimeError as err:  # a dtype this build's grouped GEMM does not support
            diffs[name] = f"n/a ({str(err).splitlines()[0][:80]})"
            continue
        diff = (got.float() - ref.float()).abs().max().item()
        diffs[name] = f"{diff:.2e} (rel {diff / ref.float().abs().max().item():.1e})"
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch size")
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (MTP layer extra)")
    parser.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder and MTP layer")
    parser.add_argument("--loop", action="store_true", help="per-expert Python loop instead of grouped GEMM")
    parser.add_argument("--check-tokens", type=int, default=1024, help="tokens for the grouped-vs-loop check")
    # Smoke path for machines without a GPU: --device cpu --seq 64 --layers 2 --steps 1 --warmup 0
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print(
            "error: no CUDA device found; this benchmark needs a GPU (torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}).",
            file=sys.stderr,
        )
        return 2
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    device_name = (
        torch.cuda.get_device_name(device) if on_cuda else f"CPU ({platform.processor() or platform.machine()})"
    )

    cfg = proxy_config(args.layers, args.experts, args.seq)
    print(
        f"mini-e{cfg.num_experts} proxy: {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP, "
        f"hidden {cfg.hidden_size}, {cfg.num_experts} experts top-{cfg.num_experts_per_tok} "
        f"({cfg.topk_group} of {cfg.n_group} groups), vocab {cfg.vocab_size}; "
        f"batch {args.batch} x seq {args.seq}; {device_name}, torch {torch.__version__}"
    )

    diffs = expert_path_check(cfg, device, args.check_tokens)
    print(
        f"expert path check ({args.check_tokens} tokens): max|grouped-loop| float32 {diffs['float32']}, "
        f"bfloat16 {diffs['bfloat16']}"
    )

    model = build_model(cfg, device=device, dtype=torch.bfloat16)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    for moe in model.moe_layers():
        moe.use_loop = args.loop
    if args.compile:  # in place, as ling.parallel.parallelize compiles blocks (the names stay as they are)
        for layer in [*model.model.layers, *model.model.mtp_layers]:
            layer.compile()

    gen = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device, generator=gen)
    labels = torch.cat([input_ids[:, 1:], input_ids.new_full((args.batch, 1), IGNORE_INDEX)], dim=1)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(input_ids, labels=labels)
        out.loss.backward()
        return out.loss.item()

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    peak = f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}" if on_cuda else "n/a"

    print()
    print(f"{device_name}, torch {torch.__version__}, {n_params / 1e9:.2f}B params (bf16), last loss {loss:.3f}")
    print(f"forward+backward with labels, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'experts':>8} {'compile':>8} {'batch x seq':>12} {'step ms':>9} {'tokens/s':>10} {'peak GB':>8}")
    print(
        f"{'loop' if args.loop else 'grouped':>8} {'yes' if args.compile else 'no':>8} "
        f"{f'{args.batch} x {args.seq}':>12} {step_s * 1e3:>9.1f} {tokens / step_s:>10,.0f} {peak:>8}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
