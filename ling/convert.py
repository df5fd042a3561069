"""`python -m ling.convert dcp-to-hf`: a Lightning checkpoint to a Hugging Face safetensors folder.

Reads either a single `.ckpt` file or a sharded (DCP) checkpoint folder as written by
`ModelParallelStrategy(save_distributed_checkpoint=True)`, takes the model config that `LingModule`
stores under `checkpoint["ling"]["config"]`, and writes the released HF layout in bf16, fp16, fp32
or blockwise fp8. Tensors are read a group at a time, so a checkpoint larger than memory converts.
"""

from __future__ import annotations

import abc
import argparse
import math
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ling.checkpoint.fp8 import FP8_DTYPE, QUANTIZATION_CONFIG, SCALE_SUFFIX, is_fp8_weight, quantize_blockwise
from ling.checkpoint.fp8 import scale_shape as fp8_scale_shape
from ling.checkpoint.hf import CheckpointError, _parse_size, write_hf_folder
from ling.checkpoint.keys import internal_to_hf
from ling.config import ConfigError, LingConfig
from ling.model.model import LingForCausalLM

OUT_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": FP8_DTYPE,
}
# Tensors that an fp8 export does not quantize are written in bf16, as in the released fp8 checkpoints.
FP8_REST_DTYPE = torch.bfloat16
META_NAME = "meta.pt"  # Lightning's file for the non-tensor state beside the DCP shards
MODULE_PREFIX = "model."  # LingModule holds the LingForCausalLM as `self.model`
DCP_PREFIX = "state_dict."  # Lightning saves {"state_dict": ..., "optimizer_0": ...} with DCP
# Wrapper modules (torch.compile, activation checkpointing, FSDP1) insert these into parameter names.
_WRAPPERS = re.compile(r"(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
READ_BYTES = 1 << 30  # tensors read per DCP load call, beyond a single larger tensor


# ---- sources -------------------------------------------------------------------------------------
class _Source(abc.ABC):
    """The model tensors of a Lightning checkpoint: internal names -> (shape, dtype), read on demand."""

    config: LingConfig
    shapes: dict[str, tuple[torch.Size, torch.dtype]]

    @abc.abstractmethod
    def read(self, names: list[str]) -> dict[str, torch.Tensor]: ...


def _internal_name(key: str) -> str | None:
    """`model.model.layers.0...` (LightningModule key) -> `model.layers.0...`; None for non-model keys."""
    key = _WRAPPERS.sub("", key)
    return key.removeprefix(MODULE_PREFIX) if key.startswith(MODULE_PREFIX) else None


def _torch_load(path: Path, what: str) -> Any:
    try:
        # mmap keeps a large .ckpt on disk; only the tensors being converted are paged in.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # unpickling, zip and I/O errors all mean "not a checkpoint we can read"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{what} {os.fspath(path)!r} is not a readable torch checkpoint ({reason}).") from None


def _ling_config(saved: Any, where: str) -> LingConfig:
    ling = saved.get("ling") if isinstance(saved, dict) else None
    if not isinstance(ling, dict) or not isinstance(ling.get("config"), dict):
        raise CheckpointError(
            f"{where} has no 'ling' entry with the model config; it was not written by LingModule "
            "(ling.module), so the model shape is unknown."
        )
    return LingConfig.from_hf(ling["config"])


class _FileSource(_Source):
    def __init__(self, path: Path):
        checkpoint = _torch_load(path, "checkpoint file")
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(f"{os.fspath(path)!r} has no 'state_dict'; it is not a Lightning checkpoint.")
        self.config = _ling_config(checkpoint, repr(os.fspath(path)))
        self.tensors: dict[str, torch.Tensor] = {}
        for key, value in checkpoint["state_dict"].items():
            name = _internal_name(key)
            if name is not None and isinstance(value, torch.Tensor):
                self.tensors[name] = value
        self.shapes = {name: (t.shape, t.dtype) for name, t in self.tensors.items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name] for name in names}


