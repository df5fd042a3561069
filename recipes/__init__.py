"""Training recipes: one source of truth per model size (tiny, mini, flash, 1t).

A recipe names a ling preset and holds the Ling 2.0 report's training plan for it (peak LR, warmup,
batch and its ramp, MTP weight, router bias-update rates, AdamW settings, init std) plus an example
parallel layout on which every stage it ships fits 80 GB H100s on paper (`python -m recipes.plan
<name>` shows the plan; a stage that fits no layout is left out of the config, with the reason).

Batch sizes are in sequences (the report's Table 1 gives 4,400 / 8,352 / 18,144 without units; at
4,096 tokens that is 18.0M / 34.2M / 74.3M tokens per step). The report ramps the batch from 3,024
over the first ~500B tokens; here, as Megatron's `--rampup-batch-size start increment samples` does,
the batch grows from `batch_ramp_start` by `batch_ramp_increment` sequences in equal steps over
`batch_ramp_samples` = round(500e9 / seq_len) sequences. The increment of each real recipe equals its
layout's data-parallel ranks x micro-batch, so every batch of the ramp, not only the final one, is a
whole number of micro-batches per rank (accumulation grows by one micro-batch per increment).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

from ling.config import LingConfig
from ling.data.curriculum import Curriculum, Stage
from ling.data.errors import DataError
from ling.data.sources import SourceSpec
from ling.planner import ParallelLayout
from ling.presets import PRESETS, preset
from ling.schedules import BatchRamp, ramp_global_batch

RAMP_TOKENS = 500e9  # the report ramps the batch size over roughly the first 500B tokens


class RecipeError(ValueError):
    """A recipe name or value that cannot describe a training run."""


def ramp_samples(seq_len: int, tokens: float = RAMP_TOKENS) -> int:
    """Sequences of seq_len tokens in the ramp's token budget, rounded to the nearest integer."""
    return round(tokens / seq_len)


