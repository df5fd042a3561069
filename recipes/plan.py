"""Print a recipe's parameter counts, parallel layout, per-GPU memory plan and FLOPs per token.

python -m recipes.plan mini                   # the recipe's own layout
python -m recipes.plan 1t --nodes 64 --ep 8   # what if
"""

from __future__ import annotations

import argparse

from ling.flops import H100_SXM_BF16_PEAK_FLOPS, training_flops_per_token
from ling.params import count_parameters, format_table
from ling.planner import AC_MODES, LayoutError, format_plan, plan_memory
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
    args = parser.parse_args(argv)
    try:
        recipe = get_recipe(args.recipe)
        names = ("nodes", "gpus_per_node", "ep", "dp_replicate", "micro_batch", "seq_len", "gpu_memory_gb")
        changes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        if args.ac is not None:
            changes["activation_checkpointing"] = args.ac
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


if __name__ == "__main__":
    main()
