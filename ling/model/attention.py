from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ling.config import LingConfig
from ling.model.cache import KVCache
from ling.model.norm import RMSNorm
from ling.model.rope import apply_partial_rope


@functools.cache
def _flex(cuda: bool):
    """flex_attention, compiled on GPUs: eager flex attention materialises the whole score matrix, the
    compiled one is a fused kernel that skips the masked-out tiles. (On CPU it serves inference only.)"""
    return torch.compile(flex_attention, dynamic=False) if cuda else flex_attention


class Attention(nn.Module):
    """GQA with a fused [Q|K|V] projection, per-head QK RMSNorm before partial RoPE, through SDPA (or flex
    attention when the mask is a BlockMask).

    use_qk_norm false builds no query_layernorm/key_layernorm (None), as the reference model does;
    attention_dropout drops attention probabilities in training only (SDPA's dropout_p)."""

    query_layernorm: RMSNorm | None
    key_layernorm: RMSNorm | None

    def __init__(self, config: LingConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_rows, bias=False)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.query_layernorm = self.key_layernorm = None
        self.attention_dropout = float(config.attention_dropout)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """attn_mask: optional boolean [B, 1, T, S] (True = may attend), e.g. document isolation, or a flex
        attention BlockMask over [B, T, T] (see `ling.model.masks.document_mask`)."""
        if isinstance(attn_mask, BlockMask) and kv_cache is not None:
            raise ValueError("A flex attention BlockMask cannot be used with a kv_cache; pass a boolean mask instead.")
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.query_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = apply_partial_rope(q, cos, sin).transpose(1, 2)
        k = apply_partial_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout_p = self.attention_dropout if self.training else 0.0
        if isinstance(attn_mask, BlockMask):
            if dropout_p:
                raise ValueError(
                    f"attention_dropout={dropout_p} cannot be applied: flex attention (a BlockMask, as for document "
                    "masks on GPU) has no dropout; set attention_dropout to 0.0 or use a boolean mask."
                )
            out = _flex(q.is_cuda)(q, k, v, block_mask=attn_mask, enable_gqa=True)
        else:
            S = k.shape[2]
            is_causal = attn_mask is None and T == S and T > 1
            if attn_mask is None and T != S and T > 1:
                # Queries are the last T of S positions: a bottom-right aligned causal mask.
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
            )
        return self.dense(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
