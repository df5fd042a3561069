"""Partial rotary position embedding with optional YaRN, following the HF Ling semantics.

Only the first `rope_dim` channels of each q/k head are rotated (rotate-half pairs (i, i + d/2));
the rest pass through. YaRN frequencies are computed over the rotated channels only and its
attention factor multiplies cos/sin, so it scales the rotated part of the logits alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ling.config import LingConfig


def yarn_attention_factor(scaling: dict, factor: float) -> float:
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, m) / mscale(factor, m_all)
    return mscale(factor)


def rope_parameters(config: LingConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq over the rotary pairs, attention scaling) for the config's rope settings."""
    dim, base = config.rope_dim, float(config.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    inv_freq = 1.0 / pos_freqs
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    scaling = config.rope_scaling
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, yarn_attention_factor(scaling, factor)


class RotaryEmbedding(nn.Module):
    """Holds inv_freq (fp32, not saved) and turns position ids into cos/sin of the rotary channels."""

    inv_freq: torch.Tensor

    def __init__(self, config: LingConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.rope_dim // 2), persistent=False)
        self.attention_scaling = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        inv_freq, self.attention_scaling = rope_parameters(self.config, device=device)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def set_rope(self, rope_theta: float | None = None, rope_scaling: dict | None | str = "keep") -> None:
        """Change the rope settings of a live model (context-extension stages)."""
        changes = {}
        if rope_theta is not None:
            changes["rope_theta"] = rope_theta
        if rope_scaling != "keep":
            changes["rope_scaling"] = rope_scaling
        self.config = self.config.replace(**changes)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Keep the frequencies fp32 when the model is cast to bf16, as HF computes them.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.inv_freq.float()
            self.reset_parameters()  # recomputed, not the rounded copy
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, head_dim]; cos/sin: [B, T, rope_dim]."""
    rope_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rot, keep = x[..., :rope_dim], x[..., rope_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)
