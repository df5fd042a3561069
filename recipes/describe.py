"""Print a recipe's parameter counts, parallel layout, per-GPU memory estimate, data stages and FLOPs per token.

python -m recipes.describe mini                   # the recipe's own layout
python -m recipes.describe 1t --nodes 64 --ep 8   # what if
"""

from __future__ import annotations

import argparse
import math
import textwrap

from ling.config import ConfigError
from ling.data.errors import DataError
from ling.flops import H100_SXM_BF16_PEAK_FLOPS, training_flops_per_token
from ling.memory import MemoryEstimate, format_estimate
from ling.optim import OptimizerConfig
from ling.parallel.layout import AC_MODES
from ling.params import count_parameters, format_table
from ling.schedules import ScheduleConfig
from recipes import RECIPES, Recipe, RecipeError, get_recipe


def describe_batch(recipe: Recipe) -> list[str]:
    data, model = recipe.settings("data"), recipe.settings("model")
    micro_batch, ramp = data["micro_batch_size"], data["batch_ramp"]
    optimizer = OptimizerConfig(**(model["optimizer"] or {}))
    schedule = ScheduleConfig(**(model["schedule"] or {}))
    per_step = recipe.world * micro_batch
    lines = [
        f"global batch {recipe.global_batch:,} x {data['seq_len']:,} tokens = {recipe.tokens_per_step:,} tokens per "
        f"step; peak LR {optimizer.lr:.3g}, warmup {schedule.warmup_steps:,} steps"
    ]
    try:
        lines.append(
            f"accumulate_grad_batches {recipe.accumulate_grad_batches} "
            f"(= {recipe.global_batch:,} / ({recipe.world} ranks x micro-batch {micro_batch}))"
        )
    except RecipeError:
        lines.append(
            f"accumulate_grad_batches: NOT a whole number ({recipe.global_batch:,} / {per_step} = "
            f"{recipe.accumulation_for(recipe.global_batch):.2f}); this layout cannot run the recipe's batch exactly"
        )
    if ramp is not None:
        start = recipe.accumulation_for(ramp.start)
        whole = ramp.start % per_step == 0 and ramp.increment % per_step == 0
        increments = (recipe.global_batch - ramp.start) // ramp.increment
        lines.append(
            f"batch ramp {ramp.start:,} -> {recipe.global_batch:,} in {increments} steps of "
            f"{ramp.increment:,} over {ramp.ramp_samples:,} sequences; accumulation starts at "
            f"{start:g}" + ("" if whole else " (ramp batches are not whole micro-batches per rank on this layout)")
        )
    return lines


