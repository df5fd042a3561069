"""Float8 training with torchao, applied to the plain model from outside, before expert parallelism,
activation checkpointing, compilation and FSDP2.

Dense: `nn.Linear`s become torchao `Float8Linear`s (dynamic scaling, recipe `tensorwise`, `rowwise` or
`rowwise_with_gw_hp`). The LM head always stays in high precision (the chunked loss multiplies by its
weight directly; torchtitan and Ling keep it in bf16 too), and so do the router (not a Linear), the
norms, the embeddings and Linears whose dims are not multiples of 16 (the fp8 GEMMs' rule).

Experts: each `GroupedExperts` becomes a `Float8GroupedExperts`, whose three grouped GEMMs go through
torchao's `_quantize_then_scaled_grouped_mm` with plain weights (the weight-wrapper route of torchao
0.18 fails under torch.compile, pytorch/ao#4048). Every token group is padded to the recipe's row
multiple first; the padded rows are zeros and are dropped before the module returns, so they never
reach the expert-parallel combine.

Neither changes a parameter's name, shape or dtype: checkpoints and Hugging Face exports stay plain,
and a run saved with float8 on resumes with it off, and the reverse.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from ling.config import ConfigError
from ling.model.moe import GroupedExperts

DENSE_RECIPES = ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp")
# recipe -> (rows each token group is padded to, what the device must be)
EXPERT_RECIPES = {
    "off": (1, None),
    "fp8_rowwise": (16, "a CUDA GPU of compute capability 8.9 or newer (H100/H200) with triton"),
    "mxfp8": (32, "a CUDA GPU of compute capability 10.0 or newer (B200)"),
    "mxfp8_wgrad_hp": (32, "a CUDA GPU of compute capability 10.0 or newer (B200)"),
    "mxfp8_emulated": (32, None),
    "mxfp8_emulated_wgrad_hp": (32, None),
}
ALWAYS_HIGH_PRECISION = ("lm_head",)
GEMM_DIM_MULTIPLE = 16


@dataclass
class Float8Config:
    """dense: recipe for the Linears (off, tensorwise, rowwise, rowwise_with_gw_hp); experts: recipe
    for the routed experts' grouped GEMMs (off, fp8_rowwise, mxfp8, mxfp8_wgrad_hp, mxfp8_emulated,
    mxfp8_emulated_wgrad_hp; `_wgrad_hp` keeps the weight gradient in high precision, `emulated`
    runs anywhere, slowly); skip: module names (glob patterns, e.g. `*.attention.dense`) whose Linears
    stay in high precision, besides the head."""

    dense: str = "off"
    experts: str = "off"
    skip: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dense not in DENSE_RECIPES:
            raise ConfigError(f"float8.dense={self.dense!r} is not one of {', '.join(DENSE_RECIPES)}.")
        if self.experts not in EXPERT_RECIPES:
            raise ConfigError(f"float8.experts={self.experts!r} is not one of {', '.join(EXPERT_RECIPES)}.")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigError(f"float8.skip={self.skip!r} must be a list of module-name patterns.")
        self.skip = list(self.skip)

    @classmethod
    def parse(cls, value: Float8Config | dict | None) -> Float8Config:
        """The settings from their YAML mapping; an unknown key is named."""
        if isinstance(value, cls):
            return value
        value = dict(value or {})
        unknown = sorted(set(value) - {"dense", "experts", "skip"})
        if unknown:
            raise ConfigError(f"float8 has no setting {unknown[0]!r}; the settings are dense, experts and skip.")
        return cls(**value)

    @property
    def enabled(self) -> bool:
        return self.dense != "off" or self.experts != "off"

    @property
    def row_multiple(self) -> int:
        return EXPERT_RECIPES[self.experts][0]

    def check_device(self, device: torch.device, compiled: bool) -> None:
        """One sentence when this device cannot run these settings; a warning when they will run slowly."""
        if not self.enabled:
            return
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        need = EXPERT_RECIPES[self.experts][1]
        minimum = (10, 0) if self.experts.startswith("mxfp8") else (8, 9)
        if need and (capability is None or capability < minimum):
            raise ConfigError(
                f"float8.experts={self.experts!r} needs {need}, but this run is on {_device_name(device)}; "
                "use mxfp8_emulated (any device, slow) or off."
                + (" On an H100/H200 use fp8_rowwise." if capability and capability >= (8, 9) else "")
            )
        if self.experts == "fp8_rowwise" and not _has_triton():
            raise ConfigError(
                "float8.experts='fp8_rowwise' needs triton, which is not installed; install triton or set it off."
            )
        if self.dense != "off" and capability is not None and capability < (8, 9):
            raise ConfigError(
                f"float8.dense={self.dense!r} needs a GPU of compute capability 8.9 or newer for fp8 GEMMs, but this "
                f"run is on {_device_name(device)}; set float8.dense: off."
            )
        if device.type == "cuda" and not compiled:
            warnings.warn(
                "float8 is on without compiled blocks: the scaling and casts then run as separate kernels and "
                "fp8 is usually slower than bf16; set compile: true.",
                stacklevel=2,
            )


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"the {device.type.upper()}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---- experts -------------------------------------------------------------------------------------
def pad_groups(x: torch.Tensor, counts: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by group -> (buffer with each group padded with zero rows to a multiple of
    `multiple`, where each input row sits in it, the buffer's int32 group end offsets).

    The buffer's size depends only on the row and group counts the host knows already (rows + groups x
    (multiple - 1), rounded up to the multiple), never on the device's counts, so nothing waits."""
    rows, groups = x.shape[0], counts.numel()
    size = -(-(rows + groups * (multiple - 1)) // multiple) * multiple
    padded_counts = (counts + multiple - 1) // multiple * multiple
    shift = torch.cumsum(padded_counts - counts, dim=0) - (padded_counts - counts)  # padding before each group
    group_of_row = torch.repeat_interleave(torch.arange(groups, device=x.device), counts, output_size=rows)
    where = torch.arange(rows, device=x.device) + shift[group_of_row]
    buffer = x.new_zeros(size, x.shape[1]).index_copy(0, where, x)
    return buffer, where, torch.cumsum(padded_counts, dim=0, dtype=torch.int32)


class Float8GroupedExperts(GroupedExperts):
    """`GroupedExperts` with padded token groups and (when `op_config` is set) torchao's dynamically
    quantised grouped GEMMs. Same parameters as the plain module; set up by `convert_experts`."""

    row_multiple: int = 1
    op_config = None  # a torchao MoE training op config; None: plain bf16/fp32 grouped GEMMs
    emulated: bool = False  # the op config quantises in plain torch (the `mxfp8_emulated*` recipes)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        buffer, where, offs = pad_groups(x, counts, self.row_multiple)
        return self.swiglu(buffer, offs)[where]

    def grouped_mm(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if self.op_config is None:
            return super().grouped_mm(x, weight, offs)
        run = _emulated_scaled_grouped_mm if self.emulated else _scaled_grouped_mm
        return run(x, weight, offs, self.op_config)


def _scaled_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, config) -> torch.Tensor:
    # torchao's private entry point: its public weight-wrapper route fails under torch.compile (pytorch/ao#4048)
    from torchao.prototype.moe_training.utils import _quantize_then_scaled_grouped_mm

    # torchao's scaled grouped GEMMs take and return bf16 (an fp32 run casts around them)
    high = torch.bfloat16
    out = _quantize_then_scaled_grouped_mm(x.to(high), weight.to(high).transpose(-2, -1), config=config, offs=offs)
    return out.to(x.dtype)


# The emulated quantisation does not compile (inductor's CPU code generator asserts on it; torchtitan
# documents the emulated path as not compatible with torch.compile): a compiled block runs it eagerly.
_emulated_scaled_grouped_mm = torch.compiler.disable(_scaled_grouped_mm)


def expert_op_config(recipe: str):
    from torchao.prototype.moe_training.config import (
        Float8TrainingOpConfig,
        Float8TrainingRecipe,
        MXFP8TrainingOpConfig,
        MXFP8TrainingRecipe,
    )

    if recipe == "fp8_rowwise":
        return Float8TrainingOpConfig.from_recipe(Float8TrainingRecipe.FP8_ROWWISE)
    if recipe == "mxfp8":
        return MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe.MXFP8_RCEIL)
    if recipe == "mxfp8_wgrad_hp":
        return MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe.MXFP8_RCEIL_WGRAD_WITH_HP)
    config = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL)
    if recipe == "mxfp8_emulated_wgrad_hp":
        config.wgrad_with_hp = True
    return config


