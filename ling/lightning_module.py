"""`LingModule`: the LightningModule that trains a Ling model.

Loss = main CE + mtp_loss_scaling_factor x mean MTP CE (+ router z-loss when router_z_loss_coeff > 0),
both fields of the model config like every model setting (`model_overrides`). The expert biases
are updated once per optimizer step from the token counts of all its micro-batches, summed over
the data-parallel ranks. The model is built in `configure_model` (on the meta device first), the
one place where parallelism will be applied.

A step whose loss or gradient norm is not finite is found on the device and, by default, not applied
(`nonfinite`, see `NonFinitePolicy`); the host reads the count only where it waits for the device
anyway (when the logger reads the step's metrics, at checkpoints and at the end of the fit).

Resuming from a checkpoint compares this run's settings with the checkpoint's: a setting that
changes the model's parameters or architecture is an error, every other change is applied and
logged in one line.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.fsdp import FSDPModule
from torchmetrics import MeanMetric

from ling.balance import ExpertLoad, max_violation, update_expert_bias
from ling.checkpoint import load_hf_weights
from ling.checkpoint.load import pretrained_config
from ling.config import ConfigError, LingConfig, is_number
from ling.data.datamodule import ling_data
from ling.dtypes import dtype_named
from ling.flops import device_peak_flops, mfu, training_flops_per_token
from ling.model import LingForCausalLM, build_model
from ling.model.masks import document_mask
from ling.model.model import IGNORE_INDEX
from ling.nonfinite import NonFiniteError, NonFinitePolicy, guarded_optimizer, rewind_step_counts, weights_finite
from ling.optim import OptimizerConfig, build_optimizer
from ling.parallel import parallelize
from ling.parallel.clip import clip_grad_norm_
from ling.parallel.strategy import LingParallelStrategy
from ling.presets import preset
from ling.resume import check_resume, resume_changes
from ling.schedules import LRSchedule, ScheduleConfig, build_scheduler


def resolve_config(model: str, model_overrides: dict[str, Any] | None, pretrained: str | None) -> LingConfig:
    """The model config: a checkpoint's config.json when continuing one, else a preset; plus overrides."""
    overrides = dict(model_overrides or {})
    if pretrained is not None:
        folder = Path(pretrained)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"pretrained={pretrained!r} is not a Hugging Face checkpoint folder with a config.json.")
        return pretrained_config(folder, **overrides)
    return preset(model, **overrides)


def _check_training_settings(config: LingConfig) -> None:
    """The model config's fields that only training reads (so a config.json loaded for inference is not
    checked for them): the MTP loss weight, the init std and the router z-loss coefficient."""
    weight = config.mtp_loss_scaling_factor
    if not is_number(weight) or weight < 0:
        raise ConfigError(f"model_overrides.mtp_loss_scaling_factor={weight!r} must be 0 or more.")
    if weight > 0 and config.num_nextn_predict_layers == 0:
        raise ConfigError(
            f"model_overrides.mtp_loss_scaling_factor={weight!r} needs an MTP layer, but the model has "
            "num_nextn_predict_layers=0; set model_overrides.num_nextn_predict_layers: 1 or "
            "model_overrides.mtp_loss_scaling_factor: 0."
        )
    std = config.initializer_range
    if not is_number(std) or std <= 0:
        raise ConfigError(f"model_overrides.initializer_range={std!r} must be positive (the std of the normal init).")
    if not is_number(config.router_z_loss_coeff):
        raise ConfigError(
            f"model_overrides.router_z_loss_coeff={config.router_z_loss_coeff!r} must be a number (0: no z-loss)."
        )