@dataclass
class Recipe:
    """Everything a run of one model size needs beyond the architecture itself.

    `layout.micro_batch` and `layout.seq_len` must equal `micro_batch` and `seq_len` (checked), so
    the memory plan always describes the run. All ranks are data parallel (experts are carved out of
    them), so accumulate_grad_batches = global_batch / (layout.world * micro_batch).

    `left_out` holds stages of the plan that the exported config does not run (for instance because
    no layout of the strategy fits them in the GPU memory), with `left_out_reason` saying why; the
    plan CLI still shows their memory, and the config's header names them.
    """

    name: str
    preset: str
    peak_lr: float
    warmup_steps: int
    global_batch: int
    seq_len: int
    micro_batch: int
    layout: ParallelLayout
    train_tokens: int = 20 * 10**12  # the report's 4K pre-training stage: 20T tokens
    model_overrides: dict = field(default_factory=dict)
    mtp_loss_weight: float = 0.1
    bias_update_rate: float = 1e-3
    bias_update_rate_after_extension: float = 1e-4
    init_std: float = 0.006
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    batch_ramp_start: int | None = None
    batch_ramp_increment: int | None = None
    batch_ramp_samples: int | None = None
    tokenizer: str = "byte"
    sources: dict[str, SourceSpec] = field(default_factory=lambda: {"pydoc": SourceSpec("pydoc")})
    stages: list[Stage] = field(default_factory=list)
    batch_mode: str = "tokens"
    export_rope_scaling: dict | None = None  # written into the exported HF config (context extension at inference)
    left_out: list[Stage] = field(default_factory=list)
    left_out_reason: str | None = None
    # trainer.deterministic: torch's deterministic algorithms, so that reruns and resumes repeat the
    # losses bit for bit (a few percent slower on CPU).
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.preset.lower() not in PRESETS:
            raise RecipeError(f"recipe {self.name!r} names preset {self.preset!r}; choose one of {sorted(PRESETS)}.")
        for name in ("warmup_steps", "global_batch", "seq_len", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "warmup_steps" else 1):
                raise RecipeError(f"recipe {self.name!r}: {name}={value!r} must be a positive integer.")
        if (self.layout.micro_batch, self.layout.seq_len) != (self.micro_batch, self.seq_len):
            raise RecipeError(
                f"recipe {self.name!r}: layout micro_batch={self.layout.micro_batch}, seq_len={self.layout.seq_len} "
                f"must equal the recipe's micro_batch={self.micro_batch}, seq_len={self.seq_len}."
            )
        ramp = (self.batch_ramp_start, self.batch_ramp_increment, self.batch_ramp_samples)
        if any(v is not None for v in ramp):
            start, inc, samples = ramp
            if any(not isinstance(v, int) or v <= 0 for v in ramp):
                raise RecipeError(
                    f"recipe {self.name!r}: batch ramp start={start!r}, increment={inc!r}, samples={samples!r} "
                    "must all be positive integers (or all None for no ramp)."
                )
            if start >= self.global_batch or (self.global_batch - start) % inc:
                raise RecipeError(
                    f"recipe {self.name!r}: the batch ramp must start below global_batch={self.global_batch} and "
                    f"reach it in whole increments, but start={start} with increment={inc} does not."
                )
        if bool(self.left_out) != bool(self.left_out_reason):
            raise RecipeError(
                f"recipe {self.name!r}: left_out stages and left_out_reason go together (a stage is left "
                "out of the config for a stated reason)."
            )
        shipped = {stage.name for stage in self.stages}
        clash = [stage.name for stage in self.left_out if stage.name in shipped]
        if clash:
            raise RecipeError(f"recipe {self.name!r}: stage {clash[0]!r} is both in stages and in left_out.")
        if self.stages:
            budgets = sum(stage.tokens or 0 for stage in self.stages)
            if budgets > self.train_tokens:
                raise RecipeError(
                    f"recipe {self.name!r}: the stages' token budgets add up to {budgets:,}, more than "
                    f"train_tokens={self.train_tokens:,}."
                )

    def curriculum(self, stages: list[Stage] | None = None) -> Curriculum:
        """The data plan (of `stages`, default the recipe's) on this recipe's layout; every stage's batch
        must be whole micro-batches per rank."""
        stages = self.stages if stages is None else stages
        try:
            return Curriculum(stages or [Stage(seq_len=self.seq_len)], list(self.sources), self.seq_len,
                              self.micro_batch, self.global_batch, self.batch_ramp, self.layout.world,
                              self.batch_mode)  # fmt: skip
        except DataError as err:
            raise RecipeError(f"recipe {self.name!r}: {err}") from None

    # ---- derived values -----------------------------------------------------------------------
    def config(self) -> LingConfig:
        """The model config: the preset, the overrides, then this recipe's init std and MTP weight."""
        return preset(
            self.preset,
            **{
                **self.model_overrides,
                "initializer_range": self.init_std,
                "mtp_loss_scaling_factor": self.mtp_loss_weight,
            },
        )

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def data_parallel_size(self) -> int:
        return self.layout.world

    def accumulation_for(self, batch: int) -> float:
        """Micro-batches per rank for a global batch of `batch` sequences (may be fractional)."""
        return batch / (self.data_parallel_size * self.micro_batch)

    @property
    def accumulate_grad_batches(self) -> int:
        """global_batch / (data-parallel ranks x micro_batch); a clear error when not a whole number."""
        per_step = self.data_parallel_size * self.micro_batch
        if self.global_batch % per_step:
            raise RecipeError(
                f"recipe {self.name!r}: global_batch={self.global_batch} is not a multiple of {per_step} "
                f"({self.data_parallel_size} ranks x micro_batch {self.micro_batch}); pick nodes x gpus_per_node x "
                f"micro_batch dividing {self.global_batch}."
            )
        return self.global_batch // per_step

    @property
    def ramp_increments(self) -> int:
        if self.batch_ramp_start is None:
            return 0
        return (self.global_batch - self.batch_ramp_start) // self.batch_ramp_increment

    @property
    def batch_ramp(self) -> BatchRamp | None:
        if self.batch_ramp_start is None:
            return None
        return BatchRamp(self.batch_ramp_start, self.batch_ramp_increment, self.batch_ramp_samples)

    def global_batch_at(self, consumed_samples: int) -> int:
        """The ramped global batch after `consumed_samples` sequences (Megatron's rampup rule)."""
        return ramp_global_batch(self.batch_ramp, self.global_batch, consumed_samples)

    @property
    def max_steps(self) -> int:
        """Optimizer steps to train on train_tokens at the full batch (the ramp's smaller early
        batches make the real token count slightly lower)."""
        return math.ceil(self.train_tokens / self.tokens_per_step)

    def with_layout(self, **changes) -> Recipe:
        """This recipe on another layout; micro_batch and seq_len changes apply to both."""
        micro_batch = changes.get("micro_batch", self.micro_batch)
        seq_len = changes.get("seq_len", self.seq_len)
        layout = dataclasses.replace(self.layout, **{**changes, "micro_batch": micro_batch, "seq_len": seq_len})
        return dataclasses.replace(self, layout=layout, micro_batch=micro_batch, seq_len=seq_len)


