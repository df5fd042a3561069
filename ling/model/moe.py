"""The Ling MoE block: fp32 sigmoid router with group-limited top-k, grouped experts, shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ling.config import ROUTER_DTYPES, LingConfig
from ling.model.dtensor import local
from ling.model.mlp import SwiGLU


@dataclass
class Routing:
    indices: torch.Tensor  # [N, K] chosen experts
    weights: torch.Tensor  # [N, K] combine weights (normalised when norm_topk_prob, times routed_scaling_factor)
    logits: torch.Tensor  # [N, E] fp32 router logits
    scores: torch.Tensor  # [N, E] fp32 sigmoid affinities (no bias)


def group_limited_topk(biased: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """Indices of the top_k experts inside the topk_group best groups (group score = sum of its top 2)."""
    if n_group == 1:
        return biased.topk(top_k, dim=-1).indices
    tokens, experts = biased.shape
    grouped = biased.view(tokens, n_group, experts // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep_groups = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    masked = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(tokens, experts)
    return masked.topk(top_k, dim=-1).indices


class Router(nn.Module):
    """Named `gate` in the block, as in the HF checkpoints. `expert_bias` steers selection only.

    The logits, sigmoid and top-k run in `router_dtype` whatever the activation dtype. With
    norm_topk_prob false the chosen scores are used as they are (times routed_scaling_factor); with
    moe_router_enable_expert_bias false there is no `expert_bias` buffer (None) and the plain scores
    pick the experts.
    """

    expert_bias: torch.Tensor | None

    def __init__(self, config: LingConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scaling = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.compute_dtype: torch.dtype = getattr(torch, ROUTER_DTYPES[config.router_dtype])
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # Updated by the aux-loss-free balancing rule, never by gradients; saved in checkpoints.
        bias = torch.zeros(config.num_experts, dtype=torch.float32) if config.moe_router_enable_expert_bias else None
        self.register_buffer("expert_bias", bias)

    def _apply(self, fn, recurse=True):
        # The bias stays fp32 when the model is cast (Megatron and the released weights keep it fp32).
        before = self.expert_bias
        super()._apply(fn, recurse)
        if before is not None and self.expert_bias.dtype != torch.float32:
            # Restore the unrounded values (a bf16 round trip would change which experts win).
            self.expert_bias = before.to(device=self.expert_bias.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype))
        scores = torch.sigmoid(logits)
        with torch.no_grad():
            biased = scores if self.expert_bias is None else scores + self.expert_bias
            indices = group_limited_topk(biased, self.n_group, self.topk_group, self.top_k)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * self.scaling, logits, scores)


class GroupedExperts(nn.Module):
    """All routed experts as stacked weights, in the HF per-expert (out, in) orientation."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [M, H] rows sorted by expert; counts: [E] rows per expert (this rank's experts)."""
        return self.swiglu(x, torch.cumsum(counts, dim=0, dtype=torch.int32))

    def swiglu(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """The three grouped GEMMs; offs: [E] int32 end row of each expert's group."""
        gate_proj, up_proj, down_proj = (local(w) for w in (self.gate_proj, self.up_proj, self.down_proj))
        gate = self.grouped_mm(x, gate_proj, offs)
        up = self.grouped_mm(x, up_proj, offs)
        return self.grouped_mm(F.silu(gate) * up, down_proj, offs)

    def grouped_mm(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x @ weight[e].T for each expert's rows; weight: [E, out, in]."""
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)

    def forward_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same computation one expert at a time: the reference the grouped path is tested against."""
        # unbind once: indexing the stack per expert would make each backward fill a whole-stack gradient
        weights = zip(self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0), strict=True)
        outputs, start = [], 0
        for (gate, up, down), n in zip(weights, counts.tolist(), strict=True):
            rows = x[start : start + n]
            outputs.append(F.linear(F.silu(F.linear(rows, gate)) * F.linear(rows, up), down))
            start += n
        return torch.cat(outputs, dim=0)


class WeightedSlotSum(torch.autograd.Function):
    """sum_k w[n, k] * x[n, k, :] computed in fp32 (as the reference implementation does) and cast
    back to x's dtype. Autograd would keep an fp32 copy of x for backward; this keeps x as it is and
    upcasts again in backward, so bf16 training saves half the memory for this step."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, x)
        acc = torch.promote_types(x.dtype, torch.float32)
        return torch.bmm(weights.to(acc).unsqueeze(1), x.to(acc)).squeeze(1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, x = ctx.saved_tensors
        acc = torch.promote_types(x.dtype, torch.float32)
        grad = grad.to(acc).unsqueeze(1)  # [N, 1, H]
        grad_weights = torch.bmm(x.to(acc), grad.transpose(1, 2)).squeeze(2).to(weights.dtype)
        grad_x = (weights.to(acc).unsqueeze(2) * grad).to(x.dtype)
        return grad_weights, grad_x


@dataclass
class MoEStats:
    tokens_per_expert: torch.Tensor  # [E] assignments in this forward (detached)
    aux_loss: torch.Tensor | None  # weighted router z-loss + sequence balance loss, if enabled


class MoE(nn.Module):
    def __init__(self, config: LingConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.z_loss_coeff = config.router_z_loss_coeff
        self.seq_aux_coeff = config.seq_aux_loss_coeff
        self.use_loop = False  # the per-expert reference path, for tests and benchmarks
        self.gate = Router(config)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.shared_expert_intermediate_size if config.num_shared_experts else 0
        self.shared_experts = SwiGLU(config.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        routing = self.gate(flat)
        slots = routing.indices.flatten()
        # A scatter into E fixed slots: bincount's output size depends on the largest index, so on a
        # GPU it would make the host wait for the router in every MoE layer.
        counts = slots.new_zeros(self.num_experts).scatter_add_(0, slots, torch.ones_like(slots))
        order = slots.argsort(stable=True)
        sorted_rows = flat[order // self.top_k]
        expert_out = (self.experts.forward_loop if self.use_loop else self.experts)(sorted_rows, counts)
        by_slot = expert_out.new_empty(expert_out.shape).index_copy(0, order, expert_out)
        y = WeightedSlotSum.apply(routing.weights, by_slot.view(-1, self.top_k, H)).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, MoEStats(counts.detach(), self._aux_loss(routing, B, T))

    def _aux_loss(self, routing: Routing, B: int, T: int) -> torch.Tensor | None:
        terms = []
        if self.z_loss_coeff:
            terms.append(self.z_loss_coeff * torch.logsumexp(routing.logits, dim=-1).square().mean())
        if self.seq_aux_coeff:
            # DeepSeek-V3 sequence-wise balance loss: alpha * sum_i f_i * P_i per sequence, averaged.
            E, K = self.num_experts, self.top_k
            chosen = torch.zeros_like(routing.scores).scatter_(1, routing.indices, 1.0).view(B, T, E)
            f = chosen.sum(dim=1) * E / (K * T)
            probs = routing.scores / routing.scores.sum(dim=-1, keepdim=True)
            p = probs.view(B, T, E).mean(dim=1)
            terms.append(self.seq_aux_coeff * (f * p).sum(dim=-1).mean())
        return sum(terms) if terms else None