class _DcpSource(_Source):
    def __init__(self, folder: Path):
        if not (folder / ".metadata").is_file():
            hint = " (it looks like a Hugging Face folder already)" if (folder / "config.json").is_file() else ""
            raise CheckpointError(
                f"{os.fspath(folder)!r} is a folder without a .metadata file, so it is not a sharded (DCP) "
                f"Lightning checkpoint{hint}; pass a .ckpt file or a DCP checkpoint folder."
            )
        if not (folder / META_NAME).is_file():
            raise CheckpointError(
                f"{os.fspath(folder)!r} has no {META_NAME} (the non-tensor part Lightning writes beside the "
                "shards), so the model config is unknown."
            )
        self.config = _ling_config(_torch_load(folder / META_NAME, "file"), repr(os.fspath(folder / META_NAME)))
        self.reader = dcp.FileSystemReader(folder)
        try:
            metadata = self.reader.read_metadata()
        except Exception as err:  # a truncated or foreign .metadata file
            where = os.fspath(folder / ".metadata")
            raise CheckpointError(f"{where!r} is not readable DCP metadata ({err}).") from None
        self.fqns: dict[str, str] = {}
        self.shapes = {}
        for fqn, entry in metadata.state_dict_metadata.items():
            if not fqn.startswith(DCP_PREFIX) or not isinstance(entry, TensorStorageMetadata):
                continue  # optimizer state and non-tensor entries
            name = _internal_name(fqn.removeprefix(DCP_PREFIX))
            if name is not None:
                self.fqns[name] = fqn
                self.shapes[name] = (entry.size, entry.properties.dtype)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        # DCP keeps the global shape of every (possibly sharded) tensor, so a plain tensor of that
        # shape receives all the saved shards without a process group.
        targets = {self.fqns[n]: torch.empty(self.shapes[n][0], dtype=self.shapes[n][1]) for n in names}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(targets, storage_reader=self.reader, no_dist=True)
        return {n: targets[self.fqns[n]] for n in names}


def _open_source(path: Path) -> _Source:
    if path.is_dir():
        return _DcpSource(path)
    if path.is_file():
        return _FileSource(path)
    raise CheckpointError(f"checkpoint path {os.fspath(path)!r} does not exist.")


