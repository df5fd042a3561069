"""Train a Ling 2.0 model: `python train.py fit --config configs/tiny.yaml`.

Subcommands fit / validate / test; `--print_config` shows the whole resolved run. YAML files are
read with omegaconf, so values can interpolate (`${data.seq_len}`).

A setting that cannot work stops the run before its first step with one line on stderr,
`error: ...`, naming the setting, its value and what would be valid, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path

# torchao skips its C++ extensions (no load failures from a build for another torch); only mxfp8 on B200 uses them.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from ling.checkpoint import CheckpointError  # noqa: E402
from ling.checkpoint.atomic import is_local_path  # noqa: E402
from ling.config import ConfigError  # noqa: E402
from ling.data.datamodule import LingDataModule  # noqa: E402
from ling.data.errors import DataError  # noqa: E402
from ling.lightning_module import LingModule  # noqa: E402
from ling.nonfinite import NonFiniteError  # noqa: E402
from ling.schedules import check_schedule  # noqa: E402

# Lightning's own misconfiguration messages are sentences for users too (for example
# accumulate_grad_batches: the micro-batches per step come from data.global_batch_size).
# The step is written out in LingModule (manual optimization); checkpoints hold the state after the
# step, which is what resuming needs, so Lightning's advice to keep pre-step copies does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

USER_ERRORS = (ConfigError, CheckpointError, DataError, MisconfigurationException, NonFiniteError)
# `ckpt_path` values that Lightning resolves itself rather than reading as a path.
_CKPT_NAMES = ("last", "best", "hpc")


class LingCLI(LightningCLI):
    """LightningCLI whose parse errors are raised (for `cli` to write as one line, without the usage),
    and which checks the run length and the checkpoint to resume before anything is built."""

    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if subcommand in (None, "fit"):
            max_steps = config.trainer.max_steps
            if max_steps == 0 or max_steps < -1:
                raise ConfigError(
                    f"trainer.max_steps={max_steps} trains no step; give a positive number of steps, "
                    "or -1 for no limit."
                )
        check_ckpt_path(config.get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        """Keep this run's settings when resuming (LightningCLI would replace the model's with the
        checkpoint's without a word): LingModule compares them with the checkpoint's, refuses those that
        cannot change and logs each one that does."""
        # A private method overridden: LightningCLI 2.6 calls it unconditionally and has no public switch.

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand == "fit":
            check_schedule(self.model.schedule_config, self.trainer.max_steps)


def check_ckpt_path(path: str | os.PathLike | None) -> None:
    """A local `--ckpt_path` must be a complete checkpoint: a file written by torch.save, or a sharded
    (DCP) folder with its `.metadata`. Lightning's own names (last, best, ...) and remote paths pass."""
    if path is None or str(path) in _CKPT_NAMES or str(path).startswith("registry") or not is_local_path(path):
        return
    target = Path(path)
    if not target.exists():
        if any(target.parent.glob(f".{target.name}.old-*")):
            return  # moved aside by an interrupted save; the strategy puts it back when it loads
        raise CheckpointError(
            f"--ckpt_path {os.fspath(path)!r} does not exist; give a checkpoint file (*.ckpt) or folder, or 'last'."
        )
    if target.is_dir():
        if not any(target.iterdir()):
            raise CheckpointError(f"--ckpt_path {os.fspath(path)!r} is an empty folder, not a checkpoint.")
        metadata = target / ".metadata"
        if not metadata.is_file() or metadata.stat().st_size == 0:
            raise CheckpointError(
                f"--ckpt_path {os.fspath(path)!r} is a folder without a .metadata file, so not a complete "
                "sharded checkpoint; give a finished checkpoint."
            )
        return
    if target.stat().st_size == 0:
        raise CheckpointError(f"--ckpt_path {os.fspath(path)!r} is empty (0 bytes), not a checkpoint.")
    if not zipfile.is_zipfile(target):
        raise CheckpointError(
            f"--ckpt_path {os.fspath(path)!r} is not a checkpoint: not a complete torch.save archive "
            "(a truncated file, or another kind of file)."
        )
    try:  # as LightningCLI reads it for the model settings; tensors are memory-mapped, so little is read
        torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"--ckpt_path {os.fspath(path)!r} is not a weights-only checkpoint: it holds Python objects that "
            "LightningCLI's weights_only load refuses."
        ) from None
    except Exception as err:  # any other failure to load, by the first line of its message
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"--ckpt_path {os.fspath(path)!r} cannot be loaded ({type(err).__name__}: {first})."
        ) from None