def convert_experts(model: nn.Module, recipe: str, row_multiple: int | None = None) -> list[str]:
    """Turn every `GroupedExperts` into a `Float8GroupedExperts` in place; their names.

    `recipe` picks torchao's op config and the row multiple; tests pass `recipe="off"` with a
    `row_multiple` to get the padding alone."""
    multiple = row_multiple or EXPERT_RECIPES[recipe][0]
    config = None if recipe == "off" else expert_op_config(recipe)
    names = []
    for name, module in model.named_modules():
        if type(module) is GroupedExperts:
            hidden, intermediate = module.gate_proj.shape[2], module.gate_proj.shape[1]
            if config is not None and (hidden % multiple or intermediate % multiple):
                raise ConfigError(
                    f"float8.experts={recipe!r} needs hidden_size and moe_intermediate_size divisible by {multiple}, "
                    f"but {name} has {hidden} and {intermediate}; use float8.experts: off for this model."
                )
            module.__class__ = Float8GroupedExperts
            module.row_multiple, module.op_config = multiple, config
            module.emulated = recipe.startswith("mxfp8_emulated")
            names.append(name)
    return names


# ---- dense -----------------------------------------------------------------------------------------
def dense_filter(skip: list[str]):
    """torchao's module_filter_fn: True for the Linears to convert."""

    def keep_high_precision(name: str) -> bool:
        return any(fnmatchcase(name, p) or name.split(".")[-1] == p for p in (*ALWAYS_HIGH_PRECISION, *skip))

    def convert(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear) or keep_high_precision(name):
            return False
        return module.in_features % GEMM_DIM_MULTIPLE == 0 and module.out_features % GEMM_DIM_MULTIPLE == 0

    return convert


