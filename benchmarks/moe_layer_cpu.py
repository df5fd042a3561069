"""CPU benchmark: forward + backward of one Ling MoE layer, grouped GEMM vs per-expert loop.

One MoE block with 64 routed experts (top-8 from 4 of 8 groups) and one shared expert. The grouped
path runs all experts with `torch._grouped_mm` over tokens sorted by expert; the loop path runs
one `F.linear` triple per expert. Both paths share the router, so they must agree to rounding;
the script checks that before timing and prints a table last.

    .venv/bin/python benchmarks/moe_layer_cpu.py                # 2 threads, 1024 and 4096 tokens
    .venv/bin/python benchmarks/moe_layer_cpu.py --threads 8 --tokens 1024 4096 16384
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Runnable from a checkout without installing the project (ling.model needs only torch).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ling.dtypes import DTYPES  # noqa: E402
from ling.model.moe import MoE  # noqa: E402
from ling.presets import preset  # noqa: E402

# The dtypes compared, each with the largest |grouped - loop| relative to max |loop| that still counts as agreement.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def make_config(hidden: int, intermediate: int, experts: int):
    return preset(
        "tiny",
        hidden_size=hidden,
        moe_intermediate_size=intermediate,
        num_experts=experts,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        num_shared_experts=1,
    )


def build_moe(cfg, dtype: torch.dtype, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0.0, 0.02)
        # A non-zero selection bias, as after some balancing steps.
        moe.gate.expert_bias.normal_(0.0, 0.01)
    return moe.to(dtype)


def step(moe: MoE, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One forward + backward with a real loss; the CPU grouped-GEMM backward rejects expanded grads."""
    moe.zero_grad(set_to_none=True)
    x.grad = None
    y, _ = moe(x)
    (y * g).sum().backward()
    return y


def check(moe: MoE, x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Relative max |grouped - loop| of the output and of the input / expert-weight gradients."""
    results = {}
    for use_loop in (True, False):
        moe.use_loop = use_loop
        y = step(moe, x, g).detach().float()
        grads = {"y": y, "dx": x.grad.float()}
        grads.update({f"d{n}": p.grad.float() for n, p in moe.experts.named_parameters()})
        results[use_loop] = grads
    ref, got = results[True], results[False]
    return {k: ((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30)).item() for k in ref}


def time_path(moe: MoE, x: torch.Tensor, g: torch.Tensor, use_loop: bool, warmup: int, repeats: int) -> float:
    moe.use_loop = use_loop
    for _ in range(warmup):
        step(moe, x, g)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(moe, x, g)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="tokens per batch")
    parser.add_argument("--dtypes", nargs="+", choices=list(TOLERANCE), default=list(TOLERANCE))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = make_config(args.hidden, args.intermediate, args.experts)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; MoE layer: hidden {cfg.hidden_size}, "
        f"{cfg.num_experts} experts x {cfg.moe_intermediate_size} (top-{cfg.num_experts_per_tok}, "
        f"{cfg.topk_group} of {cfg.n_group} groups), {cfg.num_shared_experts} shared expert"
    )

    rows, failures = [], []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        moe = build_moe(cfg, dtype)
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(tokens)
            x = torch.randn(1, tokens, cfg.hidden_size, generator=gen).to(dtype).requires_grad_()
            g = torch.randn(1, tokens, cfg.hidden_size, generator=gen).to(dtype)
            diffs = check(moe, x, g)
            worst = max(diffs.values())
            ok = worst <= TOLERANCE[dtype_name]
            if not ok:
                failures.append((tokens, dtype_name))
            detail = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            verdict = "ok" if ok else "MISMATCH"
            print(f"check {tokens:>6} tokens {dtype_name}: rel. max|grouped-loop| {detail} -> {verdict}")
            grouped = time_path(moe, x, g, False, args.warmup, args.repeats)
            loop = time_path(moe, x, g, True, args.warmup, args.repeats)
            print(f"time  {tokens:>6} tokens {dtype_name}: grouped {grouped:.1f} ms, loop {loop:.1f} ms")
            rows.append((tokens, dtype_name, grouped, loop, loop / grouped, worst))

    print()
    print(f"MoE layer fwd+bwd, median of {args.repeats} after {args.warmup} warm-up, {args.threads} threads")
    print(f"{'tokens':>7} {'dtype':>8} {'grouped ms':>11} {'loop ms':>9} {'speed-up':>9} {'max rel diff':>13}")
    for tokens, dtype_name, grouped, loop, speedup, worst in rows:
        print(f"{tokens:>7} {dtype_name:>8} {grouped:>11.1f} {loop:>9.1f} {speedup:>8.2f}x {worst:>13.1e}")
    if failures:
        print(f"grouped and loop paths disagree for {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
