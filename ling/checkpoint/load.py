"""Loading a Hugging Face Ling folder into a model, whole or sharded, reading only what each rank keeps.

Every target tensor of the model (a plain tensor, or a DTensor shard under FSDP2 / expert
parallelism) is filled from the memory-mapped safetensors files through `get_slice`: a rank reads
the rows of its own shard and, for stacked expert weights, only the per-expert tensors of the
experts it holds, straight into its local shard. No full model is ever assembled in memory; a
one-device load holds the model plus the one tensor being copied.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ling.checkpoint.fp8 import BLOCK, FP8_DTYPE, SCALE_SUFFIX, dequantize_blockwise, scale_shape
from ling.checkpoint.hf import SAFETENSORS_DTYPES, CheckpointError, checkpoint_keys, open_safetensors, weight_files
from ling.checkpoint.keys import hf_to_internal, internal_to_hf_name, is_stacked_expert
from ling.config import LingConfig
from ling.dtypes import DTYPES
from ling.model.dtensor import is_sharded
from ling.model.model import LingForCausalLM, build_model, init_weights

log = logging.getLogger("ling.checkpoint")


def _resolve_layer_count(config: LingConfig, keys: dict[str, Path]) -> LingConfig:
    """The remote-code config counts MTP layers inside num_hidden_layers; the converter does not.

    If the last "decoder" layer carries MTP-only weights, num_hidden_layers included the MTP layers.
    """
    depth = config.num_nextn_predict_layers
    if depth and f"model.layers.{config.num_hidden_layers - 1}.eh_proj.weight" in keys:
        log.info(
            "config.json counts the %d MTP layer(s) in num_hidden_layers; using %d decoder layers.",
            depth,
            config.num_hidden_layers - depth,
        )
        return config.replace(num_hidden_layers=config.num_hidden_layers - depth)
    return config


def pretrained_config(path: str | os.PathLike, **config_overrides) -> LingConfig:
    """The model config of a HF Ling folder (its config.json, MTP layer count resolved) plus overrides."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {os.fspath(path)!r} is not a folder.")
    config = LingConfig.from_json_file(folder / "config.json")
    return _resolve_layer_count(config, checkpoint_keys(weight_files(folder))).replace(**config_overrides)


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> LingForCausalLM:
    """Load a local HF Ling folder. Experts are copied one by one into the stacked weights.

    Blockwise-fp8 weights (with `*_scale_inv`, as in the released fp8 checkpoints) are dequantised.

    `config_overrides` replace config.json fields (e.g. `num_nextn_predict_layers=1` to add an MTP
    layer to a checkpoint released without one: it is freshly initialised and a warning says so).
    """
    config = pretrained_config(path, **config_overrides)
    if dtype is None:
        dtype = DTYPES.get(config.torch_dtype, torch.float32)
    model = build_model(config, device, dtype, init=False)
    load_hf_weights(model, path)
    return model


def _local_region(target: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(the tensor this rank holds, its offset in the global tensor, its size) for a plain tensor or a
    DTensor. A DTensor's region comes from `__create_chunk_list__`, the protocol DCP itself uses to
    learn which part of the global tensor a rank holds (it resolves FSDP2's strided sharding of the
    expert-parallel slices as well)."""
    if not is_sharded(target):
        return target, (0,) * target.dim(), tuple(target.shape)
    chunks = target.__create_chunk_list__()
    if len(chunks) != 1:
        raise CheckpointError(f"a parameter is sharded into {len(chunks)} pieces on one rank; expected one.")
    return target.to_local(), tuple(chunks[0].offsets), tuple(chunks[0].sizes)


class HFReader:
    """Region reads from the safetensors files of one HF folder, dequantising blockwise fp8 on the way
    (in the blocks its config.json's `quantization_config` names, 128x128 by default).

    One file is open (memory-mapped) at a time, and the keys are read file by file: the file pages a
    read touches count towards the process's memory until its file is closed, so at most one file's
    pages are ever mapped beside the model."""

    def __init__(self, folder: Path, config: LingConfig):
        quantization = config.extra.get("quantization_config") or {}
        self.block = tuple(quantization.get("weight_block_size", [BLOCK, BLOCK]))
        self.keys: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}  # as stored (None: a code no model tensor has)
        for file in weight_files(folder):
            with open_safetensors(file) as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    self.keys[key] = file
                    self.shapes[key] = tuple(part.get_shape())
                    self.dtypes[key] = SAFETENSORS_DTYPES.get(part.get_dtype())
        self._file: Path | None = None
        self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._file = self._handle = None

    def _slice(self, key: str):
        if self.keys[key] != self._file:
            self.close()
            self._handle = open_safetensors(self.keys[key]).__enter__()
            self._file = self.keys[key]
        return self._handle.get_slice(key)

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        part = self._slice(key)
        region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
        tensor = part[region] if region else part[:]
        if self.dtypes[key] != FP8_DTYPE:
            return tensor
        scale_key = key + SCALE_SUFFIX
        if scale_key not in self.keys:
            raise CheckpointError(
                f"{self.keys[key].name} holds the float8 tensor {key!r} but the checkpoint has no {scale_key!r}."
            )
        expected = scale_shape(self.shapes[key], self.block)
        if self.shapes[scale_key] != expected:
            raise CheckpointError(
                f"{scale_key!r} has shape {self.shapes[scale_key]} but a {self.shapes[key]} weight in "
                f"{self.block[0]}x{self.block[1]} blocks needs {expected}."
            )
        (r0, c0), (nr, nc) = offsets, sizes
        br, bc = self.block
        scale_rows = slice(r0 // br, -(-(r0 + nr) // br))
        scale_cols = slice(c0 // bc, -(-(c0 + nc) // bc))
        scale_inv = self._slice(scale_key)[scale_rows, scale_cols]
        return dequantize_blockwise(tensor, scale_inv, self.block, (r0 % br, c0 % bc))


def expected_keys(model: LingForCausalLM) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """HF key -> (model tensor name, expert index or None, full shape of that HF tensor)."""
    layers = model.config.num_hidden_layers
    out = {}
    for name, tensor in model.state_dict().items():
        if is_stacked_expert(name):
            for e in range(tensor.shape[0]):
                out[internal_to_hf_name(name, layers, e)] = (name, e, tuple(tensor.shape[1:]))
        else:
            out[internal_to_hf_name(name, layers)] = (name, None, tuple(tensor.shape))
    return out


@torch.no_grad()
def load_hf_weights(model: LingForCausalLM, path: str | os.PathLike) -> None:
    """Fill every weight of a materialised model (plain or sharded) from a HF Ling folder.

    Each rank reads only its own region of each tensor. MTP layers the folder has no weights for
    are initialised (with a warning), MTP weights the model has no layer for are skipped (with a
    warning); any other missing, extra or misshaped tensor is one CheckpointError sentence.
    """
    folder, config = Path(path), model.config
    expected = expected_keys(model)
    targets = model.state_dict()
    reader = HFReader(folder, config)
    scales = {k for k in reader.keys if k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in reader.keys}
    stored = set(reader.keys) - scales
    _check_keys(stored, expected, reader, config)
    missing = [key for key in expected if key not in stored]
    if missing and not _only_mtp_missing(missing, expected, stored):
        key = missing[0]
        raise CheckpointError(
            f"{folder} has no tensor {key!r} (expected shape {expected[key][2]}); {len(missing)} weight(s) are missing."
        )
    for key, (_, _, shape) in expected.items():
        if key in stored and reader.shapes[key] != shape:
            raise CheckpointError(
                f"{key!r} in {reader.keys[key].name} has shape {reader.shapes[key]} but the model built from "
                f"config.json expects {shape}."
            )
    order = {file: i for i, file in enumerate(dict.fromkeys(reader.keys.values()))}
    try:
        for key in sorted((k for k in expected if k in stored), key=lambda k: order[reader.keys[k]]):
            name, expert, _ = expected[key]
            local, offsets, sizes = _local_region(targets[name])
            if expert is not None:
                first, count = offsets[0], sizes[0]
                if not first <= expert < first + count:
                    continue  # another rank's expert
                local, offsets, sizes = local[expert - first], offsets[1:], sizes[1:]
            if local.numel() == 0:
                continue  # an empty shard (more ranks than rows)
            local.copy_(reader.read(key, offsets, sizes))
    finally:
        reader.close()
    if missing:
        init_weights(model.model.mtp_layers, config.initializer_range)
        log.warning(
            "%s has no MTP weights; the %d MTP layer(s) were initialised with std %g.",
            folder,
            config.num_nextn_predict_layers,
            config.initializer_range,
        )
    model.model.rotary_emb.reset_parameters()  # non-persistent buffers, never in a checkpoint


def _only_mtp_missing(missing: list[str], expected: dict, stored: set[str]) -> bool:
    """True when the folder has no MTP weights at all (the released chat checkpoints) and nothing else is missing."""
    is_mtp = lambda key: expected[key][0].startswith("model.mtp_layers.")  # noqa: E731
    mtp_keys = [key for key in expected if is_mtp(key)]
    return all(is_mtp(key) for key in missing) and not any(key in stored for key in mtp_keys)


def _check_keys(stored: set[str], expected: dict, reader: HFReader, config: LingConfig) -> None:
    skipped_mtp = []
    for key in sorted(stored - expected.keys()):
        name, expert = hf_to_internal(key, config.num_hidden_layers)
        if name.startswith("model.mtp_layers."):
            skipped_mtp.append(key)
            continue
        if expert is not None and expert >= config.num_experts:
            raise CheckpointError(
                f"{reader.keys[key].name} holds {key!r} but the config has only {config.num_experts} experts."
            )
        raise CheckpointError(
            f"{reader.keys[key].name} holds {key!r}, which is not a weight of a Ling model with this "
            f"config ({config.num_hidden_layers} layers, {config.num_experts} experts)."
        )
    if skipped_mtp:
        log.warning(
            "the checkpoint has MTP weights (%d tensors) that this config does not use; ignored.", len(skipped_mtp)
        )