def convert_dense(model: nn.Module, recipe: str, skip: list[str]) -> list[str]:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=dense_filter(skip)
    )
    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]


# ---- both ------------------------------------------------------------------------------------------------
def apply_float8(model: nn.Module, config: Float8Config, compiled: bool = False) -> str:
    """Convert `model` (plain, on any device or meta) by `config`; one line per part saying what changed."""
    if not config.enabled:
        return ""
    lines = []
    if config.dense != "off":
        if compiled and config.dense.startswith("rowwise"):
            # as torchtitan does: inductor then rounds like eager when it fuses the casts
            torch._inductor.config.emulate_precision_casts = True
        names = convert_dense(model, config.dense, config.skip)
        lines.append(f"float8 dense ({config.dense}): {len(names)} Linears: {summarise(names)}")
    if config.experts != "off":
        names = convert_experts(model, config.experts)
        lines.append(
            f"float8 experts ({config.experts}, token groups padded to {config.row_multiple} rows): {summarise(names)}"
        )
    return "\n".join(lines)


def summarise(names: list[str]) -> str:
    """Module names with layer numbers folded: `model.layers.*.attention.dense x19`."""
    folded: dict[str, int] = {}
    for name in names:
        key = re.sub(r"\.\d+\.", ".*.", name)
        folded[key] = folded.get(key, 0) + 1
    return ", ".join(f"{key} x{n}" if n > 1 else key for key, n in folded.items()) or "none"
