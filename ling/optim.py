"""AdamW for Ling training: the Ling 2.0 hyper-parameters and the usual decay / no-decay split.

The report trains with AdamW, betas (0.9, 0.95) and weight decay 0.1. Decay is applied to weight
matrices only: shrinking a norm's gain or a bias towards zero changes what the layer computes rather than
regularising it, so 1-D parameters are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ling.config import ConfigError


@dataclass
class OptimizerConfig:
    """AdamW settings. A plain dataclass so LightningCLI / jsonargparse can expose every field as a flag."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Whether the input embedding table is decayed like the other matrices (Megatron decays it).
    embedding_weight_decay: bool = True
    # None lets torch pick the implementation; True/False forces the fused kernel on or off.
    fused: bool | None = None

    def __post_init__(self) -> None:
        # jsonargparse and YAML hand sequences over as lists; keep the declared tuple type.
        self.betas = tuple(self.betas)
        # `not x > 0` form so that NaN is rejected too.
        if not self.lr > 0:
            raise ConfigError(f"OptimizerConfig.lr must be > 0, got {self.lr}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"OptimizerConfig.betas must be two values in [0, 1), got {self.betas}.")
        if not self.eps >= 0:
            raise ConfigError(f"OptimizerConfig.eps must be >= 0, got {self.eps}.")
        if not self.weight_decay >= 0:
            raise ConfigError(f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}.")


def param_groups(model: nn.Module, weight_decay: float, embedding_weight_decay: bool) -> list[dict]:
    """AdamW parameter groups: "decay" holds every trainable matrix (ndim >= 2: linear weights, stacked
    expert weights, router weights, lm_head), "no_decay" the norms and biases. nn.Embedding weights go
    to "decay" only when `embedding_weight_decay`. Each trainable parameter lands in exactly one group
    (named_parameters already drops tied duplicates); buffers such as the router's expert_bias are not
    parameters and never appear. Empty groups are left out, since a group with no parameters only adds
    noise to the LR logs."""
    # Found by module type, not by name, so a renamed or extra embedding table is still recognised.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = id(param) in embeddings
        if param.ndim >= 2 and (embedding_weight_decay or not is_embedding):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups(model, ...)` with the settings in `cfg`."""
    groups = param_groups(model, cfg.weight_decay, cfg.embedding_weight_decay)
    # Only forward `fused` when set: torch's default (None) chooses the best implementation per device.
    extra = {} if cfg.fused is None else {"fused": cfg.fused}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **extra)
