from __future__ import annotations

import torch
from torch import nn

from ling.config import LingConfig
from ling.model.attention import Attention
from ling.model.cache import KVCache
from ling.model.mlp import SwiGLU
from ling.model.moe import MoE, MoEStats
from ling.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); the mlp is dense or MoE."""

    def __init__(self, config: LingConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.attention(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        out = self.mlp(self.post_attention_layernorm(x))
        if isinstance(out, tuple):
            return x + out[0], out[1]
        return x + out, None


class MTPLayer(DecoderLayer):
    """One multi-token-prediction depth: eh_proj([enorm(emb(t+k)) ; hnorm(h)]) -> MoE block -> norm.

    Parameter names match the HF checkpoint, where this layer is `model.layers.{num_hidden_layers}`.
    """

    def __init__(self, config: LingConfig, layer_idx: int):
        super().__init__(config, layer_idx, moe=True)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(  # type: ignore[override]
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        x, stats = super().forward(x, cos, sin, attn_mask)
        return self.final_layernorm(x), stats
