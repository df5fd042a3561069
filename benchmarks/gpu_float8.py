"""GPU benchmark: float8 training (torchao) against bf16 on the "mini-e32 proxy", through the Trainer.

The proxy of benchmarks/gpu_mini_proxy.py (Ling-mini-2.0 shapes, 20 layers, 32 routed experts top-8
from 4 of 8 groups, one MTP layer; sequence 4096, micro-batch 2) trained as train.py trains:
LingModule + LingDataModule (the bundled text, byte tokenizer) + lightning.Trainer with
LingParallelStrategy at world size 1, compiled blocks, bf16 compute, chunked loss, full AdamW step.

For each setting (bf16; fp8 dense Linears; fp8 dense + routed experts) it reports the median
tokens/s over the timed steps after the warm-up (compile) steps, the MFU (training FLOPs per token
of ling.flops against the device's dense bf16 peak, for fp8 runs too), the peak allocated GPU memory
and the speed-up over bf16. The bf16 run goes on to --curve-steps steps, and the fastest fp8
setting then trains as many from the same seed on the same batches: the table gives each one's
final loss (mean of its last 10 steps) and their relative gap. The table is printed last.

    python benchmarks/gpu_float8.py                                   # bf16, dense, dense+experts
    python benchmarks/gpu_float8.py --dense-recipe tensorwise         # tensorwise dense scaling
    python benchmarks/gpu_float8.py --settings bf16,experts --curve-steps 0

CPU smoke run (tiny widths, emulated MXFP8 experts; fp8_rowwise experts need an sm89+ GPU):

    python benchmarks/gpu_float8.py --device cpu --hidden 128 --vocab 512 --layers 2 --seq 64 \\
        --batch 1 --steps 2 --warmup 1 --curve-steps 4 --no-compile --experts-recipe mxfp8_emulated
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# Runnable from a checkout without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.gpu_mini_proxy import proxy_config  # noqa: E402
from ling.data.datamodule import LingDataModule  # noqa: E402
from ling.flops import H100_SXM_BF16_PEAK_FLOPS, device_peak_flops, mfu, training_flops_per_token  # noqa: E402
from ling.lightning_module import LingModule  # noqa: E402
from ling.parallel.float8 import DENSE_RECIPES, EXPERT_RECIPES  # noqa: E402
from ling.parallel.strategy import LingParallelStrategy  # noqa: E402
from ling.presets import preset  # noqa: E402
from ling.schedules import ScheduleConfig  # noqa: E402

# Widths scaled together by --hidden (relative to Ling-mini's hidden size 2048).
SCALED = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "head_dim",
)


class StepTimer(L.Callback):
    """Every step's loss, and the wall time of steps warmup+1 .. warmup+steps (device synced at each step end)."""

    def __init__(self, warmup: int, steps: int, sync):
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.times: list[float] = []
        self.losses: list[float] = []
        self._last = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sync()
        now = time.perf_counter()
        if self.warmup < trainer.global_step <= self.warmup + self.steps:
            self.times.append(now - self._last)
        self._last = now
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def model_overrides(args, eos_id: int) -> dict:
    """The proxy's config as overrides of the `mini` preset, shrunk by --hidden and --vocab."""
    base, cfg = preset("mini"), proxy_config(args.layers, args.experts, args.seq)
    names = [f.name for f in dataclasses.fields(cfg) if f.name != "extra"]
    overrides = {k: getattr(cfg, k) for k in names if getattr(cfg, k) != getattr(base, k)}
    if args.hidden:
        for name in SCALED:
            overrides[name] = getattr(cfg, name) * args.hidden // cfg.hidden_size
    if args.vocab:  # the special ids then follow the tokenizer
        overrides.update(vocab_size=args.vocab, pad_token_id=eos_id, eos_token_id=eos_id)
    return overrides


def parse_setting(name: str, args) -> dict:
    """`bf16`, or `dense`, `experts` joined by `+`, into float8 settings."""
    parts = set(name.split("+"))
    if name != "bf16" and not parts <= {"dense", "experts"}:
        raise ValueError(f"unknown setting {name!r}; use bf16, or dense and experts joined by '+'")
    return {
        "dense": args.dense_recipe if "dense" in parts else "off",
        "experts": args.experts_recipe if "experts" in parts else "off",
    }


def train(args, device: torch.device, float8: dict, steps: int) -> dict:
    """One Trainer run of `steps` steps; its step times, losses, peak memory and model config."""
    on_cuda = device.type == "cuda"
    torch._inductor.config.emulate_precision_casts = False  # rowwise fp8 turns it on; bf16 runs want it off
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    L.seed_everything(args.seed, verbose=False)  # the same weights in every run (data: its own seed)
    data = LingDataModule(tokenizer=args.tokenizer, seq_len=args.seq, micro_batch_size=args.batch, seed=args.seed)
    module = LingModule(
        model="mini",
        model_overrides=model_overrides(args, data.tokenizer.eos_token_id),
        schedule=ScheduleConfig(warmup_steps=args.lr_warmup),
    )
    strategy = LingParallelStrategy(param_dtype="bfloat16", compile=args.compile, float8=float8)
    timer = StepTimer(args.warmup, args.steps, lambda: torch.cuda.synchronize(device) if on_cuda else None)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator=device.type, devices=1, strategy=strategy, max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=root,
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
    config = module.config
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else None
    if dist.is_initialized():  # the strategy's one-rank process group; the next run makes its own
        dist.destroy_process_group()
    del trainer, module, data, strategy
    torch.compiler.reset()  # drops the compiled blocks; runs never share (or run out of) recompilations
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return {"times": timer.times, "losses": timer.losses, "peak": peak, "config": config}


