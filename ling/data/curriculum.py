"""Training stages and the batch shape of every optimizer step.

A stage fixes the sequence length, the mixture of sources, the rope settings and optionally the
router bias-update rate and the learning rate, for a budget of tokens or steps. The batch size is
given in sequences of the base `seq_len` (and may ramp up, Megatron style); by default a stage
with longer sequences keeps the tokens per step and per micro-batch constant by taking fewer rows
(`batch_mode: tokens`, as OLMo's sequence-length schedule does), or it keeps the row count
(`batch_mode: sequences`, as Ling's own Megatron scripts do). The stage of a step is a pure
function of the step number, so the switch happens at the exact step in a run and in its resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ling.config import ConfigError, check_rope_scaling, is_number
from ling.data.errors import DataError
from ling.schedules import BatchRamp, check_ramp, ramp_global_batch

BATCH_MODES = ("tokens", "sequences")
# How far mixture weights may sum from 1 (decimal weights such as 0.432 + 0.368 + 0.2 are not exact).
WEIGHT_TOLERANCE = 1e-6


@dataclass
class Stage:
    """One stage of the curriculum. Unset fields take the run's defaults (data.seq_len,
    data.mixture, the model's rope settings, model.bias_update_rate, the optimizer's lr)."""

    name: str = "main"
    tokens: int | None = None  # global token budget; the stage ends at the step that reaches it
    steps: int | None = None  # or a number of optimizer steps
    seq_len: int | None = None
    mixture: dict[str, float] | None = None  # source name -> weight (the weights sum to 1)
    global_batch_size: int | None = None  # rows per step at this stage's seq_len (overrides the ramp rule)
    rope_theta: float | None = None
    rope_scaling: dict | None = None  # e.g. {type: yarn, factor: 4.0, original_max_position_embeddings: 32768}
    bias_update_rate: float | None = None
    lr: float | None = None


@dataclass(frozen=True)
class StepShape:
    """What optimizer step `step` trains on: its stage and batch shape (`Curriculum.at(step)`)."""

    step: int
    stage: int
    step_in_stage: int
    seq_len: int
    global_rows: int  # rows over all data-parallel ranks
    rows: int  # rows per micro-batch
    micro_batches: int  # micro-batches per rank

    @property
    def tokens(self) -> int:
        return self.global_rows * self.seq_len


def check_curriculum(
    stages: list[Stage], sources: list[str], batch_mode: str = "tokens", default_mixture: dict[str, float] | None = None
) -> list[list[float]]:
    """The checks that need no batch shape or rank count: the batch mode and each stage's own
    settings (budget, lengths, mixture, rope, rates). Returns each stage's weight per source."""
    if batch_mode not in BATCH_MODES:
        raise DataError(f"data.batch_mode={batch_mode!r} is not one of {', '.join(BATCH_MODES)}.")
    if not stages:
        raise DataError("data.stages is an empty list; give at least one stage or leave it unset.")
    weights = [_weights(stage, sources, default_mixture) for stage in stages]
    for index, stage in enumerate(stages):
        _check_settings(stage, last=index == len(stages) - 1)
    return weights


def _weights(stage: Stage, sources: list[str], default: dict[str, float] | None) -> list[float]:
    mixture, where = (
        (stage.mixture, f"stage {stage.name!r}") if stage.mixture is not None else (default, "data.mixture")
    )
    if mixture is None:  # equal weights (the sampler normalises them)
        return [1.0] * len(sources)
    if not isinstance(mixture, dict):
        raise DataError(f"{where}: mixture={mixture!r} must map source names to weights.")
    unknown = [name for name in mixture if name not in sources]
    if unknown:
        raise DataError(f"{where} mixes source {unknown[0]!r}, which is not in data.sources ({', '.join(sources)}).")
    for name, weight in mixture.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
            raise DataError(f"{where} gives source {name!r} weight {weight!r}; weights must be >= 0.")
    total = sum(mixture.values())
    if total <= 0:
        raise DataError(f"{where} has mixture weights that are all zero; give one a positive weight.")
    if not math.isfinite(total) or abs(total - 1) > WEIGHT_TOLERANCE:
        shares = ", ".join(f"{name}: {weight / total:.4g}" for name, weight in mixture.items())
        raise DataError(
            f"{where} has mixture weights that sum to {total:.10g}, not 1; give shares that sum to 1 (e.g. {shares})."
        )
    return [float(mixture.get(name, 0.0)) for name in sources]


