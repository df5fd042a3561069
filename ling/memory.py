"""On-paper GPU memory estimate for training a Ling config with FSDP2 + expert parallelism.

Pure arithmetic: no process groups, nothing allocated. It answers "does this run fit in 80 GB per
GPU?" before a job is queued, and shows which line item to attack when it does not. Every figure is
an estimate of the peak, in bytes per GPU; the formulas are in the docstrings below. GB means 1e9
bytes (an H100 "80GB" reports 81,559 MiB = 85.5e9 bytes, so an 80e9 budget keeps a little slack).

The run is described by the parallel layout `ling.parallel.layout.ParallelDims` (the one the strategy
builds) plus the numbers of one micro-batch: activation checkpointing, rows, tokens per row, the loss
chunk and the GPU memory. The layout it models (ling/parallel, torchtitan v0.2 style, see
shared/reference/parallel-fp8.md §1.3-1.4):

* world = dp_replicate x dp_shard ranks, all data parallel (no tensor or pipeline parallelism);
  dp_shard ranks shard the model (HSDP replicates it dp_replicate times).
* Non-expert parameters (embedding, attention, norms, dense FFN, router, shared expert, MTP
  eh_proj, lm_head) are `fully_shard`-ed over the dp_shard mesh: each rank holds 1/dp_shard of
  every tensor, and an all-gather over all dp_shard ranks rebuilds the whole tensor.
* Routed-expert parameters are first split by expert over the `ep` mesh (each rank owns
  num_experts / ep whole experts), then `fully_shard`-ed over efsdp = dp_shard / ep ranks. The
  fraction a rank stores is again 1 / (ep * efsdp) = 1 / dp_shard, but the all-gather runs over
  efsdp ranks only and rebuilds only the rank's num_experts / ep experts, never all of them.
* Mixed precision: fp32 master weights, gradients and AdamW moments are kept sharded; compute
  uses bf16 copies all-gathered one FSDP unit at a time; gradients are reduce-scattered in fp32.
  Activations are counted in bf16 (a CPU run in fp32 needs about twice the activation figure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ling.config import ConfigError, LingConfig
from ling.parallel.layout import ParallelDims, check_ac_mode

GB = 1e9
ACT_BYTES = 2  # bf16 activations
FIXED_HEADROOM_GB = 2.0  # CUDA context, cuBLAS workspaces, NCCL communicator buffers
FRAGMENTATION = 0.10  # caching-allocator fragmentation, as a share of everything else


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")


# ---- parameter arithmetic ---------------------------------------------------------------------


@dataclass
class ParamBreakdown:
    """Parameter counts by how they are sharded. `units` lists each FSDP unit as (name, non-expert
    params, routed-expert params); the routed experts of a unit are all num_experts of them."""

    non_expert: int  # trainable, sharded over dp_shard
    routed_expert: int  # trainable, split over ep then sharded over efsdp
    buffers: int  # fp32 expert_bias: not trained, replicated on every rank
    units: list[tuple[str, int, int]] = field(repr=False)

    @property
    def trainable(self) -> int:
        return self.non_expert + self.routed_expert

    @property
    def total(self) -> int:
        """Equals ling.params.count_parameters' total (which counts the stored expert biases)."""
        return self.trainable + self.buffers


