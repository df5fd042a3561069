"""Expert parallelism: each rank of the `ep` group holds E / ep experts and computes them for the
tokens of every rank in the group.

Applied to a `GroupedExperts` module with `parallelize_module(experts, ep_mesh, ExpertParallel())`:
the stacked expert weights become DTensors sharded on dim 0 over `ep`; before the module runs, the
tokens (already sorted by expert) go to the rank that owns their expert (an all-to-all of counts,
then an uneven, differentiable all-to-all of rows, reordered expert-major); afterwards the results
travel back the same way. Routing is unchanged, so each rank's routing decisions stay its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# torch's differentiable functional all-to-all, in an underscore module in torch 2.13 (torchtitan's expert
# parallelism uses the same one)
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def expert_major_order(received: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that turns a receive buffer laid out [source rank][local expert] into expert-major
    [local expert][source rank]. received: [ep, local experts] row counts; total: their sum, which the
    host knows already (the dispatch's split sizes), so that no shape here waits for the device."""
    counts = received.flatten()
    starts = (torch.cumsum(counts, 0) - counts).view_as(received)
    lengths = received.t().flatten()  # segments in expert-major order
    seg_starts = starts.t().flatten()
    within = torch.arange(total, device=received.device)
    within = within - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths, output_size=total)
    return torch.repeat_interleave(seg_starts, lengths, output_size=total) + within


class ExpertParallel(ParallelStyle):
    def __init__(self):
        super().__init__()
        self._state: list[tuple] = []  # (order, input splits, output splits) of the pending forward

    @staticmethod
    def _partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for key, param in list(module.named_parameters(recurse=False)):
            # Every rank holds the same full weights here (or none yet, on meta): take the local slice.
            sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(key, nn.Parameter(sharded, requires_grad=param.requires_grad))

    def _dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, counts = inputs
        ep, group = mesh.size(), mesh.get_group()
        with torch.no_grad():
            received = torch.empty_like(counts)
            dist.all_to_all_single(received, counts.contiguous(), group=group)
            received = received.view(ep, -1)
            # The one wait for the device in a dispatch: all_to_all takes its split sizes as host
            # numbers, so both directions' sizes come back in a single transfer.
            send_splits, recv_splits = torch.stack([counts.view(ep, -1).sum(1), received.sum(1)]).tolist()
        rows = all_to_all_single_autograd(x, recv_splits, send_splits, group)
        order = expert_major_order(received, total=sum(recv_splits))
        self._state.append((order, send_splits, recv_splits))
        return rows[order], received.sum(0)

    def _combine(self, module: nn.Module, outputs: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        order, send_splits, recv_splits = self._state.pop()
        by_source = torch.empty_like(outputs).index_copy(0, order, outputs)
        return all_to_all_single_autograd(by_source, send_splits, recv_splits, mesh.get_group())

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from torch.distributed.tensor import distribute_module

        return distribute_module(module, device_mesh, self._partition, self._dispatch, self._combine)