# ---- conversion ----------------------------------------------------------------------------------
def _expected(config: LingConfig) -> dict[str, torch.Size]:
    """Every tensor of the model the config describes, in the model's (= the HF export's) order."""
    with torch.device("meta"):
        model = LingForCausalLM(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _check_tensors(source: _Source, expected: dict[str, torch.Size], where: str) -> None:
    for name, shape in expected.items():
        if name not in source.shapes:
            raise CheckpointError(f"{where} has no tensor for {name!r}, which the model config stored in it needs.")
        if source.shapes[name][0] != shape:
            raise CheckpointError(
                f"{where} holds {name!r} with shape {tuple(source.shapes[name][0])} but its model config "
                f"expects {tuple(shape)}."
            )
    extra = [name for name in source.shapes if name not in expected]
    if extra:
        raise CheckpointError(
            f"{where} holds {MODULE_PREFIX}{extra[0]!r}, which is not a weight of the Ling model its config "
            f"describes ({len(extra)} such tensor(s))."
        )


def _out_parts(name: str, shape: torch.Size, layers: int, dtype: torch.dtype) -> Iterator[tuple[str, int]]:
    """(HF key, bytes) of everything written for one model tensor, in stream order."""
    for key, part in internal_to_hf(name, torch.empty(shape, device="meta"), layers):
        if key.endswith("expert_bias"):
            yield key, part.numel() * 4
        elif dtype == FP8_DTYPE and is_fp8_weight(key):
            yield key, part.numel()
            yield key + SCALE_SUFFIX, math.prod(fp8_scale_shape(part.shape)) * 4
        else:
            yield key, part.numel() * (FP8_REST_DTYPE if dtype == FP8_DTYPE else dtype).itemsize


def _convert(name: str, tensor: torch.Tensor, layers: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, part in internal_to_hf(name, tensor, layers):
        if key.endswith("expert_bias"):
            yield key, part.float().contiguous()
        elif dtype == FP8_DTYPE and is_fp8_weight(key):
            q, scale_inv = quantize_blockwise(part)
            yield key, q
            yield key + SCALE_SUFFIX, scale_inv
        else:
            yield key, part.to(FP8_REST_DTYPE if dtype == FP8_DTYPE else dtype).contiguous()


def _groups(source: _Source, names: list[str], budget: int) -> Iterator[list[str]]:
    """Consecutive names whose tensors together stay within `budget` bytes (a larger tensor alone)."""
    group: list[str] = []
    size = 0
    for name in names:
        shape, dtype = source.shapes[name]
        nbytes = math.prod(shape) * dtype.itemsize
        if group and size + nbytes > budget:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def _stream(source: _Source, names: list[str], dtype: torch.dtype, budget: int) -> Iterator[tuple[str, torch.Tensor]]:
    layers = source.config.num_hidden_layers
    for group in _groups(source, names, budget):
        tensors = source.read(group)
        for name in group:
            yield from _convert(name, tensors.pop(name), layers, dtype)


def _resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in OUT_DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not an export dtype; use one of {', '.join(OUT_DTYPES)}.")
    return OUT_DTYPES[dtype]


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "bf16",
    max_shard_size: int | str = "5GB",
    read_bytes: int = READ_BYTES,
) -> Path:
    """Write the model of a Lightning checkpoint (.ckpt file or DCP folder) as a HF folder; returns `out`.

    `dtype` is bf16, fp16, fp32 or fp8 (blockwise e4m3 projections, the rest bf16); expert_bias
    stays fp32. The input checkpoint is only read.
    """
    source_path, out_path = Path(checkpoint), Path(out)
    torch_dtype = _resolve_dtype(dtype)
    try:
        _parse_size(max_shard_size)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if not source_path.exists():
        raise CheckpointError(f"checkpoint path {os.fspath(source_path)!r} does not exist.")
    if out_path.resolve() == source_path.resolve():
        raise CheckpointError(f"out={os.fspath(out_path)!r} is the checkpoint itself; choose another folder.")
    if out_path.exists() and not out_path.is_dir():
        raise CheckpointError(f"out={os.fspath(out_path)!r} exists and is not a folder.")
    source = _open_source(source_path)
    where = repr(os.fspath(source_path))
    expected = _expected(source.config)
    _check_tensors(source, expected, where)
    names = list(expected)
    layers = source.config.num_hidden_layers
    sizes = [part for name in names for part in _out_parts(name, expected[name], layers, torch_dtype)]
    rest = FP8_REST_DTYPE if torch_dtype == FP8_DTYPE else torch_dtype
    config = source.config.replace(torch_dtype=str(rest).removeprefix("torch.")).to_hf()
    if torch_dtype == FP8_DTYPE:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return write_hf_folder(out_path, _stream(source, names, torch_dtype, read_bytes), sizes, config, max_shard_size)


# ---- command line --------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One `error:` line and exit status 2, like every other user error of this command."""
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m ling.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser(
        "dcp-to-hf",
        help="Lightning checkpoint (.ckpt file or sharded DCP folder) -> HF safetensors folder",
        description="Convert a LingModule checkpoint to a Hugging Face folder (config.json + safetensors).",
    )
    to_hf.add_argument("--checkpoint", required=True, help="a .ckpt file or a sharded (DCP) checkpoint folder")
    to_hf.add_argument("--out", required=True, help="the Hugging Face folder to write")
    to_hf.add_argument("--dtype", default="bf16", choices=list(OUT_DTYPES), help="weight dtype (default bf16)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    args = parser.parse_args(argv)
    try:
        folder = convert_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_size)
    except (CheckpointError, ConfigError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"wrote {args.dtype} Hugging Face checkpoint to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
