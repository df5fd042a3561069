"""The Ling 2.0 causal LM: embeddings, decoder layers, final norm, untied head, MTP layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ling.config import LingConfig
from ling.model.block import DecoderLayer, MTPLayer
from ling.model.cache import KVCache
from ling.model.dtensor import is_sharded
from ling.model.moe import MoE, MoEStats
from ling.model.norm import RMSNorm
from ling.model.rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class LingOutput:
    logits: torch.Tensor | None  # [B, T, V] main-head logits (None when the loss was computed in chunks)
    loss: torch.Tensor | None = None  # main + mtp weight * mean MTP loss + router aux loss
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None
    tokens_per_expert: torch.Tensor | None = None  # [MoE layers incl. MTP, E], this forward only
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


def shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    """Each row moved one position left, the freed last position set to `fill` (never wraps rows)."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE in fp32 over labels that are not IGNORE_INDEX (0 when there are none)."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """cross_entropy(head(hidden), labels) without ever holding the logits of more than `chunk` tokens.

    Each chunk's logits are computed, reduced to a loss sum and dropped; backward recomputes them one
    chunk at a time (activation checkpointing of the head). At Ling's 157K vocabulary the logits of a
    32K-token row (and their fp32 log-softmax, for the main and the MTP head) would otherwise take
    tens of GB, more than all the other activations together. The head matmul runs once more per token.
    """
    flat_hidden, flat_labels = hidden.flatten(0, 1), labels.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_labels.numel(), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss_sum, flat_hidden[part], head.weight, flat_labels[part],
                                   use_reentrant=False)  # fmt: skip
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _normal_(param: torch.Tensor, std: float) -> None:
    if is_sharded(param):
        # A sharded parameter (DTensor): draw the whole tensor and keep this rank's part, so the values
        # are the same as an unsharded model's for the same seed, whatever the layout.
        from torch.distributed.tensor import distribute_tensor

        full = torch.empty(param.shape, dtype=param.dtype, device=param.device).normal_(0.0, std)
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        nn.init.normal_(param, mean=0.0, std=std)


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for every matrix, ones for norms, zero expert bias, rope buffers rebuilt."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            _normal_(sub.weight, std)
        elif isinstance(sub, (RMSNorm, RotaryEmbedding)):
            sub.reset_parameters()
        elif isinstance(sub, MoE):
            _normal_(sub.gate.weight, std)
            if sub.gate.expert_bias is not None:
                sub.gate.expert_bias.zero_()
            for param in sub.experts.parameters():
                _normal_(param, std)


class LingModel(nn.Module):
    """The backbone, named as `model.*` in HF checkpoints."""

    def __init__(self, config: LingConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, moe=config.is_moe_layer(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mtp_layers = nn.ModuleList(
            MTPLayer(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        self.rotary_emb = RotaryEmbedding(config)


class LingForCausalLM(nn.Module):
    def __init__(self, config: LingConfig):
        super().__init__()
        self.config = config
        self.model = LingModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def moe_layers(self) -> list[MoE]:
        """Every MoE block in forward order (decoder layers, then MTP layers)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_rope(self, rope_theta: float | None = None, rope_scaling: dict | None | str = "keep") -> None:
        self.model.rotary_emb.set_rope(rope_theta, rope_scaling)
        self.config = self.model.rotary_emb.config

    def init_weights(self) -> None:
        """Initialise every weight with the config's initializer_range; works after `to_empty()` on a
        model built on the meta device."""
        init_weights(self, self.config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_chunk: int | None = None,
    ) -> LingOutput:
        """input_ids [B, T]; labels [B, T] are the next tokens (labels[:, t] follows input_ids[:, t]),
        IGNORE_INDEX where no loss is wanted. MTP layers run when labels are given; their mean loss is
        weighted by the config's mtp_loss_scaling_factor.

        loss_chunk: with labels, compute the losses `loss_chunk` tokens at a time and return no
        logits (training); None keeps the whole logits (evaluation, tests)."""
        B, T = input_ids.shape
        if position_ids is None:
            start = kv_cache.length if kv_cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        h = self.model.word_embeddings(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)
        stats: list[MoEStats] = []
        for layer in self.model.layers:
            h, layer_stats = layer(h, cos, sin, attn_mask, kv_cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        if kv_cache is not None:
            kv_cache.advance(T)
        h = self.model.norm(h)
        chunked = labels is not None and loss_chunk is not None
        out = LingOutput(logits=None if chunked else self.lm_head(h))
        if labels is not None:
            out.main_loss = self._loss(out.logits, h, labels, loss_chunk)
            ids, mtp_labels, hidden = input_ids, labels, h
            for layer in self.model.mtp_layers:
                ids, mtp_labels = shift_left(ids, 0), shift_left(mtp_labels, IGNORE_INDEX)
                hidden, layer_stats = layer(self.model.word_embeddings(ids), hidden, cos, sin, attn_mask)
                stats.append(layer_stats)
                logits = None if chunked else self.lm_head(hidden)
                if logits is not None:
                    out.mtp_logits.append(logits)
                out.mtp_losses.append(self._loss(logits, hidden, mtp_labels, loss_chunk))
            out.loss = out.main_loss
            if out.mtp_losses:
                out.loss = out.loss + self.config.mtp_loss_scaling_factor * torch.stack(out.mtp_losses).mean()
        aux = [s.aux_loss for s in stats if s.aux_loss is not None]
        if aux:
            out.aux_loss = torch.stack(aux).sum()
            if out.loss is not None:
                out.loss = out.loss + out.aux_loss
        if stats:
            out.tokens_per_expert = torch.stack([s.tokens_per_expert for s in stats])
        return out

    def _loss(self, logits, hidden, labels, chunk) -> torch.Tensor:
        if logits is not None:
            return cross_entropy(logits, labels)
        return chunked_cross_entropy(hidden, self.lm_head, labels, chunk)


def build_model(
    config: LingConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, init: bool = True
) -> LingForCausalLM:
    """The one way to construct a `LingForCausalLM`: built on the meta device (no allocation), then
    materialised on `device`.

    With `init`, the weights are initialised in fp32 (`init_weights`, the config's std) and then cast to
    `dtype`. Without, they are allocated directly in `dtype` and left uninitialised for a caller that
    fills every state-dict tensor (a checkpoint load); the rope buffers, which no checkpoint holds, are
    computed. `device="meta"` returns the unmaterialised model (shapes only, in `dtype` if given), e.g.
    to parallelise it before materialising. The router's expert_bias stays fp32 in every dtype.
    """
    with torch.device("meta"):
        model = LingForCausalLM(config)
    meta = str(device) == "meta"
    if init and not meta:
        model = model.to_empty(device=device)
        model.init_weights()
        return model if dtype is None else model.to(dtype)
    if dtype is not None:
        model = model.to(dtype)
    if not meta:
        model = model.to_empty(device=device)
        model.model.rotary_emb.reset_parameters()
    return model
