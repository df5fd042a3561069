"""`python -m ling.merge`: offline WSM merging of saved checkpoints into one model.

WSM replaces the learning-rate decay by a weighted average of checkpoints from the constant-LR
phase: the merge weights c_j emulate a decay shape (mean, cosine, 1-sqrt, ema; see `ling.wsm`), or
are given explicitly as `PATH:WEIGHT`, or follow Ling 2.0's recipe of a uniform average of the
top-N checkpoints by a validation metric. Inputs may be single-file Lightning `.ckpt` files,
sharded (DCP) checkpoint folders and Hugging Face folders, mixed freely. The merge runs one group
of tensors at a time: for each group every checkpoint is read in turn and summed in fp32, then cast
back to the checkpoints' dtype (expert_bias stays fp32), so memory stays at one fp32 group plus one
input group, never whole models. HF folders are read in model names: the per-expert tensors on disk
are stacked into the model's `[E, ...]` weights as they are read, so every kind of input merges in
the same space and the result is written exactly like any other export.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ling.checkpoint.export import READ_BYTES, TensorSource, export_hf, read_groups
from ling.checkpoint.fp8 import FP8_DTYPE
from ling.checkpoint.hf import CheckpointError, write_atomic
from ling.checkpoint.load import HFReader, expected_keys, pretrained_config
from ling.config import ConfigError, LingConfig
from ling.convert import MODULE_PREFIX, CommandParser, check_source, export_tokenizer, open_checkpoint
from ling.data.errors import DataError
from ling.data.tokenizer import TOKENIZER_FILES
from ling.dtypes import DTYPES, FLOAT8_DTYPES, dtype_named
from ling.model.model import build_model

_STEP = re.compile(r"step[=_-]?(\d+)")
_GLOB = re.compile(r"[*?\[]")
# Config fields that may differ between checkpoints of one model: the storage dtype and the token ids
# an export takes from its tokenizer (the newest checkpoint's are written).
_FREE_FIELDS = {"torch_dtype", "pad_token_id", "eos_token_id", "extra"}


# ---- sources ---------------------------------------------------------------------------------
class HFSource(TensorSource):
    """A Hugging Face Ling folder read under model names; stacked expert weights are assembled from
    their per-expert tensors (blockwise fp8 is dequantised) one model tensor at a time."""

    def __init__(self, folder: Path):
        self.config = pretrained_config(folder)
        model = build_model(self.config, device="meta")
        self.reader = HFReader(folder, self.config)
        fallback = DTYPES.get(self.config.torch_dtype, torch.bfloat16)  # what fp8 weights dequantise to
        self.parts: dict[str, list[str]] = {}
        self.shapes = {}
        for key, (name, _, shape) in expected_keys(model).items():
            if key not in self.reader.keys:
                raise CheckpointError(f"{os.fspath(folder)!r} has no tensor {key!r}, which its config.json needs.")
            if self.reader.shapes[key] != shape:
                raise CheckpointError(
                    f"{key!r} in {os.fspath(folder)!r} has shape {self.reader.shapes[key]} but its config.json "
                    f"expects {shape}."
                )
            self.parts.setdefault(name, []).append(key)
        state = model.state_dict()
        for name, keys in self.parts.items():
            stored = self.reader.dtypes[keys[0]]
            dtype = fallback if stored is None or stored == FP8_DTYPE else stored
            self.shapes[name] = (state[name].shape, torch.float32 if name.endswith("expert_bias") else dtype)
        has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)
        self.tokenizer = {"name": os.fspath(folder)} if has_tokenizer else None

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        try:
            for name in names:
                shape, stored = self.shapes[name]
                keys = self.parts[name]
                pieces = [self.reader.read(k, (0,) * len(self.reader.shapes[k]), self.reader.shapes[k]) for k in keys]
                tensor = torch.stack(pieces) if len(keys) > 1 or len(shape) != len(pieces[0].shape) else pieces[0]
                out[name] = tensor.to(stored).reshape(shape)
        finally:
            self.reader.close()
        return out


def open_any(path: str | os.PathLike) -> TensorSource:
    """A `.ckpt` file, a DCP folder or a HF folder as a `TensorSource` in model names."""
    path = Path(path)
    if path.is_dir() and not (path / ".metadata").exists() and (path / "config.json").is_file():
        return HFSource(path)
    return open_checkpoint(path)


class MergedSource(TensorSource):
    """The weighted sum of several sources of one model, computed group by group in fp32 as it is read.

    The arithmetic is `ling.wsm.MergeAccumulator`'s (fp32 `add_` with the weight as alpha, divided by
    the weights' sum unless it is exactly 1), so the offline merge equals the in-training one. Each
    tensor comes out in the widest dtype the sources store it in (expert_bias in fp32)."""

    read_bytes = READ_BYTES // 4  # an fp32 accumulator per input byte of bf16 would double this

    def __init__(self, sources: Sequence[TensorSource], weights: Sequence[float], config: LingConfig):
        self.sources, self.weights, self.config = list(sources), [float(w) for w in weights], config
        self.total = 0.0
        for weight in self.weights:
            self.total += weight
        self.shapes = {}
        for name, (shape, dtype) in sources[-1].shapes.items():
            for source in sources[:-1]:
                dtype = torch.promote_types(dtype, source.shapes[name][1])
            self.shapes[name] = (shape, torch.float32 if name.endswith("expert_bias") else dtype)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for source, weight in zip(self.sources, self.weights, strict=True):
            if weight == 0.0:
                continue  # a checkpoint outside the emulated decay costs no read
            tensors = source.read(names)
            for name in names:
                tensor = tensors.pop(name)
                if not tensor.is_floating_point():
                    sums[name] = tensor.clone()  # integer state is not averaged; the newest one is kept
                elif name in sums:
                    sums[name].add_(tensor.to(torch.float32), alpha=weight)
                else:
                    sums[name] = torch.zeros(tensor.shape, dtype=torch.float32).add_(tensor, alpha=weight)
        out = {}
        for name in names:
            value = sums.pop(name)
            if value.is_floating_point() and self.total != 1.0:
                value = value / self.total
            out[name] = value.to(self.shapes[name][1])
        return out


class _DictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor], config: LingConfig):
        self.tensors, self.config = tensors, config
        self.shapes = {name: (t.shape, t.dtype) for name, t in tensors.items()}

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name] for name in names}


# ---- selecting checkpoints ---------------------------------------------------------------------
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step in a checkpoint's name (`epoch=0-step=1200.ckpt`, `step-1200`), if any."""
    found = _STEP.findall(Path(path).name)
    return int(found[-1]) if found else None


