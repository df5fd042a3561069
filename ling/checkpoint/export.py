"""One export path to a Hugging Face folder, for a live model (whole or sharded) and for saved checkpoints.

A `TensorSource` names the model's tensors with their shapes and reads a few of them at a time as
whole tensors: `ModelSource` gathers a sharded model's tensors one group at a time (every rank
takes part, rank 0 writes), the sources of `ling.convert` read Lightning checkpoints from disk.
`export_hf` converts them to the output dtype (blockwise fp8 included), plans the shard files from
the shapes alone and writes them one at a time, so no process ever holds more than about one shard
file plus one tensor. `save_pretrained`, the `HFExport` callback and `python -m ling.convert` all
write through it.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ling.checkpoint.fp8 import FP8_DTYPE, QUANTIZATION_CONFIG, SCALE_SUFFIX, is_fp8_weight, quantize_blockwise
from ling.checkpoint.fp8 import scale_shape as fp8_scale_shape
from ling.checkpoint.hf import CheckpointError, parse_size, write_hf_folder
from ling.checkpoint.keys import internal_to_hf
from ling.config import LingConfig
from ling.dtypes import dtype_name
from ling.model.dtensor import full, is_sharded

# Tensors that an fp8 export does not quantize are written in bf16, as in the released fp8 checkpoints.
FP8_REST_DTYPE = torch.bfloat16
READ_BYTES = 1 << 30  # tensors read (or gathered) per call, beyond a single larger tensor


class TensorSource(abc.ABC):
    """The tensors of a Ling model under their model names, read on demand as whole tensors."""

    config: LingConfig
    shapes: dict[str, tuple[torch.Size, torch.dtype]]  # in the model's state-dict order
    writer: bool = True  # whether this process writes the files (rank 0 of a sharded model)
    read_bytes: int = READ_BYTES  # how much one `read` call fetches (a single larger tensor alone)
    tokenizer: dict[str, Any] | None = None  # the tokenizer spec a checkpoint records ({"name": ..., ...})
    ling_entry: dict[str, Any] | None = None  # the `ling` entry LingModule stores in its checkpoints

    @abc.abstractmethod
    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | None]:
        """Whole tensors of `names`; `dtype` is the cast the export will apply anyway (a source may
        apply it first, e.g. before gathering, since an elementwise cast commutes with a gather)."""


class ModelSource(TensorSource):
    """A live model. Sharded tensors (DTensors) are gathered one read at a time: every rank must read
    the same names in the same order; only rank 0 keeps the gathered values."""

    read_bytes = 0  # one tensor per gather: a gather has no per-call cost worth grouping for

    def __init__(self, model: torch.nn.Module):
        self.config = model.config
        self.state = model.state_dict()
        self.shapes = {name: (tensor.shape, tensor.dtype) for name, tensor in self.state.items()}
        sharded = any(is_sharded(tensor) for tensor in self.state.values())
        self.writer = not sharded or torch.distributed.get_rank() == 0

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        for name in names:
            tensor = self.state[name].detach()
            if dtype is not None and tensor.is_floating_point() and not name.endswith("expert_bias"):
                tensor = tensor.to(dtype)
            tensor = full(tensor)
            out[name] = tensor.cpu() if self.writer else None
        return out


def _out_dtype(key: str, dtype: torch.dtype | None, tensor_dtype: torch.dtype) -> torch.dtype:
    if key.endswith("expert_bias"):
        return torch.float32
    if dtype == FP8_DTYPE:
        return FP8_DTYPE if is_fp8_weight(key) else FP8_REST_DTYPE
    return dtype or tensor_dtype


def _out_parts(name: str, shape: torch.Size, tensor_dtype: torch.dtype, layers: int, dtype: torch.dtype | None):
    """(HF key, bytes) of everything written for one model tensor, in stream order."""
    for key, part in internal_to_hf(name, torch.empty(shape, device="meta"), layers):
        out = _out_dtype(key, dtype, tensor_dtype)
        yield key, part.numel() * out.itemsize
        if out == FP8_DTYPE:
            yield key + SCALE_SUFFIX, math.prod(fp8_scale_shape(part.shape)) * 4


def _convert(name: str, tensor: torch.Tensor, layers: int, dtype: torch.dtype | None):
    for key, part in internal_to_hf(name, tensor, layers):
        out = _out_dtype(key, dtype, tensor.dtype)
        if out == FP8_DTYPE:
            q, scale_inv = quantize_blockwise(part)
            yield key, q
            yield key + SCALE_SUFFIX, scale_inv
        else:
            yield key, part.to(out).contiguous()


def read_groups(source: TensorSource, budget: int) -> Iterator[list[str]]:
    """Consecutive names whose tensors together stay within `budget` bytes (a larger tensor alone)."""
    group: list[str] = []
    size = 0
    for name, (shape, dtype) in source.shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if group and size + nbytes > budget:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def _read_hint(dtype: torch.dtype | None) -> torch.dtype | None:
    """The cast a source may apply before gathering: none for fp8, whose scales need full precision."""
    return None if dtype == FP8_DTYPE else dtype


def hf_stream(source: TensorSource, dtype: torch.dtype | None = None, read_bytes: int | None = None):
    """(HF key, tensor) of the whole model in the export's order and dtypes; expert_bias always fp32."""
    layers = source.config.num_hidden_layers
    for group in read_groups(source, source.read_bytes if read_bytes is None else read_bytes):
        tensors = source.read(group, _read_hint(dtype))
        for name in group:
            yield from _convert(name, tensors.pop(name), layers, dtype)