class LingModule(L.LightningModule):
    def __init__(
        self,
        model: str = "tiny",
        model_overrides: dict[str, Any] | None = None,
        pretrained: str | None = None,
        bias_update_rate: float = 1e-3,
        grad_clip: float | None = 1.0,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        peak_flops_per_device: float | None = None,
        loss_chunk_tokens: int | None = 2048,
        nonfinite: NonFinitePolicy | None = None,
    ):
        """
        Args:
            model: a preset name (tiny, mini, flash, 1t); ignored when `pretrained` is given.
            model_overrides: config fields to change (Hugging Face names), e.g. {num_experts: 32}; among
                them the training settings of the model: mtp_loss_scaling_factor (the weight of the mean
                MTP loss), initializer_range (the std of the normal init) and router_z_loss_coeff (0: off).
            pretrained: a Hugging Face checkpoint folder to continue training from.
            bias_update_rate: step size u of the aux-loss-free expert-bias update (0 = frozen).
            grad_clip: clip the global gradient norm to this value (null: no clipping).
            optimizer: AdamW settings.
            schedule: learning-rate schedule (WSM by default, as in the Ling 2.0 report).
            peak_flops_per_device: peak FLOP/s of one device, for MFU (none: Lightning's table of device
                peaks for the compute dtype; MFU is not logged on devices it does not know, or on CPU).
            loss_chunk_tokens: compute the training and validation losses this many tokens at a time,
                recomputing each chunk's logits in backward, so the full [tokens, vocab] logits never
                exist (None: whole logits).
            nonfinite: what a step with a non-finite loss or gradient norm does (`NonFinitePolicy`;
                default: skip it, and stop after 3 in a row).
        """
        super().__init__()
        # `not x > 0` form so that NaN is refused too.
        if grad_clip is not None and not grad_clip > 0:
            raise ConfigError(f"grad_clip={grad_clip} must be positive, or null for no clipping.")
        # Settings objects are stored as plain dicts so checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["optimizer", "schedule", "nonfinite"])
        self.config = resolve_config(model, model_overrides, pretrained)
        _check_training_settings(self.config)
        self.pretrained = pretrained
        if bias_update_rate < 0:
            raise ConfigError(f"bias_update_rate={bias_update_rate} must be 0 or more.")
        self.bias_update_rate = bias_update_rate
        self.grad_clip = grad_clip
        # The step is written out (micro-batch loop, bias update, clipping) so that gradient
        # accumulation can follow a ramped batch size and the expert biases move once per step.
        self.automatic_optimization = False
        self.optimizer_config = optimizer or OptimizerConfig()
        self.schedule_config = schedule or ScheduleConfig()
        self.hparams["optimizer"] = dataclasses.asdict(self.optimizer_config)
        self.hparams["schedule"] = dataclasses.asdict(self.schedule_config)
        self.nonfinite = nonfinite or NonFinitePolicy()
        self.hparams["nonfinite"] = dataclasses.asdict(self.nonfinite)
        self.peak_flops_per_device = peak_flops_per_device
        self._peak_flops: float | None = None  # the one in use, found at fit start
        if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
            raise ConfigError(f"loss_chunk_tokens={loss_chunk_tokens} must be a positive number of tokens or null.")
        self.loss_chunk_tokens = loss_chunk_tokens
        self.model: LingForCausalLM | None = None
        self.expert_load = ExpertLoad()
        self.last_expert_counts: torch.Tensor | None = None  # the latest step's tokens per expert
        self.lr_schedule: LRSchedule | None = None  # the schedule's callable, made in configure_optimizers
        self.tokens_seen = 0
        self.source_tokens: list[int] = []  # tokens trained on per data source, over all ranks
        self.stage: int | None = None  # the curriculum stage whose settings are applied
        self._base_rope = (self.config.rope_theta, self.config.rope_scaling)
        self._last_step_end: float | None = None
        self._seq_len = 0
        # Non-finite steps: what the host has read (`check_nonfinite`), and the device counters
        # [total, run of consecutive, step that ended the run (-1: none), latest non-finite step].
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self._nonfinite: torch.Tensor | None = None
        self._host_steps_behind = False  # the optimizer counts steps on the host and counted skipped ones
        # Validation loss, token-weighted over all batches and ranks (created in `setup`).
        self.val_loss: MeanMetric | None = None
        self.val_source_loss: torch.nn.ModuleDict | None = None  # per source, keyed by its index
        self._val_source_names: list[str] = []

    # ---- model construction -----------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model on the meta device, parallelise it (under LingParallelStrategy), then
        materialise it: from `pretrained` (each rank reads only the slices of its own shards) or by
        random init (each rank draws the full tensors and keeps its shards, so any layout starts from
        the same weights as one process)."""
        if self.model is not None:
            return
        model = build_model(self.config, device="meta")
        # LingParallelStrategy hands its mesh over as Lightning's `device_mesh` (None without a strategy
        # that builds one, e.g. outside a Trainer), and its parallel plan as `strategy.plan`.
        if self.device_mesh is not None and isinstance(self.trainer.strategy, LingParallelStrategy):
            parallelize(model, self.device_mesh, self.trainer.strategy.plan)
        model.to_empty(device=self.device)
        if self.pretrained is not None:
            load_hf_weights(model, self.pretrained)
        else:
            model.init_weights()  # the config's initializer_range
        self.model = model

    @property
    def moe_layer_names(self) -> list[str]:
        """Names of the MoE layers in the order of `tokens_per_expert` (decoder layers, then MTP)."""
        config = self.config
        names = [f"layer_{i}" for i in range(config.first_k_dense_replace, config.num_hidden_layers)]
        return names + [f"mtp_{k}" for k in range(config.num_nextn_predict_layers)]

    def setup(self, stage: str) -> None:
        data = ling_data(self.trainer)
        if data is None:
            self._setup_val_metrics([])
            return
        tokenizer = data.tokenizer
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; use a model with vocab_size >= {tokenizer.vocab_size}."
            )
        for data_stage in data.stages:
            self._check_context(data_stage, data_stage.seq_len or data.seq_len)
        on_gpu = self.trainer.strategy.root_device.type == "cuda"
        if data.document_isolation and self.config.attention_dropout and on_gpu:
            raise ConfigError(
                f"attention_dropout={self.config.attention_dropout} cannot be used with document_isolation on a GPU, "
                "where the document mask runs through flex attention, which has no dropout; set one of them off."
            )
        self._setup_val_metrics(data.source_names)

    def _setup_val_metrics(self, names: list[str]) -> None:
        """The validation loss metrics: one over all sources, and one per source when there are several.
        float64 states, so the token-weighted sums stay exact to ~1e-12 over long validation sets. NaN is
        kept, so a non-finite validation loss shows as such: `nan_strategy=nan` imputes NaN with NaN (the
        default drops NaN values, and torchmetrics' "disable" also drops the weights)."""
        device = self.trainer.strategy.root_device

        def metric() -> MeanMetric:
            return MeanMetric(nan_strategy=float("nan")).set_dtype(torch.float64).to(device)

        if self.val_loss is None:
            self.val_loss = metric()
        names = list(names) if len(names) > 1 else []
        if self.val_source_loss is None or names != self._val_source_names:
            self._val_source_names = names
            self.val_source_loss = torch.nn.ModuleDict({str(j): metric() for j in range(len(names))})

    # ---- curriculum stages ----------------------------------------------------------------------
    def _stage_rope(self, data_stage) -> tuple[float, dict | None]:
        theta, scaling = self._base_rope
        return (data_stage.rope_theta or theta, data_stage.rope_scaling or scaling)

    def _check_context(self, data_stage, seq_len: int) -> None:
        """A stage's rows must fit in the positions the model reaches with the stage's rope
        (`LingConfig.context_length`, the rule generation and evaluation use too)."""
        theta, scaling = self._stage_rope(data_stage)
        limit = self.config.replace(rope_theta=theta, rope_scaling=scaling).context_length
        if seq_len > limit:
            raise ConfigError(
                f"stage {data_stage.name!r} trains {seq_len}-token rows but the model reaches {limit} positions "
                f"(max_position_embeddings={self.config.max_position_embeddings}, rope_scaling={scaling}); "
                "shorten the stage or give it rope_scaling (e.g. YaRN) that covers its length."
            )

    def enter_stage(self, index: int) -> None:
        """Apply a curriculum stage's rope, bias-update rate and learning rate to the live run.

        Stage settings are absolute (unset = the run's own setting), so entering a stage after a
        resume gives the same model and optimizer settings as reaching it in one run."""
        data_stage = ling_data(self.trainer).stages[index]
        theta, scaling = self._stage_rope(data_stage)
        if (theta, scaling) != (self.config.rope_theta, self.config.rope_scaling):
            self.model.set_rope(theta, scaling)
            self.config = self.model.config
        self.bias_update_rate = (
            self.hparams.bias_update_rate if data_stage.bias_update_rate is None else data_stage.bias_update_rate
        )
        peak = self.optimizer_config.lr if data_stage.lr is None else data_stage.lr
        self._set_peak_lr(peak)
        if self.stage is not None or self.trainer.global_step > 0:
            rank_zero_info(
                f"step {self.trainer.global_step}: stage {data_stage.name!r} (rope_theta={theta}, "
                f"rope_scaling={scaling}, bias_update_rate={self.bias_update_rate}, lr={peak})"
            )
        self.stage = index

    def _set_peak_lr(self, peak: float) -> None:
        """Make `peak` the schedule's peak learning rate from the current step on (the scheduler has
        already set this step's rate, so it is set here too)."""
        scheduler = self.lr_schedulers()
        self.lr_schedule.peak = peak
        for group in scheduler.optimizer.param_groups:
            group["lr"] = self.lr_schedule(scheduler.last_epoch)

    def on_train_start(self) -> None:
        """This run's optimizer settings, over those a resumed optimizer state brought back.

        Lightning restores the optimizer's parameter groups (learning rate, betas, eps, weight decay)
        and the scheduler's peak from the checkpoint, after `on_load_checkpoint` has compared them
        with this run's; here this run's are put in (a fresh run already has them)."""
        config, optimizer = self.optimizer_config, self.optimizers().optimizer
        for group in optimizer.param_groups:
            group["betas"], group["eps"] = tuple(config.betas), config.eps
            group["weight_decay"] = config.weight_decay if group.get("name", "decay") == "decay" else 0.0
            if group.get("fused") != config.fused:
                group["fused"] = config.fused
                # A fused AdamW keeps its step counts on the device, the others on the host.
                on_device = bool(group["fused"] or group.get("capturable"))
                for p in group["params"]:
                    step = optimizer.state.get(p, {}).get("step")
                    if torch.is_tensor(step):
                        optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)
        self._set_peak_lr(config.lr)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids, labels=labels, loss_chunk=self.loss_chunk_tokens, **kwargs)

    @staticmethod
    def isolation(batch: dict[str, torch.Tensor], i: int | None = None) -> dict:
        """position_ids and the document mask of (micro-batch i of) a batch packed with isolation."""
        if "doc_ids" not in batch:
            return {}
        doc_ids, positions = batch["doc_ids"], batch["position_ids"]
        if i is not None:
            doc_ids, positions = doc_ids[i], positions[i]
        return {"position_ids": positions, "attn_mask": document_mask(doc_ids)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """One optimizer step over all micro-batches of the batch ([micro-batches, rows, seq_len])."""
        if self._last_step_end is None:
            self._last_step_end = time.perf_counter()
        if batch.get("stage", 0) != self.stage:
            self.enter_stage(batch.get("stage", 0))
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        inputs, labels = batch["input_ids"], batch["labels"]
        micro_batches = inputs.shape[0]
        losses = []
        for i in range(micro_batches):
            if isinstance(self.model, FSDPModule):  # FSDP2: reduce gradients once, at the last
                self.model.set_requires_gradient_sync(i == micro_batches - 1)
            out = self(inputs[i], labels[i], **self.isolation(batch, i))
            self.manual_backward(out.loss / micro_batches)
            if out.tokens_per_expert is not None:
                self.expert_load.add(out.tokens_per_expert)
            losses.append(torch.stack([out.main_loss, *out.mtp_losses, out.loss]).detach())
        # [main, MTP 1.., total]: the mean over the micro-batches, then over all data-parallel ranks, so
        # that every rank decides alike whether the step is finite.
        step_losses = torch.stack(losses).mean(0)
        if self.trainer.world_size > 1:
            # A bare all-reduce: Lightning's strategy.reduce runs a barrier first, which with NCCL
            # blocks the host until the device has finished the step.
            torch.distributed.all_reduce(step_losses)
            step_losses = step_losses / self.trainer.world_size
        norm = clip_grad_norm_(self.parameters(), self.grad_clip)  # the global norm: the same on every rank
        finite = torch.isfinite(norm) & torch.isfinite(step_losses).all()  # stays on the device
        self._count_nonfinite(finite)
        skip = self.nonfinite.action == "skip"
        self._balance_experts(finite if skip else None)
        if skip:
            self._host_steps_behind |= finite.device.type != "cpu"
            with guarded_optimizer(optimizer.optimizer, finite):
                optimizer.step()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        self.log("train/loss", step_losses[0], prog_bar=True)
        for k in range(1, len(step_losses) - 1):
            self.log(f"train/mtp_{k}_loss", step_losses[k])
        self.log("train/grad_norm", norm)
        self.log("train/nonfinite_steps", self._nonfinite[0].float())
        self.log("train/lr", scheduler.get_last_lr()[0])
        self.log("train/micro_batches", float(micro_batches))
        self._seq_len = inputs.shape[-1]
        step_tokens = inputs.numel() * self.trainer.world_size
        self.tokens_seen += step_tokens
        self.log("train/tokens", float(self.tokens_seen))
        self.log("data/stage", float(self.stage))
        self._log_shares(batch.get("source_rows"), inputs.shape[-1])
        self._log_throughput(step_tokens)

    # ---- non-finite steps -------------------------------------------------------------------------
    def _count_nonfinite(self, finite: torch.Tensor) -> None:
        """Update the device counters for this step (no host read)."""
        if self._nonfinite is None:  # once per fit: from what the host knows (a resumed run's counts)
            start = [self.nonfinite_steps, self._nonfinite_run, -1, -1]
            self._nonfinite = torch.tensor(start, dtype=torch.int64, device=finite.device)
        total, run, ended, latest = self._nonfinite.unbind()
        bad = (~finite).to(torch.int64)
        step = self.trainer.global_step + 1  # the number of the step being taken
        run = (run + 1) * bad
        limit = 1 if self.nonfinite.action == "stop" else self.nonfinite.max_consecutive
        if limit is not None:
            ended = torch.where((ended < 0) & (run >= limit), step, ended)
        latest = torch.where(bad.bool(), step, latest)
        self._nonfinite = torch.stack([total + bad, run, ended, latest])

    def check_nonfinite(self) -> bool:
        """Read the non-finite step counters on the host: log the steps found since the last read, and
        raise `NonFiniteError` once the policy says stop. One host read, so call it only where the host
        waits for the device anyway (LingModule does: when the logger reads the step's metrics, before
        a checkpoint is written and at the end of the fit; the fit-end callbacks do before their work).
        Returns whether it rewound the optimizer's step counts (see `rewind_step_counts`)."""
        if self._nonfinite is None:
            return False
        rewound = False
        total, run, ended, latest = self._nonfinite.tolist()
        new = total - self.nonfinite_steps
        self.nonfinite_steps, self._nonfinite_run = total, run
        skip = self.nonfinite.action == "skip"
        if new > 0:
            if skip and self._host_steps_behind:
                rewind_step_counts(self.optimizers().optimizer, new, self.device)
                rewound = True
            what = "skipped (weights, optimizer state and expert biases unchanged)" if skip else "applied"
            rank_zero_warn(
                f"{new} optimizer step(s) up to step {latest} had a non-finite loss or gradient norm and were "
                f"{what}; {total} in this run (train/nonfinite_steps)."
            )
        if ended >= 0:
            if not skip:
                raise NonFiniteError(
                    f"optimizer step {ended} had a non-finite loss or gradient norm (nonfinite.action: stop), so "
                    "training stops; no checkpoint or export was written after it, so the last checkpoint "
                    "holds the last finite weights."
                )
            limit = self.nonfinite.max_consecutive
            raise NonFiniteError(
                f"{limit} optimizer steps in a row (steps {ended - limit + 1} to {ended}) had a non-finite loss "
                f"or gradient norm and were skipped, so training stops with the weights of step {ended - limit}, "
                "which the checkpoints keep; lower the learning rate, look at the data of those steps, or raise "
                "nonfinite.max_consecutive."
            )
        return rewound

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # The logger reads this step's metrics right after this hook (waiting for the device there). Lightning
        # 2.6's rule for when, its private should_update_logs, in public terms (one optimizer step per batch).
        every = self.trainer.log_every_n_steps
        if every and (self.trainer.global_step % every == 0 or self.trainer.should_stop):
            self.check_nonfinite()

    def _log_shares(self, source_rows: torch.Tensor | None, seq_len: int) -> None:
        """The share of all tokens trained so far that came from each source (all ranks).

        `source_rows` is a host tensor (LingDataModule keeps it off the device), read with `.numpy()`,
        which refuses device tensors rather than waiting for one."""
        data = ling_data(self.trainer)
        if source_rows is None or data is None:
            return
        names = data.source_names
        if len(self.source_tokens) != len(names):
            self.source_tokens = [0] * len(names)
        for j, rows in enumerate(source_rows.numpy().tolist()):
            self.source_tokens[j] += rows * seq_len
        total = max(sum(self.source_tokens), 1)
        for name, tokens in zip(names, self.source_tokens, strict=True):
            self.log(f"data/share/{name}", tokens / total)

    def _balance_experts(self, finite: torch.Tensor | None = None) -> None:
        """The expert-bias update of the step; kept out (on the device) where `finite` is false."""
        counts = self.expert_load.reduce()
        if counts is None:
            return
        self.last_expert_counts = counts  # this step's tokens per expert, [moe layers, experts]
        if self.bias_update_rate > 0:
            for moe, layer_counts in zip(self.model.moe_layers(), counts, strict=True):
                bias = moe.gate.expert_bias
                if bias is None:  # moe_router_enable_expert_bias: false
                    continue
                before = bias.detach().clone() if finite is not None else None
                update_expert_bias(bias, layer_counts, self.bias_update_rate)
                if before is not None:
                    torch.where(finite, bias, before, out=bias)
        violation = max_violation(counts)
        self.log("load/max_violation_mean", violation.mean())
        self.log("load/max_violation_max", violation.max())
        for layer, value in zip(self.moe_layer_names, violation, strict=True):
            self.log(f"load/max_violation/{layer}", value)

    def on_fit_start(self) -> None:
        self._peak_flops = self._find_peak_flops()

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in: LingParallelStrategy's param_dtype, else the trainer precision's."""
        strategy = self.trainer.strategy
        if isinstance(strategy, LingParallelStrategy) and strategy.plan.param_dtype is not None:
            return dtype_named(strategy.plan.param_dtype, "param_dtype")
        precision = str(self.trainer.precision_plugin.precision)  # "32-true", "bf16-mixed", "16-true", ...
        for prefix, dtype in (("bf16", torch.bfloat16), ("16", torch.float16), ("64", torch.float64)):
            if precision.startswith(prefix):
                return dtype
        return torch.float32

    def _find_peak_flops(self) -> float | None:
        """`peak_flops_per_device`, else `ling.flops.device_peak_flops` for this device and compute dtype
        (None on CPU and on devices Lightning's table lacks; its caveats about sparse figures are there)."""
        if self.peak_flops_per_device:
            return float(self.peak_flops_per_device)
        return device_peak_flops(self.trainer.strategy.root_device, self._compute_dtype())

    def _log_throughput(self, step_tokens: int) -> None:
        """Tokens/s over the whole step, data loading included; MFU when the device peak is known."""
        now = time.perf_counter()
        tokens_per_second = step_tokens / max(now - self._last_step_end, 1e-9)
        self._last_step_end = now
        self.log("tok_s", tokens_per_second, prog_bar=True)
        if self._peak_flops:
            flops = training_flops_per_token(self.config, self._seq_len)
            per_device = tokens_per_second / self.trainer.world_size
            self.log("mfu", mfu(per_device, flops, self._peak_flops), prog_bar=True)

    def on_train_end(self) -> None:
        self.check_nonfinite()
        metrics = self.trainer.callback_metrics
        parts = [f"{name} {float(metrics[name]):.4f}" for name in ("train/loss", "val/loss") if name in metrics]
        data = ling_data(self.trainer)
        if data is not None:
            parts.append(f"unigram entropy of the data {data.unigram_entropy:.4f}")
        rank_zero_info(f"finished at step {self.trainer.global_step}: " + ", ".join(parts))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """val/loss: the mean loss over all target tokens of the validation set (all batches, all ranks),
        each batch's mean weighted by its number of target tokens; val/ppl = exp(val/loss), the same as
        torchmetrics' Perplexity over those tokens (which would need the full logits). Lightning syncs
        the metrics over the ranks and resets them each validation epoch."""
        if self.val_loss is None:  # validation run without `setup` (e.g. called by hand)
            data = ling_data(self.trainer)
            self._setup_val_metrics(data.source_names if data is not None else [])
        out = self(batch["input_ids"], batch["labels"], **self.isolation(batch))
        loss = out.main_loss.detach().double()
        tokens = (batch["labels"] != IGNORE_INDEX).sum()
        self.val_loss.update(loss, weight=tokens)
        self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)
        if self._val_source_names and "source" in batch:
            j = int(batch["source"])
            metric = self.val_source_loss[str(j)]
            metric.update(loss, weight=tokens)
            self.log(f"val/loss/{self._val_source_names[j]}", metric, on_step=False, on_epoch=True)
        return out.main_loss

    def on_validation_epoch_end(self) -> None:
        # Computed from the synced metric: `compute` caches its value, and Lightning resets it after the epoch.
        if self.val_loss is not None and self.val_loss.update_called:
            self.log("val/ppl", torch.exp(self.val_loss.compute()), on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optimizer_config)
        max_steps = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        self.lr_schedule = LRSchedule(self.schedule_config, max_steps, self.optimizer_config.lr)
        scheduler = build_scheduler(optimizer, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Writing a checkpoint waits for the device anyway. Once the policy says stop, or when the weights
        # are not finite, nothing is written: the last checkpoint keeps the last finite weights.
        rewound = self.check_nonfinite()
        if not weights_finite(self.trainer, self.model.state_dict().values()):
            raise NonFiniteError(
                f"the weights at step {self.trainer.global_step} hold NaN or inf values, so no checkpoint is written."
            )
        if rewound and "optimizer_states" in checkpoint:
            # The step counts were rewound for skipped steps after Lightning collected the optimizer state.
            strategy = self.trainer.strategy
            checkpoint["optimizer_states"] = [strategy.optimizer_state(o) for o in self.trainer.optimizers]
        theta, scaling = self._base_rope
        checkpoint["ling"] = {
            "tokens_seen": self.tokens_seen,
            "source_tokens": list(self.source_tokens),
            "config": self.config.to_hf(),
            "base_rope": {"rope_theta": theta, "rope_scaling": scaling},  # before any stage's rope
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_run": self._nonfinite_run,
        }
        data = ling_data(self.trainer)
        if data is not None:  # the tokenizer `python -m ling.convert` writes beside the weights
            checkpoint["ling"]["tokenizer"] = dict(data.tokenizer_spec)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("ling")
        if saved is None:
            return
        self.check_resume(checkpoint)
        for state in checkpoint.get("lr_schedulers", []):
            # Checkpoints written before the schedule held its own peak kept the peak as LambdaLR's base
            # rate, which would now multiply the schedule's rate; the base is 1 (see `build_scheduler`).
            if state.get("base_lrs") and any(base != 1.0 for base in state["base_lrs"]):
                state["base_lrs"] = [1.0] * len(state["base_lrs"])
        for name, ours, theirs, note in self._resume_changes(checkpoint):
            rank_zero_info(f"resuming with {name}={ours!r} (the checkpoint was trained with {theirs!r}){note}")
        self.tokens_seen = saved["tokens_seen"]
        self.source_tokens = list(saved.get("source_tokens", []))
        self.nonfinite_steps = int(saved.get("nonfinite_steps", 0))
        self._nonfinite_run = int(saved.get("nonfinite_run", 0))
        self._nonfinite = None

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """One ConfigError naming every setting that differs from `checkpoint`'s (a trainer checkpoint,
        or the `meta.pt` of a sharded one) and cannot change when resuming (see `ling.resume`)."""
        if checkpoint.get("ling") is not None:
            check_resume(checkpoint, self.config, self.optimizer_config)

    def _resume_changes(self, checkpoint: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
        theta, scaling = self._base_rope  # the rope before any stage's
        config_hf = {**self.config.to_hf(), "rope_theta": theta, "rope_scaling": scaling}
        return resume_changes(checkpoint, config_hf, dict(self.hparams))