def _step_of(path: Path, why: str) -> int:
    step = checkpoint_step(path)
    if step is None:
        raise CheckpointError(f"{os.fspath(path)!r} has no step in its name (like 'step=1200'), so {why}.")
    return step


def parse_checkpoints(items: Sequence[str]) -> tuple[list[Path], list[float] | None]:
    """Paths (globs expanded and ordered by step) and the weights of `PATH:WEIGHT` items, if given."""
    paths: list[Path] = []
    weights: list[float] = []
    for item in items:
        head, sep, tail = item.rpartition(":")
        weight = _float(tail) if sep and head else None
        if weight is not None:
            if _GLOB.search(head):
                raise ConfigError(f"{item!r} gives a weight to a glob; give each checkpoint its own PATH:WEIGHT.")
            paths.append(Path(head))
            weights.append(weight)
        elif _GLOB.search(item):
            matches = [Path(p) for p in glob.glob(item)]
            if not matches:
                raise CheckpointError(f"--checkpoints pattern {item!r} matches no checkpoint.")
            paths.extend(sorted(matches, key=lambda p: (_step_of(p, "the glob's matches cannot be ordered"), p.name)))
        else:
            paths.append(Path(item))
    if weights and len(weights) != len(paths):
        raise ConfigError(
            f"{len(weights)} of the {len(paths)} checkpoints have a :WEIGHT; give every checkpoint a weight or none."
        )
    return paths, (weights or None)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def select_steps(paths: Sequence[Path], steps: str) -> list[Path]:
    """The checkpoints whose step lies in `FROM:TO` (both inclusive, either may be left out)."""
    first, sep, last = steps.partition(":")
    try:
        low = int(first) if first.strip() else -math.inf
        high = int(last) if last.strip() else math.inf
    except ValueError:
        low = high = None
    if not sep or low is None or low > high:
        raise ConfigError(f"--steps {steps!r} is not a step range; use FROM:TO, e.g. 1000:5000, 1000: or :5000.")
    chosen = [p for p in paths if low <= _step_of(p, "--steps cannot select it") <= high]
    if not chosen:
        found = sorted(_step_of(p, "") for p in paths)
        raise CheckpointError(
            f"--steps {steps} selects none of the {len(paths)} checkpoints (their steps run {found[0]}..{found[-1]})."
            if found
            else f"--steps {steps} has no checkpoints to select from."
        )
    return chosen


