"""`python -m ling.convert dcp-to-hf`: a Lightning checkpoint to a Hugging Face safetensors folder.

Reads either a single `.ckpt` file or a sharded (DCP) checkpoint folder as written by
`ModelParallelStrategy(save_distributed_checkpoint=True)`, takes the model config that `LingModule`
stores under `checkpoint["ling"]["config"]`, and writes the released HF layout in bfloat16, float16,
float32 or 128x128 blockwise float8_e4m3fn. Tensors are read a group at a time, so a checkpoint larger
than memory converts.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ling.checkpoint.export import READ_BYTES, TensorSource, export_hf
from ling.checkpoint.hf import CheckpointError
from ling.config import ConfigError, LingConfig
from ling.dtypes import FLOAT8_DTYPES, dtype_named
from ling.model.model import build_model

if TYPE_CHECKING:
    from ling.data.tokenizer import Tokenizer

META_NAME = "meta.pt"  # Lightning's file for the non-tensor state beside the DCP shards
MODULE_PREFIX = "model."  # LingModule holds the LingForCausalLM as `self.model`
DCP_PREFIX = "state_dict."  # Lightning saves {"state_dict": ..., "optimizer_0": ...} with DCP


# ---- sources -------------------------------------------------------------------------------------
def _internal_name(key: str) -> str | None:
    """`model.model.layers.0...` (LightningModule key) -> `model.layers.0...`; None for non-model keys.

    The saved keys are the model's own names: blocks are compiled in place, and activation checkpointing
    and FSDP2 keep the names."""
    return key.removeprefix(MODULE_PREFIX) if key.startswith(MODULE_PREFIX) else None


def _torch_load(path: Path, what: str) -> Any:
    try:
        # mmap keeps a large .ckpt on disk; only the tensors being converted are paged in.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # unpickling, zip and I/O errors all mean "not a checkpoint we can read"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{what} {os.fspath(path)!r} is not a readable torch checkpoint ({reason}).") from None


def _ling_entry(saved: Any, where: str) -> dict[str, Any]:
    """The `ling` entry LingModule stores in its checkpoints: the model config, the tokenizer the run
    used (if recorded), tokens_seen, ..."""
    ling = saved.get("ling") if isinstance(saved, dict) else None
    if not isinstance(ling, dict) or not isinstance(ling.get("config"), dict):
        raise CheckpointError(
            f"{where} has no 'ling' entry with the model config; it was not written by LingModule "
            "(ling.lightning_module), so the model shape is unknown."
        )
    return ling


class _LightningSource(TensorSource):
    """A checkpoint written by LingModule: its model config and tokenizer come from its `ling` entry."""

    def _read_ling_entry(self, saved: Any, where: str) -> None:
        self.ling_entry = _ling_entry(saved, where)
        self.config = LingConfig.from_hf(self.ling_entry["config"])
        self.tokenizer = self.ling_entry.get("tokenizer")


class _FileSource(_LightningSource):
    def __init__(self, path: Path):
        checkpoint = _torch_load(path, "checkpoint file")
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(f"{os.fspath(path)!r} has no 'state_dict'; it is not a Lightning checkpoint.")
        self._read_ling_entry(checkpoint, repr(os.fspath(path)))
        self.tensors: dict[str, torch.Tensor] = {}
        for key, value in checkpoint["state_dict"].items():
            name = _internal_name(key)
            if name is not None and isinstance(value, torch.Tensor):
                self.tensors[name] = value
        self.shapes = {name: (t.shape, t.dtype) for name, t in self.tensors.items()}

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name] for name in names}


class _DcpSource(_LightningSource):
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
        meta = _torch_load(folder / META_NAME, "file")
        self._read_ling_entry(meta, repr(os.fspath(folder / META_NAME)))
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

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        # DCP keeps the global shape of every (possibly sharded) tensor, so a plain tensor of that
        # shape receives all the saved shards without a process group.
        targets = {self.fqns[n]: torch.empty(self.shapes[n][0], dtype=self.shapes[n][1]) for n in names}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(targets, storage_reader=self.reader, no_dist=True)
        return {n: targets[self.fqns[n]] for n in names}


def open_checkpoint(path: Path) -> TensorSource:
    if path.is_dir():
        return _DcpSource(path)
    if path.is_file():
        return _FileSource(path)
    raise CheckpointError(f"checkpoint path {os.fspath(path)!r} does not exist.")


# ---- conversion ----------------------------------------------------------------------------------
def check_source(source: TensorSource, where: str) -> None:
    """Refuse a source whose tensors are not exactly those of the model its config describes, and put
    `source.shapes` in the model's (= the HF export's) order."""
    expected = {name: t.shape for name, t in build_model(source.config, device="meta").state_dict().items()}
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
    source.shapes = {name: source.shapes[name] for name in expected}


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "5GB",
    read_bytes: int = READ_BYTES,
    tokenizer: str | None = None,
    remote_code: str | os.PathLike | None = None,
) -> Path:
    """Write the model of a Lightning checkpoint (.ckpt file or DCP folder) as a HF folder; returns `out`.

    `dtype` is float32, bfloat16, float16 or float8_e4m3fn (128x128 blockwise e4m3 projections, the
    rest bfloat16); expert_bias stays fp32. `tokenizer` ("byte", a tokenizer folder or tokenizer.json;
    default: the one the run trained with, as recorded in the checkpoint) is written beside the weights;
    `remote_code` is a local folder with the BailingMoeV2 code files to copy in. The input checkpoint is
    only read.
    """
    source_path, out_path = Path(checkpoint), Path(out)
    torch_dtype = dtype_named(dtype, "dtype", FLOAT8_DTYPES, optional=False)
    if not source_path.exists():
        raise CheckpointError(f"checkpoint path {os.fspath(source_path)!r} does not exist.")
    if out_path.resolve() == source_path.resolve():
        raise CheckpointError(f"out={os.fspath(out_path)!r} is the checkpoint itself; choose another folder.")
    if out_path.exists() and not out_path.is_dir():
        raise CheckpointError(f"out={os.fspath(out_path)!r} exists and is not a folder.")
    source = open_checkpoint(source_path)
    check_source(source, repr(os.fspath(source_path)))
    loaded = export_tokenizer(tokenizer, source.tokenizer)
    return export_hf(source, out_path, torch_dtype, max_shard_size, tokenizer=loaded, remote_code=remote_code,
                     read_bytes=read_bytes)  # fmt: skip


def export_tokenizer(name: str | None, recorded: dict | None) -> Tokenizer | None:
    """The tokenizer an export writes: `name` ("byte", a tokenizer folder or tokenizer.json) if given,
    else the one a checkpoint recorded (its `{"name": ..., "eos_token": ...}`), else none."""
    spec = {"name": name} if name is not None else recorded
    if spec is None:
        return None
    from ling.data.tokenizer import load_tokenizer

    return load_tokenizer(spec["name"], eos_token=spec.get("eos_token"))


# ---- command line --------------------------------------------------------------------------------
class CommandParser(argparse.ArgumentParser):
    """The parser of the `ling.convert` and `ling.merge` commands."""

    def error(self, message: str) -> NoReturn:
        """One `error:` line and exit status 2, like every other user error of the command."""
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m ling.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser(
        "dcp-to-hf",
        help="Lightning checkpoint (.ckpt file or sharded DCP folder) -> HF safetensors folder",
        description="Convert a LingModule checkpoint to a Hugging Face folder (config.json + safetensors).",
    )
    to_hf.add_argument("--checkpoint", required=True, help="a .ckpt file or a sharded (DCP) checkpoint folder")
    to_hf.add_argument("--out", required=True, help="the Hugging Face folder to write")
    to_hf.add_argument(
        "--dtype", default="bfloat16", help=f"weight dtype: {', '.join(FLOAT8_DTYPES)} (default bfloat16)"
    )
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    to_hf.add_argument("--tokenizer", help="tokenizer to write beside the weights (default: the run's own)")
    to_hf.add_argument("--remote-code", help="a folder with the BailingMoeV2 code files, copied in for offline use")
    args = parser.parse_args(argv)
    try:
        folder = convert_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_size,
                                    tokenizer=args.tokenizer, remote_code=args.remote_code)  # fmt: skip
    except (CheckpointError, ConfigError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"wrote {args.dtype} Hugging Face checkpoint to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