def _check_settings(stage: Stage, last: bool) -> None:
    if stage.tokens is not None and stage.steps is not None:
        raise DataError(f"stage {stage.name!r} sets both tokens and steps; give one budget.")
    for field in ("tokens", "steps", "seq_len", "global_batch_size"):
        value = getattr(stage, field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DataError(f"stage {stage.name!r}: {field}={value!r} must be a positive integer.")
    if not last and stage.tokens is None and stage.steps is None:
        raise DataError(f"stage {stage.name!r} is not the last stage, so it needs a budget (tokens or steps) to end.")
    for field, positive in (("rope_theta", True), ("lr", True), ("bias_update_rate", False)):
        value = getattr(stage, field)
        if value is None:
            continue
        if not is_number(value) or value < 0 or (positive and value == 0):
            raise DataError(
                f"stage {stage.name!r}: {field}={value!r} must be a number {'> 0' if positive else '>= 0'} (or unset)."
            )
    try:
        check_rope_scaling(stage.rope_scaling)
    except ConfigError as err:
        raise DataError(f"stage {stage.name!r}: {err}") from None


class Curriculum:
    """The stage and batch shape of every optimizer step of a run on `ranks` data-parallel ranks
    (`at(step)`), walked from step 0 on first use; the shapes of every stage are checked at construction."""

    def __init__(
        self,
        stages: list[Stage],
        sources: list[str],
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        ramp: BatchRamp | None = None,
        ranks: int = 1,
        batch_mode: str = "tokens",
        default_mixture: dict[str, float] | None = None,
    ):
        self.weights = check_curriculum(stages, sources, batch_mode, default_mixture)
        check_ramp(ramp, global_batch_size)
        self.stages, self.sources, self.base_seq_len = stages, sources, seq_len
        self.micro_batch_size, self.global_batch_size, self.ramp = micro_batch_size, global_batch_size, ramp
        self.ranks, self.batch_mode = ranks, batch_mode
        for stage in stages:
            self._check_shapes(stage)
        # Walked lazily: stage, step-in-stage and tokens consumed before each step.
        self._steps: list[StepShape] = []
        self._next = (0, 0, 0, 0)  # (step, stage, step_in_stage, tokens_before) of the next step to build
        self._stage_tokens = 0

    def _check_shapes(self, stage: Stage) -> None:
        batches = {self.global_batch_size}
        if self.ramp is not None:
            batches |= {self.ramp.start, self.ramp.start + self.ramp.increment}
        for batch in sorted(batches):  # rows grow linearly with the batch: start, start + increment, target suffice
            self.shape(stage, batch)

    # ---- the batch shape ------------------------------------------------------------------------
    def shape(self, stage: Stage, batch: int) -> tuple[int, int, int, int]:
        """(seq_len, global rows, rows per micro-batch, micro-batches per rank) for a base batch."""
        T0, m0 = self.base_seq_len, self.micro_batch_size
        T = stage.seq_len or T0
        if stage.global_batch_size is not None:
            rows_global = stage.global_batch_size
        elif self.batch_mode == "tokens":
            if (batch * T0) % T:
                raise DataError(
                    f"stage {stage.name!r}: a batch of {batch} x {T0} tokens is not a whole number of "
                    f"{T}-token rows; pick a seq_len dividing {batch * T0} or set the stage's global_batch_size."
                )
            rows_global = batch * T0 // T
        else:
            rows_global = batch
        if self.batch_mode == "sequences":
            rows = m0
        elif m0 * T0 >= T:
            if (m0 * T0) % T:
                raise DataError(
                    f"stage {stage.name!r}: a micro-batch of {m0} x {T0} tokens is not a whole number of "
                    f"{T}-token rows; use a seq_len dividing {m0 * T0}."
                )
            rows = m0 * T0 // T
        else:
            rows = 1  # a row longer than the base micro-batch: one row per micro-batch
        if rows_global % (rows * self.ranks):
            raise DataError(
                f"stage {stage.name!r}: {rows_global} rows of {T} tokens per step are not a whole number of "
                f"micro-batches of {rows} row(s) on {self.ranks} rank(s); set the stage's global_batch_size "
                f"to a multiple of {rows * self.ranks}."
            )
        return T, rows_global, rows, rows_global // (rows * self.ranks)

    def at(self, step: int) -> StepShape:
        """The stage and batch shape of optimizer step `step` (counted from 0)."""
        while len(self._steps) <= step:
            self._steps.append(self._build_next())
        return self._steps[step]

    def _build_next(self) -> StepShape:
        step, index, in_stage, tokens_before = self._next
        stage = self.stages[index]
        batch = ramp_global_batch(self.ramp, self.global_batch_size, tokens_before // self.base_seq_len)
        T, rows_global, rows, micro = self.shape(stage, batch)
        shape = StepShape(step, index, in_stage, T, rows_global, rows, micro)
        self._stage_tokens += shape.tokens
        done = (stage.tokens is not None and self._stage_tokens >= stage.tokens) or (
            stage.steps is not None and in_stage + 1 >= stage.steps
        )
        if done and index + 1 < len(self.stages):
            self._next = (step + 1, index + 1, 0, tokens_before + shape.tokens)
            self._stage_tokens = 0
        else:
            self._next = (step + 1, index, in_stage + 1, tokens_before + shape.tokens)
        return shape
