"""WSM checkpoint merging during training: average the stable phase's weights to get the effect of an
LR decay without decaying (Ling 2.0's warmup-stable-merge schedule).

After the schedule's warmup, a snapshot of the weights is taken every `interval` optimizer steps and
added at once, with its weight, to one fp32 accumulator (the weights follow from `shape` and `count`
before the first snapshot, so a pending merge costs one fp32 copy of the model, not `count`). Under
FSDP2 / expert parallelism each rank accumulates its own shards only. Every parameter and float
buffer is merged, the expert biases included.

A merge completes when `count` snapshots are in, and also at the end of each curriculum stage and
when training ends; a merge of fewer snapshots renormalises the weights of those taken to sum to 1.
Then the window restarts from that step. The merged model is evaluated in place (validation loss
on the data module's validation batches, raw and merged side by side, plus lm-eval when an `LMEval`
callback is in the trainer), written as a Hugging Face folder `<log dir>/wsm/step=<N>-hf/` and
optionally as a single-file checkpoint `<log dir>/wsm/step=<N>.ckpt` that `python -m ling.convert`
reads, and then the raw weights are put back bit for bit: training, the optimizer state included,
continues exactly as without this callback. A merge whose weights are not finite is neither evaluated
nor written (one warning says so), and before merging the module may stop the run on non-finite
steps (`LingModule.check_nonfinite`). At fit end the run's last checkpoint is written before the merge.

    trainer:
      callbacks:
      - class_path: callbacks.wsm.WSM
        init_args: {interval: 500, count: 8, shape: 1-sqrt}

Resuming: the window and the accumulator are part of the trainer's checkpoints, so a resumed run
merges what the uninterrupted one would. A sharded trainer checkpoint keeps callback state in rank
0's `meta.pt` only, so there each rank writes its accumulator shards beside the merged outputs, as
`<log dir>/wsm/state/step=<N>.rank=<R>.pt`, and reads its own back on resume: resume with the same
parallel layout and keep those files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.lm_eval import LMEval, score_table
from callbacks.stages import check_nonfinite, secure_fit_end, stage_changes_with, stage_ends_at
from callbacks.training_state import evaluating_mid_training
from ling.checkpoint import save_pretrained
from ling.config import ConfigError
from ling.data.datamodule import ling_data
from ling.dtypes import FLOAT8_DTYPES, dtype_named
from ling.merge import write_weights_checkpoint
from ling.model import IGNORE_INDEX
from ling.model.dtensor import is_sharded, local
from ling.nonfinite import weights_finite
from ling.wsm import MergeAccumulator, merge_weights


class WSM(L.Callback):
    def __init__(
        self,
        interval: int,
        count: int,
        shape: str | None = None,
        alpha: float | None = None,
        weights: list[float] | None = None,
        start_step: int | None = None,
        at_stage_end: bool = True,
        at_fit_end: bool = True,
        evaluate: bool = True,
        val_batches: int | None = None,
        save_hf: bool = True,
        save_checkpoint: bool = False,
        dtype: str | None = None,
        dirpath: str | None = None,
    ):
        """
        Args:
            interval: optimizer steps between snapshots.
            count: snapshots per merge.
            shape: the LR decay the merge stands in for: one of `ling.wsm.SHAPES` (mean, cosine,
                1-sqrt, ema); default 1-sqrt unless `weights` is given (giving both is an error).
            alpha: the EMA rate for shape `ema`.
            weights: explicit merge weights, one per snapshot, oldest first.
            start_step: the first window starts at this optimizer step (default: the end of the LR
                schedule's warmup).
            at_stage_end: also complete a merge after the last step of each curriculum stage.
            at_fit_end: also complete a merge when training ends.
            evaluate: compute the validation loss of the raw and the merged weights (and run lm-eval
                when an LMEval callback is in the trainer) at each merge.
            val_batches: validation batches per rank to use (default: all of the data module's).
            save_hf: write each merged model as a Hugging Face folder.
            save_checkpoint: also write it as a single-file LingModule checkpoint (one process only:
                a sharded model would have to be gathered on one host, so it is skipped there).
            dtype: the Hugging Face export dtype (float32, bfloat16, float16 or float8_e4m3fn; default:
                the weights' own).
            dirpath: output folder (default: `<log dir>/wsm`).
        """
        if not _is_int(interval) or interval < 1:
            raise ConfigError(f"WSM interval={interval!r} must be a positive number of optimizer steps.")
        if not _is_int(count) or count < 1:
            raise ConfigError(f"WSM count={count!r} must be a positive number of snapshots per merge.")
        if start_step is not None and (not _is_int(start_step) or start_step < 0):
            raise ConfigError(f"WSM start_step={start_step!r} must be 0 or more, or null.")
        if val_batches is not None and (not _is_int(val_batches) or val_batches < 1):
            raise ConfigError(f"WSM val_batches={val_batches!r} must be a positive number of batches or null.")
        torch_dtype = dtype_named(dtype, "WSM dtype", FLOAT8_DTYPES)
        if shape is None and weights is None:
            shape = "1-sqrt"
        self.interval, self.count, self.shape, self.alpha = interval, count, shape, alpha
        # Both a shape and explicit weights is an error (merge_weights says so in one sentence).
        self.weights = [float(w) for w in merge_weights(shape, count, alpha=alpha, weights=weights)]
        self.start_step, self.at_stage_end, self.at_fit_end = start_step, at_stage_end, at_fit_end
        self.evaluate, self.val_batches = evaluate, val_batches
        self.save_hf, self.save_checkpoint, self.dtype = save_hf, save_checkpoint, torch_dtype
        self.dirpath = Path(dirpath) if dirpath else None
        self.window_start: int | None = None  # the step the current window counts from
        self.taken: list[int] = []  # the steps of the snapshots in the accumulator
        self.merges: list[dict[str, Any]] = []  # one record per completed merge
        self._accumulator: MergeAccumulator | None = None
        self._pending: dict[str, Any] | None = None  # accumulator state restored before the model existed
        self._trainer: L.Trainer | None = None

    # ---- set-up -----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.dirpath is None:  # trainer.log_dir is a collective call: every rank is here
            self.dirpath = Path(trainer.log_dir or trainer.default_root_dir) / "wsm"

    def _first_window(self, pl_module: L.LightningModule) -> int:
        if self.start_step is not None:
            return self.start_step
        return pl_module.schedule_config.warmup_steps

    # ---- when -----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at_stage_end and stage_changes_with(trainer, pl_module, batch):
            self._end_window(trainer, pl_module, "stage end")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.window_start is None:
            first = self._first_window(pl_module)
            if step < first:
                return
            self.window_start = first
        if step > self.window_start and (step - self.window_start) % self.interval == 0:
            self._snapshot(pl_module, step)
            if len(self.taken) == self.count:
                self._merge(trainer, pl_module, "window full")
                return
        if self.at_stage_end and stage_ends_at(trainer, step):
            self._end_window(trainer, pl_module, "stage end")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and self.taken:
            secure_fit_end(trainer, pl_module)  # the last checkpoint first: a merge that fails cannot lose it
            self._merge(trainer, pl_module, "fit end")

    def _end_window(self, trainer, pl_module, reason: str) -> None:
        if self.taken:
            self._merge(trainer, pl_module, reason)
        elif self.window_start is not None:
            self.window_start = trainer.global_step

    # ---- snapshots and merges -------------------------------------------------------------------------
    def _snapshot(self, pl_module: L.LightningModule, step: int) -> None:
        state = _merged_state(pl_module.model)
        accumulator = self._live_accumulator(state)
        accumulator.add(state, self.weights[len(self.taken)])
        self.taken.append(step)

    def _live_accumulator(self, state: dict[str, torch.Tensor]) -> MergeAccumulator:
        if self._accumulator is None:
            self._accumulator = MergeAccumulator(state)
            if self._pending is not None:
                self._accumulator.load_state_dict(self._pending)
                self._pending = None
        return self._accumulator

    def merge_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Complete the pending merge now (every rank must call it) and return its record."""
        if not self.taken:
            raise ConfigError(
                f"WSM.merge_now() at step {trainer.global_step} has no snapshot to merge; snapshots are taken every "
                f"{self.interval} steps after step {self.window_start or self._first_window(pl_module)}."
            )
        return self._merge(trainer, pl_module, "requested")

    def _merge(self, trainer: L.Trainer, pl_module: L.LightningModule, reason: str) -> dict[str, Any]:
        check_nonfinite(pl_module)
        step = trainer.global_step
        accumulator = self._live_accumulator(_merged_state(pl_module.model))
        used = self.weights[: len(self.taken)]
        total = sum(used)
        record: dict[str, Any] = {"step": step, "snapshots": list(self.taken), "reason": reason,
                                  "weights": [w / total for w in used] if total > 0 else used}  # fmt: skip
        if total <= 0:
            rank_zero_warn(
                f"WSM at step {step}: the {len(self.taken)} snapshot(s) taken ({reason}) all have merge weight 0, "
                "so there is nothing to merge; the window restarts."
            )
        elif self._apply(trainer, pl_module, record):
            self.merges.append(record)
        accumulator.reset()
        self.taken = []
        self.window_start = step
        return record

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict) -> bool:
        """Swap the merged weights in, evaluate and save them, and put the raw weights back bit for bit.
        False (after a warning, with nothing evaluated or written) when the merged weights are not finite."""
        model = pl_module.model
        state = _merged_state(model)
        raw = {name: _local(t).clone() for name, t in state.items()}
        step = record["step"]
        if self.evaluate:
            record["raw_val_loss"] = self._val_loss(trainer, pl_module)
        try:
            self._accumulator.copy_into(state)  # sum(w x theta) / sum(w): a short window is renormalised
            if not weights_finite(trainer, state.values()):
                rank_zero_warn(
                    f"WSM at step {step} ({record['reason']}): the merge of the snapshots at steps "
                    f"{record['snapshots']} holds NaN or inf values, so it is neither evaluated nor written."
                )
                return False
            if self.evaluate:
                record["val_loss"] = self._val_loss(trainer, pl_module)
            self.on_merged(trainer, pl_module, record)
            if self.evaluate:
                self._lm_eval(trainer, pl_module)
            if self.save_hf:
                record["hf"] = os.fspath(self._save_hf(trainer, model, step))
            if self.save_checkpoint:
                self._save_single_file(trainer, pl_module, step, record)
        finally:
            with torch.no_grad():
                for name, t in state.items():
                    _local(t).copy_(raw[name])
        if self.evaluate:
            metrics = {"wsm/val/loss": record["val_loss"], "wsm/raw_val/loss": record["raw_val_loss"]}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            rank_zero_info(
                f"WSM at step {step} ({record['reason']}, {len(record['snapshots'])} snapshots at steps "
                f"{record['snapshots'][0]}..{record['snapshots'][-1]}): validation loss raw "
                f"{record['raw_val_loss']:.4f}, merged {record['val_loss']:.4f}"
            )
        return True

    def on_merged(self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict[str, Any]) -> None:
        """Called on every rank while the merged weights are in `pl_module.model`; override to use them."""

    # ---- evaluation -------------------------------------------------------------------------------
    def _val_loss(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The main validation loss as LingModule.validation_step computes it (the mean over every target
        token of all batches and ranks), on the data module's validation batches, on every rank."""
        total = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
        with evaluating_mid_training(pl_module.model):
            for i, batch in enumerate(trainer.datamodule.val_dataloader()):
                if self.val_batches is not None and i >= self.val_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                out = pl_module(batch["input_ids"], batch["labels"], **pl_module.isolation(batch))
                tokens = (batch["labels"] != IGNORE_INDEX).sum().double()
                total += torch.stack([out.main_loss.double() * tokens, tokens.to(total.device)])
        if trainer.world_size > 1:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def _lm_eval(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, LMEval):
                metrics = callback.evaluate(trainer, pl_module, prefix="wsm/eval")
                if trainer.is_global_zero and metrics:
                    print("merged weights, " + score_table(metrics, trainer.global_step))

    # ---- outputs ----------------------------------------------------------------------------------
    def _save_hf(self, trainer: L.Trainer, model: torch.nn.Module, step: int) -> Path:
        folder = self.dirpath / f"step={step}-hf"
        if _sharded(model) or trainer.is_global_zero:  # a sharded model needs every rank for its gathers
            data = ling_data(trainer)
            save_pretrained(model, folder, dtype=self.dtype, tokenizer=None if data is None else data.tokenizer)
        trainer.strategy.barrier()
        return folder

    def _save_single_file(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, record: dict) -> None:
        model = pl_module.model
        if _sharded(model) or trainer.world_size > 1:
            rank_zero_warn(
                f"WSM save_checkpoint skipped at step {step}: a sharded model is not gathered into one file; "
                "use the Hugging Face folder instead."
            )
            return
        data = ling_data(trainer)
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        path = write_weights_checkpoint(
            self.dirpath / f"step={step}.ckpt", state, model.config, tokens_seen=pl_module.tokens_seen,
            tokenizer=None if data is None else data.tokenizer_spec, global_step=step,
            wsm={k: v for k, v in record.items() if k != "hf"},
        )  # fmt: skip
        record["checkpoint"] = os.fspath(path)

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weights": list(self.weights),
            "window_start": self.window_start,
            "taken": list(self.taken),
            "merges": [dict(m) for m in self.merges],
            "accumulator": None,
            "shard_files": None,
        }
        if not self.taken:
            return out
        accumulator = self._accumulator.state_dict() if self._accumulator is not None else self._pending
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Only rank 0's callback state is kept in a sharded checkpoint: each rank keeps its own shards.
            step = trainer.global_step
            path = self.dirpath / "state" / f"step={step}.rank={trainer.global_rank}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(accumulator, tmp)
            os.replace(tmp, path)
            out["shard_files"] = os.fspath(self.dirpath / "state" / f"step={step}.rank={{rank}}.pt")
        else:
            out["accumulator"] = accumulator
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [float(w) for w in state_dict["weights"]] != self.weights:
            raise ConfigError(
                f"the checkpoint's WSM merge weights {state_dict['weights']} differ from this run's {self.weights}; "
                "resume with the same interval, count and shape."
            )
        self.window_start = state_dict["window_start"]
        self.taken = list(state_dict["taken"])
        self.merges = [dict(m) for m in state_dict["merges"]]
        self._accumulator = None
        self._pending = state_dict["accumulator"]
        if self.taken and state_dict["shard_files"] is not None:
            rank = self._trainer.global_rank if self._trainer is not None else 0
            path = Path(state_dict["shard_files"].format(rank=rank))
            if not path.is_file():
                raise ConfigError(
                    f"the checkpoint's pending WSM merge keeps rank {rank}'s accumulator in {path}, which is missing; "
                    "restore that file or resume from a checkpoint with the same layout."
                )
            self._pending = torch.load(path, map_location="cpu", weights_only=True)


# ---- helpers --------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent float buffers, as the model's own tensors (DTensors when sharded)."""
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return local(t.detach())


def _sharded(model: torch.nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())