LONG_SEQ_LEN = 32768
YARN_128K = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": LONG_SEQ_LEN}
REPORT_SOURCES = {
    "general": SourceSpec("data/general"),
    "reasoning": SourceSpec("data/reasoning"),
    "long": SourceSpec("data/long"),
    "cot": SourceSpec("data/cot"),
}


def report_stages(global_batch: int, seq_len: int, ranks: int) -> list[Stage]:
    """The Ling 2.0 report's data plan (its §3.2 and Figure 5).

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
    seq_len, micro_batch = 4096, 1
    layout = ParallelLayout(nodes=nodes, ep=ep, activation_checkpointing="full", micro_batch=micro_batch,
                            seq_len=seq_len)  # fmt: skip
    plan = report_stages(global_batch, seq_len, layout.world)
    unknown = sorted(set(leave_out) - {stage.name for stage in plan})
    if unknown:
        raise RecipeError(f"recipe {name!r} leaves out stage {unknown[0]!r}, which is not a report stage.")
    stages = [stage for stage in plan if stage.name not in leave_out]
    return Recipe(
        train_tokens=sum(stage.tokens for stage in stages),
        tokenizer=f"checkpoints/Ling-{name}-2.0",
        sources=copy.deepcopy(REPORT_SOURCES),
        stages=stages,
        left_out=[stage for stage in plan if stage.name in leave_out],
        left_out_reason=reason,
        export_rope_scaling=dict(YARN_128K) if any(s.seq_len == LONG_SEQ_LEN for s in stages) else None,
        name=name,
        preset=name,
        peak_lr=peak_lr,
        warmup_steps=2000,
        global_batch=global_batch,
        seq_len=seq_len,
        micro_batch=micro_batch,
        layout=layout,
        batch_ramp_start=3024,
        batch_ramp_increment=layout.world * micro_batch,
        batch_ramp_samples=ramp_samples(seq_len),
    )


from recipes.flash import FLASH  # noqa: E402
from recipes.mini import MINI  # noqa: E402
from recipes.one_t import ONE_T  # noqa: E402
from recipes.tiny import TINY  # noqa: E402

RECIPES: dict[str, Recipe] = {"tiny": TINY, "mini": MINI, "flash": FLASH, "1t": ONE_T}


def get_recipe(name: str) -> Recipe:
    """A copy of the recipe registered under `name` (case-insensitive), safe to modify."""
    key = str(name).lower()
    if key not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    return copy.deepcopy(RECIPES[key])


__all__ = ["RECIPES", "Recipe", "RecipeError", "get_recipe", "ramp_samples", "report_recipe"]
