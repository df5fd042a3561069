"""`parallelize(model, mesh, plan)`: float8, expert parallelism, activation checkpointing, compilation
and FSDP2, applied to a plain `LingForCausalLM` (built on the meta device) in that order.

FSDP2 units: one per decoder block and per MTP layer; with ep > 1 the routed experts of each MoE
block are an inner unit sharded over `efsdp` (their ep split is already a DTensor dimension); the
root unit holds the embeddings, final norm and head, which the MTP layers use too. Expert gradients
already sum the tokens of the whole ep group (the all-to-all backward), so their FSDP reduction is
divided by the whole data-parallel size, like every other gradient, instead of by its own mesh size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

# torch's own activation-checkpointing wrapper, the one torchtitan uses (torch 2.13 keeps it, and the
# composable `torch.distributed._composable.checkpoint`, in underscore modules). The composable one keeps
# module names but is not honoured inside a compiled block, so compiled blocks would not recompute.
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module

from ling.config import ConfigError
from ling.dtypes import dtype_named
from ling.model.moe import MoE
from ling.parallel.expert_parallel import ExpertParallel
from ling.parallel.float8 import Float8Config, apply_float8
from ling.parallel.layout import check_ac_mode
from ling.parallel.mesh import mesh_dims


@dataclass
class ParallelPlan:
    """param_dtype: FSDP compute dtype (None: the parameters' own, fp32); reduce_dtype: gradient
    reduction dtype; reshard_after_forward: free gathered weights after each block's forward (ZeRO-3)
    or keep them until backward (ZeRO-2); activation_checkpointing: none, full (each block) or moe
    (the MoE part of each block); compile: torch.compile each block; float8: a `Float8Config` (or its
    mapping: dense, experts, skip)."""

    param_dtype: str | None = "bfloat16"
    reduce_dtype: str | None = "float32"
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"
    compile: bool = False
    float8: Float8Config | dict | None = field(default_factory=Float8Config)

    def __post_init__(self) -> None:
        self.float8 = Float8Config.parse(self.float8)
        check_ac_mode(self.activation_checkpointing)
        dtype_named(self.param_dtype, "param_dtype")
        dtype_named(self.reduce_dtype, "reduce_dtype")
        if self.compile and self.param_dtype != "bfloat16":
            raise ConfigError(
                f"compile=True needs param_dtype='bfloat16' (got {self.param_dtype!r}): torch compiles the "
                "grouped expert GEMM for bf16 inputs only."
            )

    def mp_policy(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(
            param_dtype=dtype_named(self.param_dtype, "param_dtype"),
            reduce_dtype=dtype_named(self.reduce_dtype, "reduce_dtype"),
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, then the MTP layers (each wrapped when `full` activation checkpointing is on)."""
    return [*model.model.layers, *model.model.mtp_layers]


def checkpoint_blocks(model: nn.Module, mode: str) -> None:
    """Recompute in backward instead of keeping activations: each block (`full`), the MoE part of each
    block (`moe`) or nothing (`none`).

    The wrapper adds `_checkpoint_wrapped_module.` to the names that `named_parameters()` and
    `named_modules()` give; `state_dict()`, `load_state_dict()` and DCP's model and optimizer state
    dicts drop it, so checkpoints and Hugging Face exports keep the plain names in every mode."""
    check_ac_mode(mode)
    for layers in (model.model.layers, model.model.mtp_layers):
        for i, block in enumerate(layers):
            if mode == "full":
                layers[i] = checkpoint_wrapper(block)
            elif mode == "moe" and isinstance(block.mlp, MoE):
                block.mlp = checkpoint_wrapper(block.mlp)


def parallelize(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> nn.Module:
    dims = mesh_dims(mesh)
    dims.check(num_experts=model.config.num_experts)
    converted = apply_float8(model, plan.float8, compiled=plan.compile)
    if converted:
        rank_zero_info(converted)
    if dims.ep > 1:
        for moe in model.moe_layers():
            parallelize_module(moe.experts, mesh["ep"], ExpertParallel())
    checkpoint_blocks(model, plan.activation_checkpointing)
    if plan.compile:
        for block in blocks(model):
            block.compile()
    common = dict(mp_policy=plan.mp_policy(), reshard_after_forward=plan.reshard_after_forward)
    dense_mesh = mesh["dp_replicate", "dp_shard"]
    for block in blocks(model):
        if dims.ep > 1:
            for moe in (m for m in block.modules() if isinstance(m, MoE)):
                fully_shard(moe.experts, mesh=mesh["dp_replicate", "efsdp"], **common)
                moe.experts.set_gradient_divide_factor(float(dims.world))
        fully_shard(block, mesh=dense_mesh, **common)
    fully_shard(model, mesh=dense_mesh, **common)
    return model
