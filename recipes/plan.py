"""Print a recipe's parameter counts, parallel layout, per-GPU memory plan, data stages and FLOPs per token.

python -m recipes.plan mini                   # the recipe's own layout
python -m recipes.plan 1t --nodes 64 --ep 8   # what if
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import textwrap

from ling.data.errors import DataError
from ling.flops import H100_SXM_BF16_PEAK_FLOPS, training_flops_per_token
from ling.params import count_parameters, format_table
from ling.planner import AC_MODES, LayoutError, MemoryPlan, format_plan, plan_memory
from recipes import RECIPES, Recipe, RecipeError, get_recipe


def describe_batch(recipe: Recipe) -> list[str]:
    per_step = recipe.data_parallel_size * recipe.micro_batch
    lines = [
        f"global batch {recipe.global_batch:,} x {recipe.seq_len:,} tokens = {recipe.tokens_per_step:,} tokens per "
        f"step; peak LR {recipe.peak_lr:.3g}, warmup {recipe.warmup_steps:,} steps"
    ]
    try:
        lines.append(
            f"accumulate_grad_batches {recipe.accumulate_grad_batches} "
            f"(= {recipe.global_batch:,} / ({recipe.data_parallel_size} ranks x micro-batch {recipe.micro_batch}))"
        )
    except RecipeError:
        lines.append(
            f"accumulate_grad_batches: NOT a whole number ({recipe.global_batch:,} / {per_step} = "
            f"{recipe.accumulation_for(recipe.global_batch):.2f}); this layout cannot run the recipe's batch exactly"
        )
    if recipe.batch_ramp_start is not None:
        start = recipe.accumulation_for(recipe.batch_ramp_start)
        whole = recipe.batch_ramp_start % per_step == 0 and recipe.batch_ramp_increment % per_step == 0
        lines.append(
            f"batch ramp {recipe.batch_ramp_start:,} -> {recipe.global_batch:,} in {recipe.ramp_increments} steps of "
            f"{recipe.batch_ramp_increment:,} over {recipe.batch_ramp_samples:,} sequences; accumulation starts at "
            f"{start:g}" + ("" if whole else " (ramp batches are not whole micro-batches per rank on this layout)")
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.plan", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help=f"one of {', '.join(RECIPES)}")
    parser.add_argument("--nodes", type=int, help="nodes (default: the recipe's layout)")
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
        recipe = get_recipe(args.recipe)
        names = ("nodes", "gpus_per_node", "ep", "dp_replicate", "micro_batch", "seq_len", "gpu_memory_gb")
        changes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        if args.ac is not None:
            changes["activation_checkpointing"] = args.ac
        if args.loss_chunk is not None:
            changes["loss_chunk_tokens"] = args.loss_chunk or None
        if changes:
            recipe = recipe.with_layout(**changes)
        config = recipe.config()
        plan = plan_memory(config, recipe.layout)
    except (RecipeError, LayoutError) as err:
        parser.error(str(err))

    print(f"recipe {recipe.name!r}: preset {recipe.preset!r}")
    print(format_table("parameters", count_parameters(config)))
    print()
    print("layout: " + recipe.layout.describe())
    for line in describe_batch(recipe):
        print(line)
    print()
    print(format_plan(plan))
    print()
    stages = describe_stages(recipe)
    if stages:
        print("\n".join(stages))
        print()
    with_mtp = training_flops_per_token(config, recipe.seq_len)
    without = training_flops_per_token(config, recipe.seq_len, include_mtp=False)
    print(f"training FLOPs per token at seq_len {recipe.seq_len:,} (forward + backward, ling.flops):")
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
    if not recipe.stages:
        return []
    config = recipe.config()
    header = f"{'stage':<14}{'seq_len':>8}{'tokens':>9}{'~steps':>10}{'rows/step':>10}{'rows/mb':>8}{'mb/rank':>8}"
    lines = ["data stages (at the full batch)", header + f"{'GB/GPU':>8}  mixture"]
    try:
        shipped = recipe.curriculum()
        left_out = recipe.curriculum(recipe.left_out) if recipe.left_out else None
    except RecipeError as err:
        return [f"data stages: {err}"]
    rows = [_stage_line(recipe, config, shipped, stage) for stage in recipe.stages]
    lines += [line for line, _ in rows]
    if recipe.left_out:
        lines += textwrap.wrap(f"left out of the config: {recipe.left_out_reason}.", 100, subsequent_indent="  ")
        rows += [_stage_line(recipe, config, left_out, stage) for stage in recipe.left_out]
        lines += [line for line, _ in rows[len(recipe.stages) :]]
    over = [plan for _, plan in rows if plan is not None and not plan.fits]
    if over:
        lines.append("! more than the GPU memory on this layout; " + _largest_item(max(over, key=lambda p: p.total)))
    return lines


def _stage_line(recipe: Recipe, config, curriculum, stage) -> tuple[str, MemoryPlan | None]:
    try:
        seq_len, rows, per_micro, micro = curriculum.shape(stage, recipe.global_batch)
    except DataError as err:
        return f"{stage.name:<14}{err}", None
    plan = plan_memory(config, dataclasses.replace(recipe.layout, seq_len=seq_len, micro_batch=per_micro))
    tokens = _count(stage.tokens) if stage.tokens else "open"
    steps = f"{math.ceil(stage.tokens / (rows * seq_len)):,}" if stage.tokens else "-"
    mixture = ", ".join(f"{k} {v:g}" for k, v in (stage.mixture or {}).items()) or "equal"
    memory = f"{plan.total / 1e9:.1f}" + ("" if plan.fits else "!")
    shape = f"{rows:>10,}{per_micro:>8}{micro:>8}"
    return f"{stage.name:<14}{seq_len:>8,}{tokens:>9}{steps:>10}{shape}{memory:>8}  {mixture}", plan


def _largest_item(plan: MemoryPlan) -> str:
    """Which line item of a plan that does not fit is the largest, in GB."""
    detail = plan.activation_detail
    loss = "the whole-logits loss" if plan.layout.loss_chunk_tokens is None else "the chunked loss"
    items = {
        "model states": plan.model_states,
        "gathered params and gradient buffers": plan.gathered_params + plan.gradient_buffers,
        "activations stored for backward": detail["stored"],
        loss: detail["loss"],
        "one block's recompute": detail["recompute"],
    }
    name = max(items, key=items.__getitem__)
    tokens = plan.layout.micro_batch * plan.layout.seq_len
    return (
        f"at {tokens:,} tokens per micro-batch the largest item is {name} ({items[name] / 1e9:.1f} GB "
        f"of {plan.total / 1e9:.1f} GB; activations {plan.activations / 1e9:.1f} GB)"
    )


if __name__ == "__main__":
    main()
