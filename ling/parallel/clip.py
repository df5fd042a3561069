"""Gradient clipping over parameters that live on different meshes.

With expert parallelism the expert weights and the dense weights are DTensors on different meshes,
and torch's `clip_grad_norm_` cannot combine norms across meshes. Here each mesh's norm is reduced
to a plain number first, then the global norm clips every gradient.
"""

from __future__ import annotations

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ling.model.dtensor import full, is_sharded


def clip_grad_norm_(parameters, max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients (before clipping); clips to max_norm unless it is None.

    A max_norm of 0 or less is refused: the clip coefficient max_norm / norm would then be 0 or
    negative, turning the step off or into gradient ascent."""
    if max_norm is not None and not max_norm > 0:  # NaN too
        raise ValueError(f"max_norm={max_norm} must be positive, or None for no clipping.")
    params_by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            params_by_mesh.setdefault(p.grad.device_mesh if is_sharded(p.grad) else None, []).append(p)
    norms = []
    for params in params_by_mesh.values():
        norm = get_total_norm([p.grad for p in params], norm_type=2.0)
        norms.append(full(norm))
    total = torch.stack(norms).norm() if norms else torch.zeros(())
    if max_norm is not None:
        for params in params_by_mesh.values():
            clip_grads_with_norm_(params, max_norm, total)
    return total