def read_metric(log: str | os.PathLike, metric: str) -> dict[int, float]:
    """step -> value of `metric` in a Lightning CSVLogger metrics.csv (the last value logged per step)."""
    path = Path(log)
    if not path.is_file():
        raise CheckpointError(f"metrics log {os.fspath(path)!r} does not exist; pass the run's metrics.csv.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(handle)
        columns = rows.fieldnames or []
        if "step" not in columns:
            raise CheckpointError(f"{os.fspath(path)!r} has no 'step' column; it is not a CSVLogger metrics.csv.")
        if metric not in columns:
            shown = ", ".join(c for c in columns if c not in ("step", "epoch")) or "none"
            raise ConfigError(f"metric {metric!r} is not in {os.fspath(path)!r}; its metrics are: {shown}.")
        values = {int(float(row["step"])): float(row[metric]) for row in rows if row.get(metric) not in (None, "")}
    if not values:
        raise ConfigError(f"metric {metric!r} has no logged value in {os.fspath(path)!r}.")
    return values


def select_top(paths: Sequence[Path], top: int, metric: str, log: str | os.PathLike, mode: str = "min") -> list[Path]:
    """Ling 2.0's merge set: the `top` checkpoints with the best `metric`, ordered by step.

    Lightning validates the weights of `step=S` before its loggers' step counter moves on, so their
    metrics sit at CSV step S-1; a value logged at S itself is used when there is none at S-1."""
    if mode not in ("min", "max"):
        raise ConfigError(f"mode={mode!r} is not a direction; use 'min' (losses) or 'max' (accuracies).")
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"--top {top!r} is not a checkpoint count; use a whole number >= 1.")
    if top > len(paths):
        raise ConfigError(f"--top {top} asks for more checkpoints than the {len(paths)} given.")
    values = read_metric(log, metric)
    scored = []
    for path in paths:
        step = _step_of(path, f"its {metric} cannot be looked up")
        value = values.get(step - 1, values.get(step))
        if value is None:
            raise ConfigError(f"{os.fspath(log)!r} has no {metric} for {os.fspath(path)!r} (step {step}).")
        scored.append((value if mode == "min" else -value, step, path))
    best = sorted(scored, key=lambda s: (s[0], -s[1]))[:top]  # ties: the later checkpoint
    return [path for _, _, path in sorted(best, key=lambda s: s[1])]


# ---- merging -----------------------------------------------------------------------------------
@dataclass
class MergeResult:
    """What a merge used and wrote; `state` holds the merged model tensors when they were kept in memory
    (a `ckpt` output, or no output at all)."""

    paths: list[Path]
    weights: list[float]
    config: LingConfig
    out: Path | None = None
    ckpt: Path | None = None
    state: dict[str, torch.Tensor] | None = None


def _config_difference(a: LingConfig, b: LingConfig) -> str | None:
    for f in dataclasses.fields(a):
        if f.name not in _FREE_FIELDS and getattr(a, f.name) != getattr(b, f.name):
            return f.name
    return None


