"""`parallelize(model, mesh, plan)`: float8, expert parallelism, activation checkpointing, compilation
and FSDP2, applied to a plain `LingForCausalLM` (built on the meta device) in that order.

FSDP2 units: one per decoder block and per MTP layer; with ep > 1 the routed experts of each MoE
block are an inner unit sharded over `efsdp` (their ep split is already a DTensor dimension); the
root unit holds the embeddings, final norm and head, which the MTP layers use too. Expert gradients
already sum the tokens of the whole ep group (the all-to-all backward), so their FSDP reduction is
divided by the whole data-parallel size, like every other gradient, instead of by its own mesh size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module
from torch.utils.checkpoint import checkpoint

from ling.config import ConfigError
from ling.model.moe import MoE
from ling.parallel.expert_parallel import ExpertParallel
from ling.parallel.float8 import Float8Plan, apply_float8

AC_MODES = ("none", "full", "moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelPlan:
    """param_dtype: FSDP compute dtype (None: the parameters' own, fp32); reduce_dtype: gradient
    reduction dtype; reshard_after_forward: free gathered weights after each block's forward (ZeRO-3)
    or keep them until backward (ZeRO-2); activation_checkpointing: none, full (each block) or moe
    (the MoE part of each block); compile: torch.compile each block; float8: a `Float8Plan` (or its
    mapping: dense, experts, skip)."""

    param_dtype: str | None = "bfloat16"
    reduce_dtype: str | None = "float32"
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"
    compile: bool = False
    float8: Float8Plan | dict | None = field(default_factory=Float8Plan)

    def __post_init__(self) -> None:
        self.float8 = Float8Plan.parse(self.float8)
        if self.activation_checkpointing not in AC_MODES:
            raise ConfigError(
                f"activation_checkpointing={self.activation_checkpointing!r} is not one of {', '.join(AC_MODES)}."
            )
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(DTYPES)} (or null).")
        if self.compile and self.param_dtype != "bfloat16":
            raise ConfigError(
                f"compile=True needs param_dtype='bfloat16' (got {self.param_dtype!r}): torch compiles the "
                "grouped expert GEMM for bf16 inputs only."
            )

    def mp_policy(self) -> MixedPrecisionPolicy:
        dtype = lambda name: DTYPES[name] if name else None  # noqa: E731
        return MixedPrecisionPolicy(param_dtype=dtype(self.param_dtype), reduce_dtype=dtype(self.reduce_dtype))


def checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module` in backward instead of keeping its activations. The forward is replaced on
    the instance, so parameter names (and checkpoints) stay as they are, unlike with a wrapper module."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.model.layers, *model.model.mtp_layers]


def parallelize(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> nn.Module:
    ep = mesh["ep"].size()
    world = mesh.size()
    converted = apply_float8(model, plan.float8, compiled=plan.compile)
    if converted:
        rank_zero_info(converted)
    if ep > 1:
        experts = model.config.num_experts
        if experts % ep:
            raise ConfigError(f"num_experts={experts} is not divisible by ep={ep}.")
        for moe in model.moe_layers():
            parallelize_module(moe.experts, mesh["ep"], ExpertParallel())
    for block in blocks(model):
        if plan.activation_checkpointing == "full":
            checkpoint_forward(block)
        elif plan.activation_checkpointing == "moe" and isinstance(block.mlp, MoE):
            checkpoint_forward(block.mlp)
        if plan.compile:
            block.compile()
    common = dict(mp_policy=plan.mp_policy(), reshard_after_forward=plan.reshard_after_forward)
    dense_mesh = mesh["dp_replicate", "dp_shard"]
    for block in blocks(model):
        if ep > 1 and isinstance(block.mlp, MoE):
            fully_shard(block.mlp.experts, mesh=mesh["dp_replicate", "efsdp"], **common)
            block.mlp.experts.set_gradient_divide_factor(float(world))
        fully_shard(block, mesh=dense_mesh, **common)
    fully_shard(model, mesh=dense_mesh, **common)
    return model
