"""Run lm-eval tasks on the live model during training: every N optimizer steps, at the end of each
curriculum stage and when training ends.

Every rank runs every request (a sharded or expert-parallel model needs all ranks in each forward);
rank 0's scores are broadcast, so the logged metrics are the same everywhere. Training continues
from exactly the state it left: module train/eval flags, gradients and the python, numpy and torch
(CPU and CUDA) random states are put back, so a run with evaluations trains bit for bit like one
without.

    trainer:
      callbacks:
      - class_path: callbacks.lm_eval.LMEval
        init_args: {tasks: [ling_arithmetic_mc, ling_shakespeare_ppl], every_n_steps: 500, limit: 50}
"""

from __future__ import annotations

import json
from numbers import Real
from pathlib import Path
from typing import Any

import lightning as L
import torch

from callbacks.stages import check_nonfinite, secure_fit_end, stage_changes_with, stage_ends_at
from callbacks.training_state import evaluating_mid_training
from ling.checkpoint.hf import write_atomic
from ling.config import ConfigError
from ling.data.datamodule import ling_data

TASKS_DIR = Path(__file__).resolve().parents[1] / "eval" / "tasks"

# The parts of lm-eval's results that are keyed by task, merged over the runs of one evaluation.
_PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


class LMEval(L.Callback):
    def __init__(
        self,
        tasks: list[str],
        every_n_steps: int | None = None,
        at_stage_end: bool = True,
        at_fit_end: bool = True,
        limit: int | float | dict[str, int | float] | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        include_path: list[str] | None = None,
        output_dir: str | None = None,
        bootstrap_iters: int = 0,
        seed: int = 1234,
    ):
        """
        Args:
            tasks: lm-eval task (or group) names found under `include_path`.
            every_n_steps: evaluate after every this many optimizer steps (None: not periodically).
            at_stage_end: evaluate after the last step of each curriculum stage, on that stage's weights.
            at_fit_end: evaluate when training ends, and print a table of the scores.
            limit: documents per task (a fraction when below 1), or a dict task -> limit (tasks not in
                it run in full); None: every document.
            num_fewshot: few-shot examples (None: each task's own setting).
            batch_size: requests per forward pass.
            max_length: tokens per forward pass: longer contexts are cut from the left, longer texts are
                scored in windows of this length (None: the model's context length).
            include_path: folders of task YAMLs (default: the project's eval/tasks).
            output_dir: where lm-eval's results go as `step=<N>.json` (default: `<log dir>/lm_eval`,
                beside the checkpoints).
            bootstrap_iters: lm-eval's bootstrap resamples for standard errors (0: none, fastest).
            seed: the python, numpy, torch and few-shot seeds lm-eval runs with.
        """
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigError(
                f"LMEval tasks={tasks!r} must be a non-empty list of task names, e.g. [ling_arithmetic_mc]."
            )
        if every_n_steps is not None and not (_is_int(every_n_steps) and every_n_steps >= 1):
            raise ConfigError(f"LMEval every_n_steps={every_n_steps!r} must be a positive number of steps or null.")
        limits = limit if isinstance(limit, dict) else dict.fromkeys(tasks, limit)
        for task, value in limits.items():
            if task not in tasks:
                raise ConfigError(f"LMEval limit names task {task!r}, which is not in tasks ({', '.join(tasks)}).")
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or not value > 0):
                raise ConfigError(f"LMEval limit={value!r} for task {task!r} must be a positive number or null.")
        if num_fewshot is not None and not (_is_int(num_fewshot) and num_fewshot >= 0):
            raise ConfigError(f"LMEval num_fewshot={num_fewshot!r} must be 0 or more, or null.")
        if not (_is_int(batch_size) and batch_size >= 1):
            raise ConfigError(f"LMEval batch_size={batch_size!r} must be a positive integer.")
        if max_length is not None and not (_is_int(max_length) and max_length >= 1):
            raise ConfigError(f"LMEval max_length={max_length!r} must be a positive number of tokens or null.")
        if not (_is_int(bootstrap_iters) and bootstrap_iters >= 0):
            raise ConfigError(f"LMEval bootstrap_iters={bootstrap_iters!r} must be 0 or more.")
        self.tasks = list(tasks)
        self.every_n_steps, self.at_stage_end, self.at_fit_end = every_n_steps, at_stage_end, at_fit_end
        self.limits = {task: limits.get(task) for task in self.tasks}
        self.num_fewshot, self.batch_size, self.max_length = num_fewshot, batch_size, max_length
        self.include_path = [str(p) for p in include_path] if include_path else [str(TASKS_DIR)]
        self.output_dir = Path(output_dir) if output_dir else None
        self.bootstrap_iters, self.seed = bootstrap_iters, seed
        self.scores: dict[int, dict[str, float]] = {}  # step -> metrics of the scheduled evaluations
        self._task_manager = None

    # ---- set-up -----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the task names and resolve the output folder before any training step."""
        for path in self.include_path:
            if not Path(path).is_dir():
                raise ConfigError(f"LMEval include_path {path!r} is not a folder of task YAML files.")
        from lm_eval.tasks import TaskManager

        self._task_manager = TaskManager(include_path=self.include_path, include_defaults=False)
        known = set(self._task_manager.all_tasks)
        for task in self.tasks:
            if task not in known:
                raise ConfigError(
                    f"LMEval task {task!r} is not in {', '.join(self.include_path)}; "
                    f"known tasks: {', '.join(sorted(known)) or 'none'}."
                )
        if ling_data(trainer) is None:
            raise ConfigError("LMEval needs a LingDataModule, whose tokenizer the evaluation uses.")
        if self.output_dir is None:  # trainer.log_dir is a collective call: every rank is here
            self.output_dir = Path(trainer.log_dir or trainer.default_root_dir) / "lm_eval"

    # ---- when -----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at_stage_end and stage_changes_with(trainer, pl_module, batch):
            self._scheduled(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        periodic = self.every_n_steps is not None and step % self.every_n_steps == 0
        if periodic or (self.at_stage_end and stage_ends_at(trainer, step)):
            self._scheduled(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_fit_end:
            return
        secure_fit_end(trainer, pl_module)  # the last checkpoint first: an evaluation that fails cannot lose it
        step = trainer.global_step
        metrics = self.scores.get(step) or self._scheduled(trainer, pl_module)
        if trainer.is_global_zero:
            print(score_table(metrics, step))

    def _scheduled(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        step = trainer.global_step
        if step not in self.scores:  # at most once per step (every N, a stage end and the end can coincide)
            check_nonfinite(pl_module)
            self.scores[step] = self.evaluate(trainer, pl_module)
        return self.scores[step]

    # ---- the entry point ----------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str = "eval") -> dict[str, float]:
        """Run the tasks on `pl_module.model` as it is now and return `{<prefix>/<task>/<metric>: value}`.

        Call it on every rank at the same point (each forward needs all ranks). The metrics go to the
        trainer's loggers and `trainer.callback_metrics` under `prefix`, and lm-eval's results JSON to
        `output_dir/step=<N>.json` (for another prefix: `<prefix>.step=<N>.json`, slashes as '_').
        The model's train/eval flags, gradients and random states are restored afterwards, so another
        callback can swap weights in (e.g. merged checkpoints), call this, and swap them back."""
        with evaluating_mid_training(pl_module.model):
            results = self._run(trainer, pl_module)
        step = trainer.global_step
        metrics = flat_metrics(results, prefix) if trainer.is_global_zero else None
        metrics = trainer.strategy.broadcast(metrics, src=0)
        if trainer.is_global_zero:
            self._write(results, step, prefix)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        return metrics

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """lm-eval's results on rank 0 (None elsewhere): one simple_evaluate per distinct limit, merged."""
        import lm_eval

        from eval.lm import LingLM

        lm = LingLM(
            model=pl_module.model,
            ling_tokenizer=trainer.datamodule.tokenizer,
            batch_size=self.batch_size,
            max_length=self.max_length,
            device=str(pl_module.device),
        )
        groups: dict[Any, list[str]] = {}
        for task in self.tasks:
            groups.setdefault(self.limits[task], []).append(task)
        merged: dict[str, Any] | None = None
        for limit, tasks in groups.items():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=self._task_manager, limit=limit,
                num_fewshot=self.num_fewshot, batch_size=self.batch_size, bootstrap_iters=self.bootstrap_iters,
                log_samples=False, random_seed=self.seed, numpy_random_seed=self.seed,
                torch_random_seed=self.seed, fewshot_random_seed=self.seed,
            )  # fmt: skip
            if out is None:
                continue
            if merged is None:
                merged = {"config": out.get("config", {}), "lm_eval_version": out.get("lm_eval_version")}
            for key in _PER_TASK:
                if key in out:
                    merged.setdefault(key, {}).update(out[key])
        if merged is not None:
            merged["config"]["limit"] = dict(self.limits)
        elif trainer.is_global_zero:
            raise RuntimeError("lm-eval returned no results on rank 0; the LM must report rank 0 there.")
        return merged

    def _write(self, results: dict[str, Any], step: int, prefix: str) -> None:
        name = f"step={step}.json" if prefix == "eval" else f"{prefix.replace('/', '_')}.step={step}.json"
        path = self.output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        from lm_eval.utils import handle_non_serializable

        text = json.dumps({"step": step, **results}, indent=2, default=handle_non_serializable)
        write_atomic(path, lambda tmp: tmp.write_text(text))


# ---- helpers --------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def flat_metrics(results: dict[str, Any], prefix: str) -> dict[str, float]:
    """`{<prefix>/<task>/<metric>: value}` from lm-eval's results: numbers only, no standard errors,
    aliases or sample counts; a metric under a filter other than 'none' is named `<metric>_<filter>`."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, Real):
                continue
            name = metric if filt == "none" else f"{metric}_{filt}"
            out[f"{prefix}/{task}/{name}"] = float(value)
    return out


def score_table(metrics: dict[str, float], step: int) -> str:
    """The scores as a small text table."""
    rows = [(*name.split("/")[-2:], f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4e}")
            for name, value in metrics.items()]  # fmt: skip
    task_w = max([len(r[0]) for r in rows] + [4])
    metric_w = max([len(r[1]) for r in rows] + [6])
    lines = [f"lm-eval at step {step}:", f"  {'task':<{task_w}}  {'metric':<{metric_w}}  value"]
    lines += [f"  {task:<{task_w}}  {metric:<{metric_w}}  {value}" for task, metric, value in rows]
    return "\n".join(lines)