def main(args: list[str] | None = None) -> LightningCLI:
    return LingCLI(
        LingModule,
        LingDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def cli(args: list[str] | None = None) -> int:
    """Run `main`; a bad setting is written as one `error:` line on stderr and gives exit code 2."""
    try:
        main(args)
    except Exception as err:
        sentence = error_sentence(err, sys.argv[1:] if args is None else args)
        if sentence is None:
            raise
        print(f"error: {sentence}", file=sys.stderr)
        return 2
    return 0


# ---- parse errors as one sentence ---------------------------------------------------------------
def _chain(err: BaseException) -> list[BaseException]:
    """The exception and the ones it was raised from, outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return chain


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _plain_types(text: str) -> str:
    """jsonargparse's "Expected a <class 'int'>" as "Expected an int", and a Literal as its choices."""
    text = re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", text)
    text = re.sub(r"Expected a typing\.Literal\[(.*?)\]", r"Expected one of \1", text)
    return re.sub(r"Expected a (?=[aeiou])", "Expected an ", text)


def error_sentence(err: BaseException, args: list[str]) -> str | None:
    """The one-line message for a bad setting, or None for an error that is not one (a bug keeps its traceback).

    A user error (ConfigError, DataError, ...) may arrive wrapped by jsonargparse, which instantiates the
    settings dataclasses; its own message is used. A parse error names the setting from jsonargparse's
    nested "Parser key" messages and gives the innermost reason."""
    chain = _chain(err)
    for link in chain:
        if isinstance(link, USER_ERRORS):
            return _one_line(str(link))
    if not isinstance(err, argparse.ArgumentError):
        return None
    yaml_error = next((link for link in chain if isinstance(link, yaml.YAMLError)), None)
    if yaml_error is not None:
        return _yaml_sentence(args) or _one_line(str(yaml_error))
    keys: list[str] = []
    settings_class = None
    for link in chain:
        text = str(link)
        key = re.match(r'Parser key "([^"]+)":', text)
        if key and (not keys or keys[-1] != key[1]):
            keys.append(key[1])
        given = re.match(r"Problem with given class_path '([\w.]+)':", text)
        if given:
            settings_class = given[1]
    reason = _plain_types(_one_line(str(chain[-1])))
    reason = re.sub(r"^Parser key \"[^\"]+\": ", "", reason)
    option = re.match(r"Option '([^']+)' is not accepted", reason)
    if option and settings_class:
        reason = _unknown_option(option[1], settings_class)
    elif reason.startswith("unrecognized arguments"):
        subcommand = next((a for a in args if not a.startswith("-")), "fit")
        reason += f"; `train.py {subcommand} --help` lists the settings."
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def _unknown_option(option: str, class_path: str) -> str:
    """A misspelt key of a settings dataclass, with the close names and the valid ones."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not dataclasses.is_dataclass(cls):
        return f"option {option!r} is not accepted by {class_path}."
    fields = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(option, fields, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{name} has no setting {option!r}; {hint}valid ones are {', '.join(fields)}."


def _yaml_sentence(args: list[str]) -> str | None:
    """Which --config file is not valid YAML, and where."""
    paths = [value for flag, value in zip(args, args[1:]) if flag in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                yaml.safe_load(fh)
        except (OSError, UnicodeDecodeError):
            continue
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
            opened = f" ({context} from line {context_mark.line + 1})" if context and context_mark else ""
            return _one_line(f"--config {path} is not valid YAML{where}: {problem}{opened}.")
    return None


if __name__ == "__main__":
    sys.exit(cli())
