"""`Recipe`: one training run of one model size, held as the arguments train.py's YAML passes on.

`trainer`, `model` and `data` are the init arguments of Lightning's `Trainer`, `LingModule` and
`LingDataModule` (the YAML's `trainer:`, `model:` and `data:` sections); the strategy, loggers,
callbacks and plugins are `class_path` / `init_args` entries of `trainer`, as in the YAML. Every key,
nested ones included, is checked against the real signature when the recipe is made, so a misspelt
key is an error naming the recipe, the key and the valid names. Besides the arguments a recipe holds
only what is no argument: its name, its token budget (max_steps follows from it), the GPU memory its
stages must fit by the estimate, and the stages it leaves out of its config with the reason.

Settings a class leaves to its own defaults are read through `settings(section)`, which fills them in
from the signature, so a default lives only in the class that declares it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Trainer

from ling.config import ConfigError, LingConfig
from ling.data.curriculum import Curriculum, Stage, check_curriculum
from ling.data.datamodule import LingDataModule
from ling.data.errors import DataError
from ling.lightning_module import LingModule
from ling.memory import MemoryEstimate, estimate_memory
from ling.parallel.layout import ParallelDims
from ling.parallel.strategy import LingParallelStrategy
from ling.presets import preset
from ling.schedules import check_ramp, ramp_global_batch

STRATEGY = f"{LingParallelStrategy.__module__}.{LingParallelStrategy.__qualname__}"
SECTIONS = {"trainer": Trainer, "model": LingModule, "data": LingDataModule}


class RecipeError(ValueError):
    """A recipe name or value that cannot describe a training run."""


@dataclass
class Recipe:
    """One run: the Trainer, LingModule and LingDataModule arguments plus what is no argument.

    `trainer` holds every Trainer argument but max_steps, which is the number of full-batch steps that
    reaches `train_tokens`. `left_out` holds stages of the report that the config does not run (for
    instance because no layout of the strategy fits them in `gpu_memory_gb`), with `left_out_reason`
    saying why; `python -m recipes.describe` still shows their memory, and the config's header names
    them.
    """

    name: str
    train_tokens: int
    trainer: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    gpu_memory_gb: float
    left_out: list[Stage] = field(default_factory=list)
    left_out_reason: str | None = None

    def __post_init__(self) -> None:
        if "max_steps" in self.trainer:
            raise RecipeError(
                f"recipe {self.name!r}: trainer.max_steps follows from train_tokens={self.train_tokens!r}; "
                "set train_tokens instead."
            )
        for section, target in SECTIONS.items():
            _check_args(self.name, section, target, getattr(self, section))
        if not isinstance(self.train_tokens, int) or isinstance(self.train_tokens, bool) or self.train_tokens < 1:
            raise RecipeError(f"recipe {self.name!r}: train_tokens={self.train_tokens!r} must be a positive integer.")
        if bool(self.left_out) != bool(self.left_out_reason):
            raise RecipeError(
                f"recipe {self.name!r}: left_out stages and left_out_reason go together (a stage is left "
                "out of the config for a stated reason)."
            )
        data = self.settings("data")
        if not data["sources"]:
            raise RecipeError(f"recipe {self.name!r}: data.sources is empty; a recipe names the sources it trains on.")
        stages = data["stages"] or []
        shipped = {stage.name for stage in stages}
        clash = [stage.name for stage in self.left_out if stage.name in shipped]
        if clash:
            raise RecipeError(f"recipe {self.name!r}: stage {clash[0]!r} is both in stages and in left_out.")
        budgets = sum(stage.tokens or 0 for stage in stages)
        if budgets > self.train_tokens:
            raise RecipeError(
                f"recipe {self.name!r}: the stages' token budgets add up to {budgets:,}, more than "
                f"train_tokens={self.train_tokens:,}."
            )
        try:
            self.parallel_dims.check(num_experts=self.config().num_experts)
            # The data module's own checks that need no rank count (stages, mixtures, ramp).
            check_curriculum(stages or [Stage(seq_len=data["seq_len"])], list(data["sources"]), data["batch_mode"],
                             data["mixture"])  # fmt: skip
            check_ramp(data["batch_ramp"], self.global_batch)
        except (ConfigError, DataError) as err:
            raise RecipeError(f"recipe {self.name!r}: {err}") from None

    # ---- the arguments, defaults filled in ----------------------------------------------------------
    def settings(self, section: str) -> dict[str, Any]:
        """Every argument of `section` ("trainer", "strategy", "model" or "data"), the class's own defaults
        filled in. Without a strategy entry, "strategy" gives LingParallelStrategy's defaults: one
        data-parallel group over all ranks, nothing recomputed."""
        if section == "strategy":
            target, args = LingParallelStrategy, self.strategy_args or {}
        else:
            target, args = SECTIONS[section], getattr(self, section)
        bound = inspect.signature(target).bind(**args)
        bound.apply_defaults()
        return dict(bound.arguments)

    @property
    def strategy_args(self) -> dict[str, Any] | None:
        """The LingParallelStrategy arguments of `trainer.strategy`, or None without one."""
        strategy = self.trainer.get("strategy")
        if strategy is None:
            return None
        if not isinstance(strategy, dict) or strategy.get("class_path") != STRATEGY:
            raise RecipeError(
                f"recipe {self.name!r}: trainer.strategy={strategy!r} is not {STRATEGY}, the one strategy whose "
                "memory the estimate models."
            )
        return strategy.get("init_args", {})

    def config(self) -> LingConfig:
        """The model config: the preset with the model overrides."""
        model = self.settings("model")
        return preset(model["model"], **(model["model_overrides"] or {}))

    @property
    def world(self) -> int:
        """Processes of the run: trainer.devices x trainer.num_nodes (all of them data-parallel ranks)."""
        trainer = self.settings("trainer")
        devices, nodes = trainer["devices"], trainer["num_nodes"]
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise RecipeError(f"recipe {self.name!r}: trainer.devices={devices!r} must be a number of devices.")
        return devices * nodes

    @property
    def parallel_dims(self) -> ParallelDims:
        strategy = self.settings("strategy")
        try:
            return ParallelDims.for_world(self.world, strategy["dp_replicate"], strategy["dp_shard"], strategy["ep"])
        except ConfigError as err:
            raise RecipeError(f"recipe {self.name!r}: {err}") from None

    # ---- derived numbers ------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step at the base seq_len (the data module's default: one micro-batch per rank)."""
        data = self.settings("data")
        return data["global_batch_size"] or data["micro_batch_size"] * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.settings("data")["seq_len"]

    @property
    def max_steps(self) -> int:
        """Optimizer steps to train on train_tokens at the full batch (the ramp's smaller early
        batches make the real token count slightly lower)."""
        return math.ceil(self.train_tokens / self.tokens_per_step)

    def accumulation_for(self, batch: int) -> float:
        """Micro-batches per rank for a global batch of `batch` sequences (may be fractional)."""
        return batch / (self.world * self.settings("data")["micro_batch_size"])

    @property
    def accumulate_grad_batches(self) -> int:
        """global_batch / (data-parallel ranks x micro-batch); a clear error when not a whole number."""
        micro_batch = self.settings("data")["micro_batch_size"]
        per_step = self.world * micro_batch
        if self.global_batch % per_step:
            raise RecipeError(
                f"recipe {self.name!r}: global_batch_size={self.global_batch} is not a multiple of {per_step} "
                f"({self.world} ranks x micro_batch_size {micro_batch}); pick devices x num_nodes x "
                f"micro_batch_size dividing {self.global_batch}."
            )
        return self.global_batch // per_step

    def global_batch_at(self, consumed_samples: int) -> int:
        """The ramped global batch after `consumed_samples` sequences (Megatron's rampup rule)."""
        return ramp_global_batch(self.settings("data")["batch_ramp"], self.global_batch, consumed_samples)

    def curriculum(self, stages: list[Stage] | None = None) -> Curriculum:
        """The curriculum of `stages` (default: the recipe's) on the recipe's ranks, as the data module
        builds it; every stage's batch must be whole micro-batches per rank."""
        data = self.settings("data")
        stages = (data["stages"] or [Stage(seq_len=data["seq_len"])]) if stages is None else stages
        try:
            return Curriculum(stages, list(data["sources"]), data["seq_len"], data["micro_batch_size"],
                              self.global_batch, data["batch_ramp"], self.world, data["batch_mode"],
                              data["mixture"])  # fmt: skip
        except (ConfigError, DataError) as err:
            raise RecipeError(f"recipe {self.name!r}: {err}") from None

    def estimate(self, seq_len: int | None = None, micro_batch: int | None = None) -> MemoryEstimate:
        """The memory estimate per GPU with micro-batches of `micro_batch` rows of `seq_len` tokens
        (default: the base ones of the data module)."""
        data, strategy = self.settings("data"), self.settings("strategy")
        try:
            return estimate_memory(
                self.config(), self.parallel_dims, activation_checkpointing=strategy["activation_checkpointing"],
                micro_batch=micro_batch or data["micro_batch_size"], seq_len=seq_len or data["seq_len"],
                loss_chunk_tokens=self.settings("model")["loss_chunk_tokens"], gpu_memory_gb=self.gpu_memory_gb,
            )  # fmt: skip
        except ConfigError as err:
            raise RecipeError(f"recipe {self.name!r}: {err}") from None

    def describe_layout(self) -> str:
        trainer = self.settings("trainer")
        return (
            f"{trainer['num_nodes']} node(s) x {trainer['devices']} GPU = {self.world} ranks; "
            + self.estimate().describe()
        )

    def trainer_args(self) -> dict[str, Any]:
        """The Trainer's arguments as the config writes them: the recipe's, max_steps after `deterministic`."""
        args: dict[str, Any] = {}
        for key, value in self.trainer.items():
            args[key] = value
            if key == "deterministic":
                args["max_steps"] = self.max_steps
        args.setdefault("max_steps", self.max_steps)  # without a `deterministic` entry: last
        return args

    def with_args(self, gpu_memory_gb: float | None = None, **sections: dict[str, Any]) -> Recipe:
        """A checked copy with some arguments replaced: `sections` maps "trainer", "strategy", "model" or
        "data" to the arguments to change (a strategy entry is added when there is none)."""
        changes: dict[str, Any] = {}
        for section, args in sections.items():
            if section == "strategy":
                trainer = copy.deepcopy(changes.get("trainer", self.trainer))
                strategy = trainer.setdefault("strategy", {"class_path": STRATEGY})
                strategy["init_args"] = {**strategy.get("init_args", {}), **args}
                changes["trainer"] = trainer
            elif section in SECTIONS:
                changes[section] = {**changes.get(section, copy.deepcopy(getattr(self, section))), **args}
            else:
                raise RecipeError(f"{section!r} is not one of strategy, {', '.join(SECTIONS)}.")
        if gpu_memory_gb is not None:
            changes["gpu_memory_gb"] = gpu_memory_gb
        return dataclasses.replace(self, **changes)


