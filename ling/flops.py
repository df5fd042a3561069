"""Training FLOPs per token of a Ling config, and model FLOPs utilisation (MFU).

Computed from the config arithmetic alone (no model is built, torch is not imported), so a
throughput callback or a planner can call it for any size. The device peak that MFU divides by comes
from Lightning's table (`device_peak_flops`).

Formula (forward + backward = 3 x forward = 6 FLOPs per multiply-accumulate per token):

    flops_per_token = 6 * P_matmul  +  6 * T * n_h * d * A

    P_matmul = L * (H * (n_h + 2 * n_kv) * d  +  n_h * d * H)          attention: fused qkv + dense
             + k_dense * 3 * H * I                                        dense SwiGLU layers
             + (L - k_dense) * (E * H + K * 3 * H * I_e + 3 * H * I_s)    router + top-K routed + shared
             + V * H                                                      lm_head
             + D * (attention + MoE block as above + 2H * H + V * H)      MTP: one MoE layer, eh_proj,
                                                                          one more lm_head pass
    A        = L + D                                                      layers that run attention

with H hidden size, n_h / n_kv query / key-value heads, d head_dim, I the dense FFN width, E experts,
K experts per token, I_e / I_s routed / shared expert widths, V vocabulary, L decoder layers of which
k_dense are dense, T the sequence length and D the MTP depth (0 when include_mtp is false or the
config has no MTP layer). Not counted: the embedding lookup (a gather, no matmul), RMSNorms, the
expert_bias add, softmax/activation element-wise work and the MoE permutation.

The attention term is the causal score and value matmuls: Q K^T and P V each cost 2 * T * n_h * d
FLOPs per token in the forward without a mask; causality halves that, and the backward doubles it
again twice over: 3 * (4 * T * n_h * d) / 2 = 6 * T * n_h * d per layer (= 12 * T * n_h * d / 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ling.config import LingConfig

if TYPE_CHECKING:
    import torch

# Dense (no sparsity) bf16 peak tensor-core throughput of one H100 SXM (and H200 SXM), FLOP/s.
H100_SXM_BF16_PEAK_FLOPS = 989.4e12


def _attention_matmul_params(config: LingConfig) -> int:
    H, d = config.hidden_size, config.head_dim
    qkv = H * (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    dense = config.num_attention_heads * d * H
    return qkv + dense


def _moe_active_matmul_params(config: LingConfig) -> int:
    H = config.hidden_size
    router = config.num_experts * H
    routed = config.num_experts_per_tok * 3 * H * config.moe_intermediate_size
    shared = 3 * H * config.shared_expert_intermediate_size if config.num_shared_experts else 0
    return router + routed + shared


def mtp_depth(config: LingConfig, include_mtp: bool = True) -> int:
    """MTP layers that run in training: the config's num_nextn_predict_layers, or 0 when excluded."""
    return config.num_nextn_predict_layers if include_mtp else 0


def active_matmul_params(config: LingConfig, include_mtp: bool = True) -> int:
    """Weights one token multiplies through (P_matmul in the module docstring); lm_head included,
    embedding, norms and expert_bias excluded. Routed experts count K of E."""
    H, V = config.hidden_size, config.vocab_size
    attention = _attention_matmul_params(config)
    moe = _moe_active_matmul_params(config)
    k_dense = config.first_k_dense_replace
    total = config.num_hidden_layers * attention
    total += k_dense * 3 * H * config.intermediate_size
    total += config.num_moe_layers * moe
    total += V * H
    total += mtp_depth(config, include_mtp) * (attention + moe + 2 * H * H + V * H)
    return total


def attention_flops_per_token(config: LingConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Causal score + value matmuls, forward and backward: 6 * T * n_h * d per attention layer."""
    layers = config.num_hidden_layers + mtp_depth(config, include_mtp)
    return 6.0 * seq_len * config.num_attention_heads * config.head_dim * layers


def training_flops_per_token(config: LingConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Forward + backward FLOPs per trained token: 6 * P_matmul + 6 * T * n_h * d * (L + D).

    See the module docstring for each term. seq_len is the packed row length T that causal
    attention runs over (document masks would lower the attention term; they are not modelled).
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer number of tokens.")
    return 6.0 * active_matmul_params(config, include_mtp) + attention_flops_per_token(config, seq_len, include_mtp)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s, as a fraction (0.2 = 20%).

    tokens_per_second and peak_flops must cover the same devices: either both per GPU, or the
    cluster's tokens/s with peak_flops times the number of GPUs.
    """
    if peak_flops <= 0:
        raise ValueError(
            f"peak_flops={peak_flops!r} must be positive (e.g. {H100_SXM_BF16_PEAK_FLOPS:.4g} for an H100)."
        )
    if tokens_per_second < 0 or flops_per_token < 0:
        raise ValueError(
            f"tokens_per_second={tokens_per_second!r} and flops_per_token={flops_per_token!r} must not be negative."
        )
    return tokens_per_second * flops_per_token / peak_flops


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for matmuls in `dtype`: Lightning's table entry
    (`lightning.fabric.utilities.throughput.get_available_flops`), None on a CPU and on devices the
    table lacks. Some of its GPU figures are the datasheet's with-sparsity numbers, twice the dense
    peak (e.g. "h100 nvl", "h200 sxm1": MFU there reads half), and a device named plainly "NVIDIA H200"
    is not in it; LingModule's `peak_flops_per_device` (989.4e12 for an H100/H200 SXM) gives the dense one."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(device, dtype)
    return float(peak) if peak else None
