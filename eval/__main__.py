"""`python -m eval ...`: lm-eval's own command line, with the Ling models registered and the offline tasks found.

Every subcommand and flag is lm-eval's (`run`, `ls`, `validate`; `python -m eval --model ling ...` means
`run`, as with `lm_eval`). The additions:

- `eval/tasks/` is always on the task include path, ahead of any `--include_path` (whose tasks may
  override it), so `--tasks ling_arithmetic_mc` needs no extra flag.
- Bad input is one sentence on stderr (exit status 2), found before any model loads: an unknown task
  name, a missing `--include_path`, `--config` or task file, an unknown `--model`, and for the Ling
  models a missing or absent `pretrained=` path. LingLM's and ling's own user errors print the same way.
- For the Ling models, no `--device` (lm-eval's default is cuda:0) means cuda:0 where CUDA is available
  and the CPU elsewhere, as lm-eval's own hf model does.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import sys
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LING_MODELS = ("ling", "bailing_moe_v2")
PRETRAINED_HINT = "a Hugging Face folder (config.json + safetensors), a Lightning .ckpt file or a sharded (DCP) folder"


class UsageError(ValueError):
    """A command-line value that cannot work; the message is one sentence."""


def include_paths(user: str | os.PathLike | list | tuple | None) -> list[str]:
    """The project's task folder, then the user's include paths (checked to exist), without repeats."""
    given = [] if user is None else list(user) if isinstance(user, (list, tuple)) else [user]
    paths = [str(TASKS_DIR)]
    for path in given:
        folder = Path(path).expanduser()
        if not folder.exists():
            raise UsageError(f"--include_path {os.fspath(path)!r} does not exist; pass a folder of task YAML files.")
        if folder.resolve() not in {Path(p).resolve() for p in paths}:
            paths.append(str(folder))
    return paths


def _effective(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `run` will use: the --config YAML, overridden by the flags given (lm-eval's precedence)."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    settings: dict[str, Any] = {}
    if args.config:
        if not Path(args.config).is_file():
            raise UsageError(f"--config {args.config!r} does not exist; pass a YAML file of run settings.")
        settings.update(EvaluatorConfig.load_yaml_config(args.config))
    settings.update({k: v for k, v in vars(args).items() if (v or v == 0) and k not in ("command", "func")})
    return settings


def _task_names(tasks: str | list | None) -> list[str]:
    if not tasks:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else [t for task in tasks for t in str(task).split(",")]
    return [t.strip() for t in items if t.strip()]


def check_tasks(names: list[str], paths: list[str]) -> None:
    """Every task name must be a task, group or tag that lm-eval finds with these include paths.

    The project's folder and the user's paths are indexed first (quick); lm-eval's few thousand built-in
    YAMLs only when a name is not among them.
    """
    from lm_eval.tasks import TaskManager

    if len(names) == 1 and Path(names[0]).is_dir():
        return  # lm-eval reads a folder of YAMLs given as the task
    unknown = []
    for name in names:
        if name.endswith(".yaml"):
            if not glob.glob(str(Path(name).expanduser())):
                raise UsageError(f"task file {name!r} does not exist; pass a task YAML path or a task name.")
        else:
            unknown.append(name)
    if not unknown:
        return
    local = TaskManager(include_path=paths, include_defaults=False)
    unknown = [name for name in unknown if not local.match_tasks([name])]
    if not unknown:
        return
    full = TaskManager(include_path=paths)
    unknown = [name for name in unknown if not full.match_tasks([name])]
    if unknown:
        hints = sorted({m for name in unknown for m in difflib.get_close_matches(name, full.all_tasks, n=3)})
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise UsageError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}; "
            "`python -m eval ls tasks` lists the tasks, groups and tags."
        )


def check_model(model: str, model_args: dict | str | None) -> dict:
    """The model name is registered, and a Ling model's `pretrained=` path exists (read nothing yet).

    Returns the model_args as a dict."""
    from lm_eval.api.registry import model_registry
    from lm_eval.utils import simple_parse_args_string

    if model not in model_registry:
        hints = difflib.get_close_matches(model, list(model_registry.keys()), n=3)
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise UsageError(
            f"--model {model!r} is not a registered lm-eval model{hint}; use ling for Ling checkpoints "
            f"or one of {', '.join(sorted(model_registry.keys()))}."
        )
    model_args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    if model not in LING_MODELS:
        return model_args
    pretrained = model_args.get("pretrained")
    if pretrained is None:
        raise UsageError(f"--model {model} needs --model_args pretrained=PATH, where PATH is {PRETRAINED_HINT}.")
    if not Path(str(pretrained)).expanduser().exists():
        raise UsageError(f"pretrained={str(pretrained)!r} does not exist; pass {PRETRAINED_HINT}.")
    return model_args


def prepare(args: argparse.Namespace) -> None:
    """Add the task folder to the include path and check the run's input, before lm-eval takes over."""
    if args.command not in ("run", "ls", "validate"):
        return
    if args.command != "run":
        args.include_path = include_paths(args.include_path)
        return
    settings = _effective(args)
    args.include_path = include_paths(settings.get("include_path"))
    model = settings.get("model") or "hf"
    model_args = check_model(model, settings.get("model_args"))
    if model in LING_MODELS and not settings.get("device") and "device" not in model_args:
        args.device = default_device()
    check_tasks(_task_names(settings.get("tasks")), args.include_path)


def default_device() -> str:
    """lm-eval's default device is cuda:0; like its hf model, fall back to the CPU where there is no CUDA."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    # lm-eval's own entry point (`lm_eval.__main__.cli_evaluate`) is setup_logging + HarnessCLI's
    # parse_args + execute; the same three calls here, with the parsed arguments checked in between.
    # lm-eval exports HarnessCLI only from its `_cli` package: it has no public way to check them first.
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import eval  # noqa: F401  (registers LingLM as `ling` and `bailing_moe_v2`)
    from eval.lm import EvalError
    from ling.checkpoint import CheckpointError
    from ling.config import ConfigError
    from ling.data.errors import DataError

    saved = sys.argv
    if argv is not None:
        sys.argv = ["python -m eval", *argv]  # HarnessCLI reads sys.argv (it inserts `run` when left out)
    try:
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        prepare(args)
        parser.execute(args)
    except (UsageError, EvalError, ConfigError, CheckpointError, DataError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