def parameter_breakdown(config: LingConfig) -> ParamBreakdown:
    """Count the config's parameters by the layer formula, MTP layers included when it has them.

    Per layer: attention H*(n_h+2n_kv)*d + n_h*d*H + 2d (q/k norms) + 2H (block norms); dense FFN
    3*H*I; MoE router E*H + shared 3*H*I_s + routed E*3*H*I_e, and E fp32 expert biases. MTP adds an
    MoE layer, eh_proj 2H*H and three norms. Plus embedding V*H, final norm H, lm_head V*H.
    """
    H, V, E = config.hidden_size, config.vocab_size, config.num_experts
    d = config.head_dim
    attention = H * (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    attention += config.num_attention_heads * d * H + 2 * d + 2 * H
    dense_ffn = 3 * H * config.intermediate_size
    shared = 3 * H * config.shared_expert_intermediate_size if config.num_shared_experts else 0
    moe_non_expert = E * H + shared
    routed = E * 3 * H * config.moe_intermediate_size
    units: list[tuple[str, int, int]] = [("embedding", V * H, 0)]
    buffers = 0
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            units.append((f"layer {i} (MoE)", attention + moe_non_expert, routed))
            buffers += E
        else:
            units.append((f"layer {i} (dense)", attention + dense_ffn, 0))
    for k in range(config.num_nextn_predict_layers):
        units.append((f"MTP layer {k}", attention + moe_non_expert + 2 * H * H + 3 * H, routed))
        buffers += E
    units.append(("final norm + lm_head", H + V * H, 0))
    return ParamBreakdown(
        non_expert=sum(u[1] for u in units), routed_expert=sum(u[2] for u in units), buffers=buffers, units=units
    )


# ---- activations ------------------------------------------------------------------------------


def _norm(rows: int, width: int) -> int:
    """RMSNorm in fp32 keeps its fp32 input copy (4 B), the fp32 rstd per row and the bf16 normed
    tensor its weight gradient needs; its output is counted by whichever op saves it."""
    return rows * width * (4 + ACT_BYTES) + rows * 4


def block_activation_bytes(config: LingConfig, tokens: int, kind: Literal["dense", "moe", "mtp"]) -> dict[str, int]:
    """Bytes autograd keeps for one decoder block over `tokens` = micro_batch * seq_len tokens
    (no checkpointing), itemised. An estimate of what the eager ling.model code saves in bf16:

    attention      input_norm      N*H*(4+2) + 4N + N*H*2     fp32 input, normed, output (qkv input)
                   qkv             N*(n_h+2n_kv)*d*2          fused output, kept alive by the V view
                   qk_norm         N*(n_h+n_kv)*d*(4+2) + 4*N*(n_h+n_kv)
                   rope            N*(n_h+n_kv)*d*2           rotated q, k (SDPA inputs)
                   sdpa            N*n_h*d*2 + N*n_h*4        output + fp32 logsumexp
                   dense_in        N*n_h*d*2                  the [N, n_h*d] copy fed to `dense`
                   post_norm       N*H*(4+2) + 4N + N*H*2     output = MLP / shared-expert input
    dense FFN      ffn_hidden      4*N*I*2                    gate, up, silu(gate), product
    MoE            router          N*H*4 + N*E*4 (+N*E*4)     fp32 input copy, sigmoid scores (+logits
                                                              when the z-loss is on)
                   routing         N*K*32                     3 int64 index tensors, 2 fp32 weights
                   sorted_rows     K*N*H*2                    token rows sorted by expert
                   expert_hidden   4*K*N*I_e*2                as the dense FFN, on K*N rows
                   expert_out      K*N*H*2                    grouped-GEMM output, which index_copy's
                                                              backward records as its `source`
                   combine         K*N*H*2                    the un-permuted copy the weighted sum saves
                   shared_hidden   4*N*I_s*2
    MTP (+ MoE)    mtp_in_norms    2 * (N*H*(4+2) + 4N)       enorm, hnorm
                   eh_proj_in      N*2H*2                     the concatenation
                   mtp_final_norm  N*H*(4+2) + 4N             (its output, the head input, is counted
                                                              outside the block)

    Balanced routing is assumed: under expert parallelism a rank receives K*N rows on average, but a
    hot expert can put several times that on one rank early in dropless training.
    """
    N, H, d = tokens, config.hidden_size, config.head_dim
    n_h, n_kv, s = config.num_attention_heads, config.num_key_value_heads, ACT_BYTES
    K, E = config.num_experts_per_tok, config.num_experts
    items: dict[str, int] = {}
    if kind == "mtp":
        items["mtp_in_norms"] = 2 * _norm(N, H)
        items["eh_proj_in"] = N * 2 * H * s
    items["input_norm"] = _norm(N, H) + N * H * s
    items["qkv"] = N * (n_h + 2 * n_kv) * d * s
    items["qk_norm"] = _norm(N * (n_h + n_kv), d)
    items["rope"] = N * (n_h + n_kv) * d * s
    items["sdpa"] = N * n_h * d * s + N * n_h * 4
    items["dense_in"] = N * n_h * d * s
    items["post_norm"] = _norm(N, H) + N * H * s
    if kind == "dense":
        items["ffn_hidden"] = 4 * N * config.intermediate_size * s
    else:
        items["router"] = N * H * 4 + N * E * 4 + (N * E * 4 if config.router_z_loss_coeff else 0)
        items["routing"] = N * K * 32
        items["sorted_rows"] = K * N * H * s
        items["expert_hidden"] = 4 * K * N * config.moe_intermediate_size * s
        items["expert_out"] = K * N * H * s
        items["combine"] = K * N * H * s
        shared = config.shared_expert_intermediate_size if config.num_shared_experts else 0
        items["shared_hidden"] = 4 * N * shared * s
    if kind == "mtp":
        items["mtp_final_norm"] = _norm(N, H)
    return items


MOE_ITEMS = ("router", "routing", "sorted_rows", "expert_hidden", "expert_out", "combine", "shared_hidden")


def activation_bytes(
    config: LingConfig, micro_batch: int, seq_len: int, mode: str, loss_chunk: int | None = None
) -> dict[str, int]:
    """Activation bytes of one micro-batch in three parts; the peak is stored + max(loss, recompute).

    N = micro_batch * seq_len, L decoder layers, D MTP layers, V vocabulary, blocks as in
    block_activation_bytes, c = min(N, loss_chunk) tokens per chunk of the loss.

    stored (kept from the forward until the backward reaches it), with
      head_inputs = final norm N*H*(4+2) + 4N + its output N*H*2, plus N*H*2 per MTP head input:
      full: L*N*H*2 (each decoder block's checkpointed input) + D*N*H*2 (each MTP layer's token
            embeddings; its other input, the hidden states of the head before it, is a head input
            already) + head_inputs.
      moe:  every block except the MoE internals (router ... shared_hidden), whose input is already
            the post_norm output, + head_inputs.
      none: every block in full + head_inputs.
    loss (while a head's loss runs backward)
      whole logits: (1 + D) * N*V*(2 + 4)   bf16 logits of each head + the fp32 log-softmax the
                                             cross entropy saves, + N*V*(4 + 4), the fp32 gradient
                                             in and out of one head's log-softmax
      chunked:      c*V*(2 + 4) + c*V*(4 + 4), the same for one chunk of one head
    recompute (while one checkpointed part runs its forward again in backward)
      full: the largest block; moe: the largest MoE internals; none: 0.
      With whole logits, add (1 + D) * N*V*(2 + 4): they are counted as held while blocks recompute
      (conservative: their fp32 half is freed by then). With the chunked loss nothing of the loss is
      held then: a chunk's logits exist only inside its own recompute and backward, and autograd
      finishes every chunk of a head before it reaches the block that made the head's input.
    """
    check_ac_mode(mode)
    N, H, V, s = micro_batch * seq_len, config.hidden_size, config.vocab_size, ACT_BYTES
    D = config.num_nextn_predict_layers
    kinds = ["moe" if config.is_moe_layer(i) else "dense" for i in range(config.num_hidden_layers)] + ["mtp"] * D
    blocks = {kind: block_activation_bytes(config, N, kind) for kind in set(kinds)}
    head_inputs = _norm(N, H) + N * H * s + D * N * H * s
    if loss_chunk is None:
        held = (1 + D) * N * V * (s + 4)
        loss = held + N * V * (4 + 4)
    else:
        chunk = min(N, loss_chunk)
        held = 0
        loss = chunk * V * (s + 4) + chunk * V * (4 + 4)
    if mode == "full":
        stored = config.num_hidden_layers * N * H * s + D * N * H * s
        recompute = max(sum(b.values()) for b in blocks.values())
    elif mode == "moe":
        stored = sum(sum(v for k, v in blocks[kind].items() if k not in MOE_ITEMS) for kind in kinds)
        recompute = max(sum(v for k, v in b.items() if k in MOE_ITEMS) for b in blocks.values())
    else:
        stored = sum(sum(blocks[kind].values()) for kind in kinds)
        recompute = 0
    return {"stored": stored + head_inputs, "loss": loss, "recompute": recompute + held}


def peak_activation_bytes(detail: dict[str, int]) -> int:
    """The activation peak of an activation_bytes result: stored + the larger of the two phases."""
    return detail["stored"] + max(detail["loss"], detail["recompute"])


# ---- the estimate -----------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Per-GPU bytes of each line item (see estimate_memory) for one run, and whether their sum fits."""

    config: LingConfig = field(repr=False)
    dims: ParallelDims
    activation_checkpointing: str
    micro_batch: int
    seq_len: int
    loss_chunk_tokens: int | None
    gpu_memory_gb: float
    params: ParamBreakdown = field(repr=False)
    parameters: float
    gradients: float
    optimizer: float
    gathered_params: float
    gradient_buffers: float
    activations: float
    activation_detail: dict[str, int]
    largest_unit: str
    fixed_headroom: float
    fragmentation: float

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return (
            self.model_states + self.gathered_params + self.gradient_buffers + self.activations
            + self.fixed_headroom + self.fragmentation
        )  # fmt: skip

    @property
    def budget(self) -> float:
        return self.gpu_memory_gb * GB

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def describe(self) -> str:
        return (
            f"{self.dims.describe()}; micro-batch {self.micro_batch} x {self.seq_len} tokens; activation "
            f"checkpointing {self.activation_checkpointing!r}; {self.gpu_memory_gb:g} GB per GPU"
        )


def estimate_memory(
    config: LingConfig,
    dims: ParallelDims,
    *,
    activation_checkpointing: str,
    micro_batch: int,
    seq_len: int,
    loss_chunk_tokens: int | None,
    gpu_memory_gb: float,
    fixed_headroom_gb: float = FIXED_HEADROOM_GB,
    fragmentation: float = FRAGMENTATION,
) -> MemoryEstimate:
    """Estimate the peak bytes per GPU of training `config` on the layout `dims`, with micro-batches of
    `micro_batch` rows of `seq_len` tokens and the loss computed `loss_chunk_tokens` tokens at a time
    (None: whole logits). Line items, P_t trainable parameters (routed experts included), B the fp32
    expert_bias buffers, U the largest FSDP unit (a decoder/MTP block with its non-expert weights plus
    num_experts/ep experts, the embedding, or the final norm + lm_head) counted in parameters:

      parameters        P_t * 4 / dp_shard + B * 4   fp32 master weights; buffers are not sharded
      gradients         P_t * 4 / dp_shard           fp32, reduce-scattered into the same shards
      optimizer         P_t * 8 / dp_shard           AdamW exp_avg + exp_avg_sq in fp32
      gathered params   2 * U * 2                    bf16 all-gathered unit, x2: the next unit is
                                                     prefetched while the current one computes
      gradient buffers  U * (2 + 4)                  the unit's unsharded bf16 gradient and its fp32
                                                     reduce-scatter copy
      activations       peak_activation_bytes(...)   one micro-batch, per the checkpointing mode
      fixed headroom    fixed_headroom_gb            CUDA context, cuBLAS workspace, NCCL buffers
      fragmentation     fragmentation * (all above)  caching-allocator slack

    FSDP pads each tensor's first dimension to a multiple of the shard count; that padding (at most
    dp_shard - 1 rows per tensor) is ignored. The result is an estimate, not a measurement.
    """
    dims.check(num_experts=config.num_experts)
    check_ac_mode(activation_checkpointing)
    _check_positive_int("micro_batch", micro_batch)
    _check_positive_int("seq_len", seq_len)
    if loss_chunk_tokens is not None:
        _check_positive_int("loss_chunk_tokens", loss_chunk_tokens)
    if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)) or not gpu_memory_gb > 0:
        raise ConfigError(f"gpu_memory_gb={gpu_memory_gb!r} must be a positive number of GB.")
    params = parameter_breakdown(config)
    shard = dims.dp_shard
    unit_sizes = {name: non_expert + expert // dims.ep for name, non_expert, expert in params.units}
    largest_unit = max(unit_sizes, key=unit_sizes.__getitem__)
    U = unit_sizes[largest_unit]
    detail = activation_bytes(config, micro_batch, seq_len, activation_checkpointing, loss_chunk_tokens)
    estimate = MemoryEstimate(
        config=config,
        dims=dims,
        activation_checkpointing=activation_checkpointing,
        micro_batch=micro_batch,
        seq_len=seq_len,
        loss_chunk_tokens=loss_chunk_tokens,
        gpu_memory_gb=gpu_memory_gb,
        params=params,
        parameters=params.trainable * 4 / shard + params.buffers * 4,
        gradients=params.trainable * 4 / shard,
        optimizer=params.trainable * 8 / shard,
        gathered_params=2 * U * 2,
        gradient_buffers=U * (2 + 4),
        activations=float(peak_activation_bytes(detail)),
        activation_detail=detail,
        largest_unit=largest_unit,
        fixed_headroom=fixed_headroom_gb * GB,
        fragmentation=0.0,
    )
    estimate.fragmentation = fragmentation * (estimate.total - estimate.fixed_headroom)
    return estimate


def format_estimate(estimate: MemoryEstimate) -> str:
    """A table of GB (1e9 bytes) per GPU for each line item, the total, the budget and whether it fits."""
    chunk = estimate.loss_chunk_tokens
    rows = [
        ("parameters (fp32 master, sharded; expert_bias replicated)", estimate.parameters),
        ("gradients (fp32, sharded)", estimate.gradients),
        ("AdamW state (2 x fp32, sharded)", estimate.optimizer),
        (f"gathered bf16 params, 2 x largest unit ({estimate.largest_unit})", estimate.gathered_params),
        ("gradient buffers of that unit (bf16 + fp32 reduce-scatter)", estimate.gradient_buffers),
        (
            f"activations, micro-batch {estimate.micro_batch} x {estimate.seq_len}, "
            f"AC {estimate.activation_checkpointing!r}",
            estimate.activations,
        ),  # fmt: skip
        ("  stored for backward (block inputs / saved tensors)", estimate.activation_detail["stored"]),
        (
            "  + the larger of: the loss "
            + ("(whole logits, main + MTP heads)" if chunk is None else f"(one chunk of {chunk:,} tokens)"),
            estimate.activation_detail["loss"],
        ),
        (
            "    or one block's recompute" + (" (+ the whole logits)" if chunk is None else ""),
            estimate.activation_detail["recompute"],
        ),
        ("fixed headroom (CUDA context, NCCL, workspaces)", estimate.fixed_headroom),
        ("allocator fragmentation", estimate.fragmentation),
    ]
    # A model too small to show in GB (the tiny preset) is printed in MB.
    unit, scale = ("GB", GB) if estimate.total - estimate.fixed_headroom >= 0.1 * GB else ("MB", 1e6)
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'memory per GPU (estimate)':<{width}}{unit:>10}", "-" * (width + 10)]
    lines += [f"{label:<{width}}{value / scale:>10.2f}" for label, value in rows]
    lines.append("-" * (width + 10))
    lines.append(f"{'total':<{width}}{estimate.total / scale:>10.2f}")
    lines.append(f"{'GPU memory':<{width}}{estimate.budget / scale:>10.2f}")
    lines.append(f"{'fits':<{width}}{'yes' if estimate.fits else 'no':>10}")
    return "\n".join(lines)
