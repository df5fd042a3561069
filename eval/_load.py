"""Loading a model to evaluate: a Hugging Face folder or a Lightning checkpoint (a .ckpt file or a DCP
folder), with every user mistake reported as one sentence before any weight is read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ling.config import ConfigError, LingConfig
from ling.data.errors import DataError
from ling.data.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer
from ling.dtypes import DTYPES, dtype_named

# `dtype=auto` keeps the dtype the checkpoint holds; the others are `ling.dtypes.DTYPES`.
EVAL_DTYPES: dict[str, torch.dtype | None] = {"auto": None, **DTYPES}
TOKENIZER_HINT = "pass tokenizer= ('byte', a tokenizer folder or a tokenizer.json file)"


class EvalError(ValueError):
    """A model_args value or an input that LingLM cannot evaluate with; the message is one sentence."""


def torch_dtype(dtype: Any) -> torch.dtype | None:
    """The torch dtype for `dtype` ("auto" -> None, which keeps the checkpoint's own dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    try:
        return dtype_named(dtype, "dtype", EVAL_DTYPES, optional=False)
    except ConfigError as err:
        raise EvalError(str(err)) from None


def parse_device(device: Any) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvalError(f"device={device!r} is not a torch device; use e.g. cpu, cuda or cuda:0.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device={device!r} was asked for but CUDA is not available here; use device=cpu.")
    return parsed


@dataclass
class Pretrained:
    """A checkpoint path resolved far enough to know its config and tokenizer, weights not yet read."""

    path: Path
    kind: str  # "hf" or "lightning"
    config: LingConfig
    source: Any = None  # the ling.convert tensor source of a Lightning checkpoint
    tokenizer_spec: dict | None = None  # {"name": ..., "eos_token": ...}


def resolve(pretrained: str | os.PathLike) -> Pretrained:
    """Classify `pretrained` and read its config (HF config.json, or the config a LingModule recorded)."""
    from ling.checkpoint.load import pretrained_config
    from ling.convert import open_checkpoint

    path = Path(pretrained).expanduser()
    if not path.exists():
        raise EvalError(
            f"pretrained={os.fspath(pretrained)!r} does not exist; pass a Hugging Face folder (config.json + "
            "safetensors), a Lightning .ckpt file or a sharded (DCP) checkpoint folder."
        )
    if path.is_dir() and (path / "config.json").is_file():
        return Pretrained(path, "hf", pretrained_config(path))
    if path.is_dir() and not (path / ".metadata").is_file():
        raise EvalError(
            f"pretrained={os.fspath(pretrained)!r} is a folder with neither config.json (a Hugging Face folder) "
            "nor .metadata (a sharded Lightning checkpoint)."
        )
    source = open_checkpoint(path)
    return Pretrained(path, "lightning", source.config, source, source.tokenizer)


def tokenizer_for(resolved: Pretrained, tokenizer: str | os.PathLike | None) -> Tokenizer:
    """The tokenizer named by `tokenizer`, else the HF folder's own, else the one the training run recorded."""
    if tokenizer is not None:
        return load_tokenizer(os.fspath(tokenizer))
    where = repr(os.fspath(resolved.path))
    if resolved.kind == "hf":
        if not any((resolved.path / name).is_file() for name in TOKENIZER_FILES):
            raise EvalError(
                f"pretrained={where} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); {TOKENIZER_HINT}."
            )
        return load_tokenizer(os.fspath(resolved.path))
    spec = resolved.tokenizer_spec
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise EvalError(f"the checkpoint {where} records no tokenizer; {TOKENIZER_HINT}.")
    try:
        return load_tokenizer(spec["name"], eos_token=spec.get("eos_token"))
    except DataError as err:
        raise EvalError(
            f"the tokenizer {spec['name']!r} recorded in the checkpoint {where} cannot be loaded here "
            f"({str(err).rstrip('.')}); {TOKENIZER_HINT}."
        ) from None


def check_vocab(tokenizer: Tokenizer, config: LingConfig) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise EvalError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}; "
            f"use the tokenizer the model was trained with (at most {config.vocab_size} tokens)."
        )


def load(resolved: Pretrained, dtype: torch.dtype | None, device: torch.device) -> torch.nn.Module:
    """The weights of a resolved checkpoint in a model on `device`, in eval mode without gradients."""
    if resolved.kind == "hf":
        from ling.checkpoint import load_pretrained

        model = load_pretrained(resolved.path, dtype=dtype, device=device)
    else:
        model = _load_lightning(resolved, dtype, device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _load_lightning(resolved: Pretrained, dtype: torch.dtype | None, device: torch.device) -> torch.nn.Module:
    """Build the model in `dtype` on `device` without initialising it, then copy the tensors in groups."""
    from ling.checkpoint.export import READ_BYTES, read_groups
    from ling.convert import check_source
    from ling.model.model import build_model

    source = resolved.source
    check_source(source, repr(os.fspath(resolved.path)))
    if dtype is None:  # "auto": the dtype the run saved its weights in
        dtype = source.shapes["lm_head.weight"][1]
    model = build_model(resolved.config, device, dtype, init=False)  # the router's expert_bias stays fp32
    targets = model.state_dict()
    for group in read_groups(source, READ_BYTES):
        for name, tensor in source.read(group).items():
            targets[name].copy_(tensor)
    return model
