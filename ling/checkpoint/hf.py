"""The files of a Hugging Face checkpoint folder: config.json + safetensors (one file, or an index + shards).

Reading a model from such a folder is `ling.checkpoint.load`, writing one `ling.checkpoint.export`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The dtype codes in a safetensors header (a file-format table; the names users write are `ling.dtypes`').
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
}


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold a readable Ling model matching its config."""


# ---- reading ---------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
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


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers and data
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}).") from None


def checkpoint_keys(files: list[Path]) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as handle:
            keys.update(dict.fromkeys(handle.keys(), file))
    return keys


# ---- writing ---------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB'.")
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units.get((match.group(2) or "").lower(), 1))


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place (removed on failure)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    limit = parse_size(max_shard_size)
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
        write_atomic(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(keys, name))
    stale = [p for p in folder.glob("model*.safetensors") if p.name not in names]
    if count > 1:
        index = {"metadata": {"total_size": sum(shard_sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(folder / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    elif (folder / INDEX_NAME).exists():
        stale.append(folder / INDEX_NAME)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomic(folder / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for old in stale:
        old.unlink()
    return folder