# ---- checking arguments against the signatures --------------------------------------------------------
def _check_args(recipe: str, where: str, target: Any, args: Any) -> None:
    """That `args` (a dict) binds to the signature of `target`, and so do the `class_path` entries and
    settings dataclasses (given as dicts) among its values."""
    if not isinstance(args, dict):
        raise RecipeError(f"recipe {recipe!r}: {where} must be a mapping of argument names to values.")
    name = getattr(target, "__name__", str(target))
    signature = inspect.signature(target)
    try:
        signature.bind(**args)
    except TypeError as err:
        named = [p for p, v in signature.parameters.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
        unknown = [key for key in args if key not in signature.parameters]
        if not unknown:
            raise RecipeError(f"recipe {recipe!r}: {where} ({name}): {err}.") from None
        close = difflib.get_close_matches(unknown[0], named, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(
            f"recipe {recipe!r}: {where} ({name}) has no argument {unknown[0]!r}; {hint}valid ones are "
            f"{', '.join(named)}."
        ) from None
    hints = _type_hints(target)
    for key, value in args.items():
        _check_value(recipe, f"{where}.{key}", value, hints.get(key))


def _check_value(recipe: str, where: str, value: Any, hint: Any) -> None:
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(recipe, f"{where}[{index}]", item, None)
    elif isinstance(value, dict) and "class_path" in value:
        module, _, attr = value["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise RecipeError(
                f"recipe {recipe!r}: {where}: class_path {value['class_path']!r} names no importable class."
            ) from None
        _check_args(recipe, where, cls, value.get("init_args", {}))
    elif isinstance(value, dict) and _settings_class(hint) is not None:
        _check_args(recipe, where, _settings_class(hint), value)


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__)
    except Exception:  # annotations that do not resolve outside their module: only the names are checked
        return {}


def _settings_class(hint: Any) -> type | None:
    """The settings dataclass an argument takes (`OptimizerConfig | None` -> OptimizerConfig), if any."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((c for c in map(_settings_class, typing.get_args(hint)) if c is not None), None)
    return None
