"""Aux-loss-free expert balancing (Ling 2.0 / DeepSeek-V3) and the expert-load measure.

Each MoE layer keeps a bias that only steers expert selection. Once per optimizer step, with the
token counts of that step summed over every micro-batch and every data-parallel rank:

    e_i = mean(c) - c_i                       (positive: expert i is under-loaded)
    b_i += u * (sign(e_i) - mean_j sign(e_j))  (Ling's zero-mean form of the sign rule)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """In place: raise the bias of under-loaded experts, lower it for over-loaded ones."""
    counts = counts.to(torch.float32)
    direction = torch.sign(counts.mean() - counts)
    bias.add_(rate * (direction - direction.mean()))


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """Per layer: max_i c_i / mean(c) - 1 (0 is a perfectly even load). counts: [layers, E]."""
    counts = counts.to(torch.float32)
    return counts.max(dim=-1).values / counts.mean(dim=-1).clamp(min=1e-9) - 1


class ExpertLoad:
    """Token counts per MoE layer accumulated over the micro-batches of one optimizer step."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None

    def add(self, tokens_per_expert: torch.Tensor) -> None:
        counts = tokens_per_expert.detach().to(torch.int64)
        self.counts = counts if self.counts is None else self.counts + counts

    def reduce(self) -> torch.Tensor | None:
        """The step's counts summed over all ranks (one all-reduce), then cleared."""
        counts, self.counts = self.counts, None
        if counts is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts
