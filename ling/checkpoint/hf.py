"""Hugging Face checkpoint folders in and out: config.json + safetensors (one file or index + shards)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ling.checkpoint.fp8 import BLOCK, FP8_DTYPE, SCALE_SUFFIX, dequantize_blockwise
from ling.checkpoint.keys import hf_to_internal, internal_to_hf, internal_to_hf_name
from ling.config import LingConfig
from ling.model.model import LingForCausalLM, init_weights

log = logging.getLogger("ling.checkpoint")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold a readable Ling model matching its config."""


# ---- reading ---------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index with a 'weight_map' ({err}).") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index} lists shard {absent[0]!r}, which is not in {folder}.")
        return files
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME]
    raise CheckpointError(f"{folder} has neither {SINGLE_NAME} nor {INDEX_NAME}; it is not a HF checkpoint folder.")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers and data
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}).") from None


def _checkpoint_keys(files: list[Path]) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    for file in files:
        with _open(file) as handle:
            keys.update(dict.fromkeys(handle.keys(), file))
    return keys


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


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> LingForCausalLM:
    """Load a local HF Ling folder. Experts are copied shard by shard into the stacked weights.

    Blockwise-fp8 weights (with `*_scale_inv`, as in the released fp8 checkpoints) are dequantised.

    `config_overrides` replace config.json fields (e.g. `num_nextn_predict_layers=1` to add an MTP
    layer to a checkpoint released without one: it is freshly initialised and a warning says so).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {os.fspath(path)!r} is not a folder.")
    config = LingConfig.from_json_file(folder / "config.json")
    files = _weight_files(folder)
    keys = _checkpoint_keys(files)
    config = _resolve_layer_count(config, keys).replace(**config_overrides)
    if dtype is None:
        dtype = DTYPES.get(config.torch_dtype, torch.float32)
    block = (config.extra.get("quantization_config") or {}).get("weight_block_size", [BLOCK, BLOCK])

    with torch.device("meta"):
        model = LingForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    loaded: set[tuple[str, int | None]] = set()
    skipped_mtp: list[str] = []
    with torch.no_grad():
        for file in files:
            with _open(file) as handle:
                for key in handle.keys():
                    if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in keys:
                        continue  # read with its float8 weight
                    name, expert = hf_to_internal(key, config.num_hidden_layers)
                    if name not in targets:
                        if name.startswith("model.mtp_layers."):
                            skipped_mtp.append(key)
                            continue
                        raise CheckpointError(
                            f"{file.name} holds {key!r}, which is not a weight of a Ling model with this "
                            f"config ({config.num_hidden_layers} layers, {config.num_experts} experts)."
                        )
                    target = targets[name]
                    if expert is not None:
                        if expert >= target.shape[0]:
                            raise CheckpointError(
                                f"{file.name} holds {key!r} but the config has only {target.shape[0]} experts."
                            )
                        target = target[expert]
                    tensor = handle.get_tensor(key)
                    if tensor.dtype == FP8_DTYPE:
                        tensor = _dequantize(key, tensor, file, handle, keys, block)
                    if tensor.shape != target.shape:
                        raise CheckpointError(
                            f"{key!r} in {file.name} has shape {tuple(tensor.shape)} but the model built from "
                            f"config.json expects {tuple(target.shape)}."
                        )
                    target.copy_(tensor)
                    loaded.add((name, expert))
    if skipped_mtp:
        log.warning(
            "the checkpoint has MTP weights (%d tensors) that this config does not use; ignored.", len(skipped_mtp)
        )
    _check_complete(model, targets, loaded, folder, config)
    model.model.rotary_emb.reset_parameters()
    return model


def _dequantize(key: str, q: torch.Tensor, file: Path, handle, keys: dict[str, Path], block) -> torch.Tensor:
    """A blockwise-fp8 weight back in float32, its `_scale_inv` read from whichever shard holds it."""
    scale_key = key + SCALE_SUFFIX
    if scale_key not in keys:
        raise CheckpointError(f"{file.name} holds the float8 tensor {key!r} but the checkpoint has no {scale_key!r}.")
    if keys[scale_key] == file:
        scale_inv = handle.get_tensor(scale_key)
    else:
        with _open(keys[scale_key]) as other:
            scale_inv = other.get_tensor(scale_key)
    try:
        return dequantize_blockwise(q, scale_inv, tuple(block))
    except ValueError as err:
        raise CheckpointError(f"{key!r} in {file.name}: {err}") from None


def _check_complete(model, targets, loaded, folder: Path, config: LingConfig) -> None:
    missing: list[tuple[str, torch.Size]] = []
    for name, tensor in targets.items():
        if re.fullmatch(r".*mlp\.experts\.(gate|up|down)_proj", name):
            missing += [(f"{name}[{e}]", tensor.shape[1:]) for e in range(tensor.shape[0]) if (name, e) not in loaded]
        elif (name, None) not in loaded:
            missing.append((name, tensor.shape))
    if not missing:
        return
    if all(name.startswith("model.mtp_layers.") for name, _ in missing) and not any(
        name.startswith("model.mtp_layers.") for name, _ in loaded
    ):
        init_weights(model.model.mtp_layers, config.initializer_range)
        log.warning(
            "%s has no MTP weights; the %d MTP layer(s) were initialised with std %g.",
            folder,
            config.num_nextn_predict_layers,
            config.initializer_range,
        )
        return
    name, shape = missing[0]
    match = re.fullmatch(r"(.*)\[(\d+)\]", name)
    hf_name = (
        internal_to_hf_name(match.group(1), config.num_hidden_layers, int(match.group(2)))
        if match
        else internal_to_hf_name(name, config.num_hidden_layers)
    )
    raise CheckpointError(
        f"{folder} has no tensor {hf_name!r} (expected shape {tuple(shape)}); {len(missing)} weight(s) are missing."
    )


# ---- writing ---------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB'.")
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units.get((match.group(2) or "").lower(), 1))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a sharded DTensor is gathered)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def hf_state_dict(model: LingForCausalLM, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under HF names, one expert at a time; expert_bias always fp32."""
    layers = model.config.num_hidden_layers
    for name, tensor in model.state_dict().items():
        tensor = _full(tensor).detach()
        for key, part in internal_to_hf(name, tensor, layers):
            if key.endswith("expert_bias"):
                part = part.float()
            elif dtype is not None:
                part = part.to(dtype)
            yield key, part.cpu().contiguous()


def _hf_views(model: LingForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """HF keys with the model's own tensors (expert slices are views): no cast, gather or copy."""
    layers = model.config.num_hidden_layers
    for name, tensor in model.state_dict().items():
        yield from internal_to_hf(name, tensor, layers)


def _hf_sizes(model: LingForCausalLM, dtype: torch.dtype | None) -> Iterator[tuple[str, int]]:
    for key, part in _hf_views(model):
        itemsize = 4 if key.endswith("expert_bias") else (dtype or part.dtype).itemsize
        yield key, part.numel() * itemsize


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(
    model: LingForCausalLM,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    config: LingConfig | None = None,
) -> Path:
    """Write config.json and safetensors shards (+ index when more than one) in the released layout.

    `config` replaces the model's config in config.json (same shapes), e.g. to add rope scaling.

    Each file is written under a temporary name and renamed into place, the index and config last,
    so an interrupted save never leaves a half-written file under a final name.
    """
    torch_dtype = None
    for key, tensor in _hf_views(model):
        if not key.endswith("expert_bias"):
            torch_dtype = str(dtype or tensor.dtype).removeprefix("torch.")
            break
    config = (config or model.config).replace(
        torch_dtype=torch_dtype, num_nextn_predict_layers=len(model.model.mtp_layers)
    )
    return write_hf_folder(path, hf_state_dict(model, dtype), _hf_sizes(model, dtype), config.to_hf(), max_shard_size)


def write_hf_folder(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    sizes: Iterable[tuple[str, int]],
    config: dict[str, Any],
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a stream of (HF key, tensor) as safetensors shards, the index when sharded, config.json last.

    `sizes` gives every key's byte size in stream order: the shards are planned from sizes alone so
    that only one shard's tensors are ever in memory. `config` is the config.json content.
    """
    folder = Path(path)
    limit = _parse_size(max_shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    plan: list[list[str]] = [[]]
    shard_sizes = [0]
    for key, nbytes in sizes:
        if plan[-1] and shard_sizes[-1] + nbytes > limit:
            plan.append([])
            shard_sizes.append(0)
        plan[-1].append(key)
        shard_sizes[-1] += nbytes
    count = len(plan)
    names = [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    stream = iter(tensors)
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, plan, strict=True):
        shard = {}
        for key in keys:
            got, tensor = next(stream)
            assert got == key, (got, key)
            # Each expert slice needs its own storage: safetensors refuses tensors that share memory.
            shard[key] = tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
        _write_atomic(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(keys, name))
    stale = [p for p in folder.glob("model*.safetensors") if p.name not in names]
    if count > 1:
        index = {"metadata": {"total_size": sum(shard_sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        _write_atomic(folder / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    elif (folder / INDEX_NAME).exists():
        stale.append(folder / INDEX_NAME)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomic(folder / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for old in stale:
        old.unlink()
    return folder