def what_if(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """The recipe with the command line's layout changes; a new rank count re-derives dp_shard."""

    def given(**values):
        return {key: value for key, value in values.items() if value is not None}

    trainer = given(num_nodes=args.nodes, devices=args.gpus_per_node)
    strategy = given(ep=args.ep, dp_replicate=args.dp_replicate, activation_checkpointing=args.ac)
    if trainer or args.dp_replicate is not None:
        strategy["dp_shard"] = None  # world / dp_replicate
    data = given(micro_batch_size=args.micro_batch, seq_len=args.seq_len)
    model = {} if args.loss_chunk is None else {"loss_chunk_tokens": args.loss_chunk or None}
    named = {"trainer": trainer, "strategy": strategy, "data": data, "model": model}
    sections = {name: changes for name, changes in named.items() if changes}
    if not sections and args.gpu_memory_gb is None:
        return recipe
    return recipe.with_args(gpu_memory_gb=args.gpu_memory_gb, **sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.describe", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help=f"one of {', '.join(RECIPES)}")
    parser.add_argument("--nodes", type=int, help="nodes (default: the recipe's)")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--ep", type=int, help="expert-parallel degree")
    parser.add_argument("--dp-replicate", type=int, help="HSDP replicas (default 1)")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--ac", choices=AC_MODES, help="activation checkpointing")
    parser.add_argument("--gpu-memory-gb", type=float)
    parser.add_argument("--loss-chunk", type=int, help="tokens per chunk of the loss (0: whole logits)")
    args = parser.parse_args(argv)
    try:
        recipe = what_if(get_recipe(args.recipe), args)
        config = recipe.config()
        estimate = recipe.estimate()
        layout = recipe.describe_layout()
    except (RecipeError, ConfigError) as err:
        parser.error(str(err))

    seq_len = recipe.settings("data")["seq_len"]
    print(f"recipe {recipe.name!r}: preset {recipe.settings('model')['model']!r}")
    print(format_table("parameters", count_parameters(config)))
    print()
    print("layout: " + layout)
    for line in describe_batch(recipe):
        print(line)
    print()
    print(format_estimate(estimate))
    print()
    stages = describe_stages(recipe)
    if stages:
        print("\n".join(stages))
        print()
    with_mtp = training_flops_per_token(config, seq_len)
    without = training_flops_per_token(config, seq_len, include_mtp=False)
    print(f"training FLOPs per token at seq_len {seq_len:,} (forward + backward, ling.flops):")
    unit, scale = ("GFLOP", 1e9) if without >= 1e9 else ("MFLOP", 1e6)
    print(f"  with MTP ({config.num_nextn_predict_layers} layer) {with_mtp / scale:>10.2f} {unit}")
    print(f"  without MTP        {without / scale:>10.2f} {unit}")
    print(
        f"  100% MFU on an H100 (bf16 dense peak {H100_SXM_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s) = "
        f"{H100_SXM_BF16_PEAK_FLOPS / with_mtp:,.0f} tokens/s per GPU"
    )


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.4g}{unit}"
    return str(n)


def describe_stages(recipe: Recipe) -> list[str]:
    """One line per data stage at the full batch: length, budget, steps, batch shape, memory per GPU,
    mixture; then the stages the recipe leaves out of its config, with the reason."""
    stages = recipe.settings("data")["stages"]
    if not stages:
        return []
    header = f"{'stage':<14}{'seq_len':>8}{'tokens':>9}{'~steps':>10}{'rows/step':>10}{'rows/mb':>8}{'mb/rank':>8}"
    lines = ["data stages (at the full batch)", header + f"{'GB/GPU':>8}  mixture"]
    try:
        shipped = recipe.curriculum()
        left_out = recipe.curriculum(recipe.left_out) if recipe.left_out else None
    except RecipeError as err:
        return [f"data stages: {err}"]
    rows = [_stage_line(recipe, shipped, stage) for stage in stages]
    lines += [line for line, _ in rows]
    if recipe.left_out:
        lines += textwrap.wrap(f"left out of the config: {recipe.left_out_reason}.", 100, subsequent_indent="  ")
        rows += [_stage_line(recipe, left_out, stage) for stage in recipe.left_out]
        lines += [line for line, _ in rows[len(stages) :]]
    over = [estimate for _, estimate in rows if estimate is not None and not estimate.fits]
    if over:
        lines.append("! more than the GPU memory on this layout; " + _largest_item(max(over, key=lambda e: e.total)))
    return lines


def _stage_line(recipe: Recipe, curriculum, stage) -> tuple[str, MemoryEstimate | None]:
    try:
        seq_len, rows, per_micro, micro = curriculum.shape(stage, recipe.global_batch)
    except DataError as err:
        return f"{stage.name:<14}{err}", None
    estimate = recipe.estimate(seq_len=seq_len, micro_batch=per_micro)
    tokens = _count(stage.tokens) if stage.tokens else "open"
    steps = f"{math.ceil(stage.tokens / (rows * seq_len)):,}" if stage.tokens else "-"
    mixture = ", ".join(f"{k} {v:g}" for k, v in (stage.mixture or {}).items()) or "equal"
    memory = f"{estimate.total / 1e9:.1f}" + ("" if estimate.fits else "!")
    shape = f"{rows:>10,}{per_micro:>8}{micro:>8}"
    return f"{stage.name:<14}{seq_len:>8,}{tokens:>9}{steps:>10}{shape}{memory:>8}  {mixture}", estimate


def _largest_item(estimate: MemoryEstimate) -> str:
    """Which line item of an estimate that does not fit is the largest, in GB."""
    detail = estimate.activation_detail
    loss = "the whole-logits loss" if estimate.loss_chunk_tokens is None else "the chunked loss"
    items = {
        "model states": estimate.model_states,
        "gathered params and gradient buffers": estimate.gathered_params + estimate.gradient_buffers,
        "activations stored for backward": detail["stored"],
        loss: detail["loss"],
        "one block's recompute": detail["recompute"],
    }
    name = max(items, key=items.__getitem__)
    tokens = estimate.micro_batch * estimate.seq_len
    return (
        f"at {tokens:,} tokens per micro-batch the largest item is {name} ({items[name] / 1e9:.1f} GB "
        f"of {estimate.total / 1e9:.1f} GB; activations {estimate.activations / 1e9:.1f} GB)"
    )


if __name__ == "__main__":
    main()