def _hf_config(source: TensorSource, dtype: torch.dtype | None, config: LingConfig | None) -> dict[str, Any]:
    if dtype is None:
        dtype = next((d for n, (_, d) in source.shapes.items() if not n.endswith("expert_bias")), torch.float32)
    written = FP8_REST_DTYPE if dtype == FP8_DTYPE else dtype
    out = (config or source.config).replace(torch_dtype=dtype_name(written)).to_hf()
    if dtype == FP8_DTYPE:
        out["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return out


def export_hf(
    source: TensorSource,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    config: LingConfig | None = None,
    tokenizer=None,
    remote_code: str | os.PathLike | None = None,
    read_bytes: int | None = None,
) -> Path:
    """Write `source` as a Hugging Face folder: safetensors shards (+ index), the tokenizer's files,
    generation_config.json, and config.json last (with `auto_map` and the tokenizer's token ids).

    dtype: None keeps each tensor's dtype, torch.float8_e4m3fn writes 128x128 blockwise e4m3
    projections (the rest bf16); expert_bias stays fp32. `config` replaces the source's config in
    config.json (same shapes, e.g. another rope_scaling). On a sharded model every rank must call
    this; rank 0 writes.
    """
    folder = Path(out)
    try:
        parse_size(max_shard_size)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if read_bytes is None:
        read_bytes = source.read_bytes
    if not source.writer:
        for group in read_groups(source, read_bytes):
            source.read(group, _read_hint(dtype))  # take part in the gathers
        return folder
    layers = source.config.num_hidden_layers
    sizes = [
        part for name, (shape, tensor_dtype) in source.shapes.items()
        for part in _out_parts(name, shape, tensor_dtype, layers, dtype)
    ]  # fmt: skip
    from ling.checkpoint.companions import write_companions

    folder.mkdir(parents=True, exist_ok=True)
    hf_config = write_companions(folder, _hf_config(source, dtype, config), tokenizer, remote_code)
    return write_hf_folder(folder, hf_stream(source, dtype, read_bytes), sizes, hf_config, max_shard_size)


def save_pretrained(
    model: torch.nn.Module,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    config: LingConfig | None = None,
    tokenizer=None,
    remote_code: str | os.PathLike | None = None,
) -> Path:
    """Write the model in the released layout (see `export_hf`); a sharded model is gathered one
    group of tensors at a time, and every rank must call this."""
    return export_hf(ModelSource(model), path, dtype, max_shard_size, config, tokenizer, remote_code)
