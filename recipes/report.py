"""How the Ling 2.0 report trains its models, shared by the mini, flash and 1t recipes.

Batch sizes are in sequences (the report's Table 1 gives 4,400 / 8,352 / 18,144 without units; at
4,096 tokens that is 18.0M / 34.2M / 74.3M tokens per step). The report ramps the batch from 3,024
over the first ~500B tokens; here, as Megatron's `--rampup-batch-size start increment samples` does,
the batch grows from `start` by `increment` sequences in equal steps over `ramp_samples` =
round(500e9 / seq_len) sequences. The increment equals the recipe's data-parallel ranks x
micro-batch, so every batch of the ramp, not only the final one, is a whole number of micro-batches
per rank (accumulation grows by one micro-batch per increment).
"""

from __future__ import annotations

import copy

from ling.data.curriculum import Stage
from ling.data.sources import SourceSpec
from ling.schedules import BatchRamp
from recipes.common import ADAMW, PLUGINS, TRAINING, callbacks, loggers
from recipes.recipe import STRATEGY, Recipe, RecipeError

RAMP_TOKENS = 500e9  # the report ramps the batch size over roughly the first 500B tokens
LONG_SEQ_LEN = 32768
YARN_128K = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": LONG_SEQ_LEN}
REPORT_SOURCES = {
    "general": SourceSpec("data/general"),
    "reasoning": SourceSpec("data/reasoning"),
    "long": SourceSpec("data/long"),
    "cot": SourceSpec("data/cot"),
}


def ramp_samples(seq_len: int, tokens: float = RAMP_TOKENS) -> int:
    """Sequences of seq_len tokens in the ramp's token budget, rounded to the nearest integer."""
    return round(tokens / seq_len)


def report_stages(global_batch: int, seq_len: int, ranks: int) -> list[Stage]:
    """The Ling 2.0 report's data stages (its §3.2 and Figure 5).

    Pre-training at 4K: two 10T-token stages with 68/32 then 54/46 general/reasoning data. Context
    extension: 150B tokens at 32K in which 20% of the sequences come from long documents and the
    rest keeps the previous mixture; the router bias-update rate drops to 1e-4 from here. Reasoning
    pre-activation: 600B tokens of 55/45 general / chain-of-thought data (the report raises the LR
    here but gives no value, so the stage keeps the run's LR; set the stage's `lr` to change it).
    128K comes from YaRN at inference (factor 4 on 32K), written into the exported config.

    The 32K stages keep the tokens per step, rounded down to whole micro-batches on `ranks` ranks.
    """
    long_rows = global_batch * seq_len // LONG_SEQ_LEN // ranks * ranks
    return [
        Stage("pretrain_1", tokens=10 * 10**12, seq_len=seq_len, mixture={"general": 0.68, "reasoning": 0.32}),
        Stage("pretrain_2", tokens=10 * 10**12, seq_len=seq_len, mixture={"general": 0.54, "reasoning": 0.46}),
        Stage(
            "long_context", tokens=150 * 10**9, seq_len=LONG_SEQ_LEN, global_batch_size=long_rows,
            mixture={"general": 0.432, "reasoning": 0.368, "long": 0.2}, bias_update_rate=1e-4,  # 0.8 x (54/46)
        ),
        Stage(
            "reasoning", tokens=600 * 10**9, seq_len=LONG_SEQ_LEN, global_batch_size=long_rows,
            mixture={"general": 0.55, "cot": 0.45}, bias_update_rate=1e-4,
        ),
    ]  # fmt: skip


def report_recipe(
    name: str, peak_lr: float, global_batch: int, nodes: int, ep: int,
    leave_out: tuple[str, ...] = (), reason: str | None = None,
) -> Recipe:  # fmt: skip
    """A real-size recipe as the Ling 2.0 report trains it: 4,096-token sequences, 2,000 warmup steps,
    the batch ramped from 3,024 over ~500B tokens, on `nodes` x 8 H100-80GB with full activation
    checkpointing and micro-batch 1. The ramp increment is the rank count, so every ramp batch is a
    whole number of micro-batches per rank (accumulation grows by one per increment).

    `leave_out` names report stages the config does not run, for `reason`; train_tokens counts the
    stages it runs, and YaRN is written at export only when a 32K stage is among them (the 128K
    context is YaRN on a model trained at 32K)."""
    seq_len, micro_batch, devices, every = 4096, 1, 8, 1000
    ranks = nodes * devices
    every_stage = report_stages(global_batch, seq_len, ranks)
    unknown = sorted(set(leave_out) - {stage.name for stage in every_stage})
    if unknown:
        raise RecipeError(f"recipe {name!r} leaves out stage {unknown[0]!r}, which is not a report stage.")
    stages = [stage for stage in every_stage if stage.name not in leave_out]
    out_dir = f"outputs/{name}"
    rope_scaling = dict(YARN_128K) if any(stage.seq_len == LONG_SEQ_LEN for stage in stages) else None
    return Recipe(
        name=name,
        train_tokens=sum(stage.tokens for stage in stages),
        trainer={
            "accelerator": "gpu",
            "devices": devices,
            "num_nodes": nodes,
            "strategy": {
                "class_path": STRATEGY,
                "init_args": {"dp_replicate": 1, "dp_shard": ranks, "ep": ep, "activation_checkpointing": "full"},
            },
            "precision": "32-true",  # the strategy's FSDP2 policy computes in bf16 over fp32 master weights
            "deterministic": False,
            "log_every_n_steps": 10,
            "val_check_interval": every,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "default_root_dir": out_dir,
            "logger": loggers(out_dir, tensorboard=True),
            "callbacks": callbacks(every, export_dtype="bfloat16", rope_scaling=rope_scaling),
            "plugins": PLUGINS,
        },
        model={
            "model": name,
            "model_overrides": None,
            **TRAINING,
            "optimizer": {"lr": peak_lr, **ADAMW},
            "schedule": {"name": "wsm", "warmup_steps": 2000},
        },
        data={
            "sources": copy.deepcopy(REPORT_SOURCES),
            "tokenizer": f"checkpoints/Ling-{name}-2.0",
            "seq_len": seq_len,
            "micro_batch_size": micro_batch,
            "global_batch_size": global_batch,
            "batch_ramp": BatchRamp(start=3024, increment=ranks * micro_batch, ramp_samples=ramp_samples(seq_len)),
            "batch_mode": "tokens",
            "stages": stages,
        },
        gpu_memory_gb=80.0,
        left_out=[stage for stage in every_stage if stage.name in leave_out],
        left_out_reason=reason,
    )
