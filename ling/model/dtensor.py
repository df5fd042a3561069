"""The three questions the code asks of a tensor that may be a DTensor (a parameter sharded by FSDP2 or
split by expert parallelism): is it one, what does this rank hold, and what is the whole of it."""

from __future__ import annotations

import torch

try:  # a torch built without distributed support has no DTensor, and no tensor is one
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # isinstance(x, ()) is always False


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor`: a DTensor gathered from every rank of its mesh (all must call), any other
    tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