def peak_flops(args, device: torch.device) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of the device and where it came from (None on CPU)."""
    if device.type != "cuda":
        return None, "n/a on CPU"
    if args.peak_flops:
        return args.peak_flops, "from --peak-flops"
    found = device_peak_flops(device, torch.bfloat16)
    if found:
        return found, "from Lightning's get_available_flops"
    return H100_SXM_BF16_PEAK_FLOPS, "the H100/H200 SXM dense bf16 peak (Lightning lists none for this device)"


def torchao_version() -> str:
    try:
        return version("torchao")
    except PackageNotFoundError:
        return "not installed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="bf16,dense,dense+experts", help="comma-separated: bf16, dense+experts")
    parser.add_argument("--dense-recipe", default="rowwise", choices=[r for r in DENSE_RECIPES if r != "off"])
    parser.add_argument("--experts-recipe", default="fp8_rowwise", choices=[r for r in EXPERT_RECIPES if r != "off"])
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch size (one micro-batch per step)")
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (MTP layer extra)")
    parser.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer")
    parser.add_argument("--hidden", type=int, default=None, help="shrink: hidden size, other widths scaled along")
    parser.add_argument("--vocab", type=int, default=None, help="shrink: vocabulary size (default Ling-mini's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--curve-steps", type=int, default=200, help="steps of the loss curves (0: none)")
    parser.add_argument("--lr-warmup", type=int, default=20, help="learning-rate warm-up steps")
    parser.add_argument("--tokenizer", default="byte", help="LingDataModule tokenizer")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first timed step starts where the warm-up ends)")
    try:
        settings = {name: parse_setting(name, args) for name in args.settings.split(",")}
    except ValueError as err:
        parser.error(str(err))

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda needs a CUDA GPU, but torch {torch.__version__} finds none "
            "(--device cpu with small sizes runs the smoke test).",
            file=sys.stderr,
        )
        return 2
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    peak, peak_source = peak_flops(args, device)
    # The bf16 run of the timing table also gives the bf16 loss curve: it runs the longer of the two.
    want_curves = "bf16" in settings and len(settings) > 1 and args.curve_steps > 0
    results = {}
    for setting, float8 in settings.items():
        steps = args.warmup + args.steps
        run = train(args, device, float8, max(steps, args.curve_steps) if want_curves and setting == "bf16" else steps)
        tok_s = args.batch * args.seq / statistics.median(run["times"])
        utilisation = mfu(tok_s, training_flops_per_token(run["config"], args.seq), peak) if peak else None
        results[setting] = {**run, "tok_s": tok_s, "mfu": utilisation}
        print(f"{setting}: {tok_s:,.0f} tokens/s, loss at step {steps} {run['losses'][steps - 1]:.4f}", flush=True)

    curves = {}
    if want_curves:
        best = max((s for s in results if s != "bf16"), key=lambda s: results[s]["tok_s"])
        curves["bf16"] = results["bf16"]["losses"][: args.curve_steps]
        curves[best] = train(args, device, settings[best], args.curve_steps)["losses"]
        every = max(args.curve_steps // 10, 1)
        print(f"\nloss curves, bf16 vs {best} (seed {args.seed}, the same batches):")
        for step in range(every - 1, args.curve_steps, every):
            print(f"  step {step + 1:>5}: {curves['bf16'][step]:.4f}  {curves[best][step]:.4f}")
    final = {s: statistics.fmean(losses[-10:]) for s, losses in curves.items()}
    bf16 = results.get("bf16")

    command = shlex.join(["python", *sys.argv])
    print(f"\n{name} | torch {torch.__version__} | torchao {torchao_version()} | MFU peak "
          + (f"{peak / 1e12:.1f} TFLOP/s, {peak_source}" if peak else peak_source) + f" | {command}")  # fmt: skip
    print(
        f"| setting | dense | experts | tokens/s | MFU | peak GB | speed-up | "
        f"loss at {args.curve_steps} steps (last 10) | loss gap vs bf16 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for setting, r in results.items():
        float8 = settings[setting]
        utilisation = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak'] / 1e9:.1f}" if r["peak"] is not None else "n/a"
        speedup = f"{r['tok_s'] / bf16['tok_s']:.2f}x" if bf16 else "n/a"
        loss = f"{final[setting]:.4f}" if setting in final else "-"
        gap = f"{(final[setting] / final['bf16'] - 1):+.2%}" if setting in final and setting != "bf16" else "-"
        print(
            f"| {setting} | {float8['dense']} | {float8['experts']} | {r['tok_s']:,.0f} | {utilisation} | {memory} | "
            f"{speedup} | {loss} | {gap} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