def _check_same_model(sources: Sequence[TensorSource], paths: Sequence[Path]) -> None:
    first, where = sources[0], os.fspath(paths[0])
    for source, path in zip(sources[1:], paths[1:], strict=True):
        field = _config_difference(first.config, source.config)
        if field is not None:
            raise CheckpointError(
                f"{os.fspath(path)!r} has {field}={getattr(source.config, field)!r} but {where!r} has "
                f"{field}={getattr(first.config, field)!r}; only checkpoints of one model can be merged."
            )
        for name, (shape, _) in first.shapes.items():
            if name not in source.shapes or source.shapes[name][0] != shape:
                got = tuple(source.shapes[name][0]) if name in source.shapes else "no tensor"
                raise CheckpointError(
                    f"{os.fspath(path)!r} holds {name!r} as {got} but {where!r} as {tuple(shape)}; "
                    "only checkpoints of one model can be merged."
                )


def merge_checkpoints(
    paths: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    shape: str | None = "mean",
    alpha: float | None = None,
    out: str | os.PathLike | None = None,
    ckpt: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer: str | None = None,
) -> MergeResult:
    """Merge checkpoints (oldest first) into a HF folder `out` and/or a weights-only `ckpt` file.

    The weights are `weights` (one per checkpoint, >= 0, summing to 1) or those of the decay `shape`
    (`ling.wsm.merge_weights`, `alpha` for ema). `dtype` is the HF folder's dtype (float32, bfloat16,
    float16 or float8_e4m3fn; default: the checkpoints' own); the `ckpt` keeps the checkpoints' dtypes.
    With neither output the merged tensors are returned in `MergeResult.state`. The tokenizer written
    is `tokenizer` or the one recorded by the newest checkpoint that records one.
    """
    from ling import wsm

    paths = [Path(p) for p in paths]
    if not paths:
        raise CheckpointError("there are no checkpoints to merge; pass at least one.")
    if weights is not None:
        if shape not in (None, "mean"):
            raise ConfigError(f"shape={shape!r} and explicit weights were both given; pass one of them.")
        weights = wsm.merge_weights(None, len(paths), alpha=alpha, weights=weights)
    else:
        weights = wsm.merge_weights(shape or "mean", len(paths), alpha=alpha)
    torch_dtype = dtype_named(dtype, "dtype", FLOAT8_DTYPES)
    for path in paths:
        if not path.exists():
            raise CheckpointError(f"checkpoint path {os.fspath(path)!r} does not exist.")
    for target, what in ((out, "out"), (ckpt, "ckpt")):
        if target is not None and any(Path(target).resolve() == p.resolve() for p in paths):
            raise CheckpointError(f"{what}={os.fspath(target)!r} is one of the checkpoints; choose another path.")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CheckpointError(f"out={os.fspath(out)!r} exists and is not a folder.")
    if ckpt is not None and Path(ckpt).is_dir():
        raise CheckpointError(f"ckpt={os.fspath(ckpt)!r} is a folder; give a file name such as merged.ckpt.")

    sources = [open_any(path) for path in paths]
    for source, path in zip(sources, paths, strict=True):
        check_source(source, repr(os.fspath(path)))
    _check_same_model(sources, paths)
    config = sources[-1].config
    merged = MergedSource(sources, weights, config)
    result = MergeResult(paths, weights, config)

    if ckpt is not None or out is None:
        state = {}
        for group in read_groups(merged, merged.read_bytes):
            state.update(merged.read(group))
        result.state = state
        merged = _DictSource(state, config)
    if ckpt is not None:
        result.ckpt = _write_ckpt(Path(ckpt), result, sources)
    if out is not None:
        loaded = export_tokenizer(tokenizer, _recorded_tokenizer(sources))
        result.out = export_hf(merged, Path(out), torch_dtype, max_shard_size, tokenizer=loaded)
    return result


def _recorded_tokenizer(sources: Sequence[TensorSource]) -> dict | None:
    return next((s.tokenizer for s in reversed(sources) if s.tokenizer), None)


def write_weights_checkpoint(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: LingConfig,
    tokens_seen: int = 0,
    source_tokens: Sequence[int] = (),
    tokenizer: dict | None = None,
    **extra: Any,
) -> Path:
    """A weights-only LingModule checkpoint (written atomically): `ling.convert` and `open_checkpoint`
    read it, and `LingModule.load_state_dict` + `on_load_checkpoint` take it; it has no optimizer or
    loop state, so a trainer cannot resume from it. `extra` entries are stored beside (e.g. `merge`)."""
    ling: dict[str, Any] = {
        "config": config.to_hf(),
        "tokens_seen": int(tokens_seen),
        "source_tokens": list(source_tokens),
    }
    if tokenizer is not None:
        ling["tokenizer"] = dict(tokenizer)
    checkpoint = {"state_dict": {MODULE_PREFIX + name: t for name, t in state.items()}, "ling": ling, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))
    return path


def _write_ckpt(path: Path, result: MergeResult, sources: Sequence[TensorSource]) -> Path:
    newest = sources[-1].ling_entry or {}
    merge = {"checkpoints": [os.fspath(p) for p in result.paths], "weights": list(result.weights)}
    return write_weights_checkpoint(
        path, result.state, result.config, tokens_seen=newest.get("tokens_seen", 0),
        source_tokens=newest.get("source_tokens", []), tokenizer=_recorded_tokenizer(sources), merge=merge,
    )  # fmt: skip


# ---- command line ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m ling.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="checkpoints oldest first: .ckpt files, DCP or HF folders, PATH:WEIGHT items, or a "
                             "quoted glob such as 'ckpts/epoch=*-step=*.ckpt' (ordered by step)")  # fmt: skip
    parser.add_argument("--shape", help="decay shape the weights emulate: mean, cosine, 1-sqrt, ema (default mean)")
    parser.add_argument("--alpha", type=float, help="the ema rate (with --shape ema)")
    parser.add_argument("--steps", help="keep the checkpoints whose step lies in FROM:TO (inclusive)")
    parser.add_argument("--top", type=int, help="average the N checkpoints with the best --metric uniformly")
    parser.add_argument("--metric", help="the metric --top ranks by, e.g. val/loss")
    parser.add_argument("--log", help="the run's metrics.csv (Lightning CSVLogger) holding --metric")
    parser.add_argument("--mode", default="min", choices=["min", "max"], help="better --metric: min (default) or max")
    parser.add_argument("--out", help="the Hugging Face folder to write")
    parser.add_argument("--ckpt", help="a weights-only LingModule .ckpt file to write")
    parser.add_argument("--dtype", help=f"HF weight dtype: {', '.join(FLOAT8_DTYPES)} (default: the checkpoints')")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--tokenizer", help="tokenizer to write beside the weights (default: the run's own)")
    args = parser.parse_args(argv)
    try:
        if args.out is None and args.ckpt is None:
            raise ConfigError("nothing to write; pass --out FOLDER and/or --ckpt FILE.")
        paths, weights = parse_checkpoints(args.checkpoints)
        if args.steps is not None:
            if weights is not None:
                raise ConfigError("--steps cannot pick from PATH:WEIGHT checkpoints; drop the weights or --steps.")
            paths = select_steps(paths, args.steps)
        if args.top is not None:
            if weights is not None or args.shape not in (None, "mean"):
                raise ConfigError("--top averages the chosen checkpoints uniformly; drop --shape and the :WEIGHTs.")
            if args.metric is None or args.log is None:
                raise ConfigError("--top needs --metric (e.g. val/loss) and --log (the run's metrics.csv).")
            paths = select_top(paths, args.top, args.metric, args.log, args.mode)
        elif args.metric is not None or args.log is not None:
            raise ConfigError("--metric and --log only rank checkpoints for --top N; add --top or drop them.")
        result = merge_checkpoints(paths, weights, args.shape, args.alpha, args.out, args.ckpt, args.dtype,
                                   args.max_shard_size, args.tokenizer)  # fmt: skip
    except (CheckpointError, ConfigError, DataError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    shown = ", ".join(f"{p.name}:{w:.4g}" for p, w in zip(result.paths, result.weights, strict=True))
    print(f"merged {len(result.paths)} checkpoints ({shown})")
    for written in (result.out, result.ckpt):
        if written is not None:
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
