"""Expert-load heatmaps: how evenly each MoE layer spreads its tokens over the experts, and the
expert biases that steer it, as a figure every N optimizer steps and at the end of fit.

The counts are the ones the expert-bias update already sums for each step (over micro-batches and
data-parallel ranks, `LingModule.last_expert_counts`). Each step only adds that [layers, experts]
tensor into an accumulator on the device; the host reads it when a figure is written.

    callbacks:
      - class_path: callbacks.expert_load.ExpertLoadHeatmap
        init_args: {every_n_steps: 100}

Each figure is `<dirpath>/expert_load_step=<N>.png` with its numbers beside it in
`expert_load_step=<N>.npz`: `counts` [layers, experts] (tokens summed over the window), `relative`
(counts / the layer's mean count), `max_violation` ((max - mean) / mean per layer), `bias` (the
expert biases at step N, NaN for a layer without one), `layers`, `first_step`, `last_step`, `steps`.
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ling.balance import max_violation
from ling.config import ConfigError
from ling.lightning_module import LingModule
from ling.model.dtensor import full


class ExpertLoadHeatmap(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of fit), on global rank 0, write a
    figure of the tokens per expert of each MoE layer over the last `window` steps (default: all the
    steps since the previous figure) and the current expert biases; log it to a TensorBoard logger.

    `dirpath` defaults to `<trainer.log_dir>/expert_load`."""

    def __init__(self, every_n_steps: int = 100, window: int | None = None, dirpath: str | None = None):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ConfigError(f"ExpertLoadHeatmap every_n_steps={every_n_steps!r} must be a whole number >= 1.")
        if window is None:
            window = every_n_steps
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConfigError(f"ExpertLoadHeatmap window={window!r} must be a whole number of steps >= 1 or null.")
        if window > every_n_steps:
            raise ConfigError(
                f"ExpertLoadHeatmap window={window} is longer than every_n_steps={every_n_steps}: the window "
                "starts afresh after each figure, so it can hold at most every_n_steps steps."
            )
        self.every_n_steps, self.window, self.dirpath = every_n_steps, window, dirpath
        self.paths: list[str] = []  # the PNGs written (global rank 0)
        self._enabled = True
        self._reset()
        self._seen: torch.Tensor | None = None

    def _reset(self) -> None:
        self._sum: torch.Tensor | None = None  # [layers, experts] int64, on the device
        self._steps = 0
        self._first_step: int | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._seen = None
        # The counts come from LingModule's expert-bias update; another LightningModule has none to show.
        self._enabled = isinstance(pl_module, LingModule) and bool(pl_module.moe_layer_names)
        if not self._enabled:
            rank_zero_warn("ExpertLoadHeatmap: the model has no MoE layers; it writes no expert-load figures.")
            return
        self._layers = list(pl_module.moe_layer_names)
        if self.dirpath is None:  # trainer.log_dir is a collective call under several ranks: all ranks ask
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "expert_load")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        counts = pl_module.last_expert_counts
        step = trainer.global_step
        if counts is not None and counts is not self._seen:  # a new step's counts (not a stale one)
            self._seen = counts
            into_window = step % self.every_n_steps
            if into_window == 0 or into_window > self.every_n_steps - self.window:
                counts = counts.detach()
                self._sum = counts.to(torch.int64, copy=True) if self._sum is None else self._sum.add_(counts)
                self._steps += 1
                if self._first_step is None:
                    self._first_step = step
        if step % self.every_n_steps == 0 and self._sum is not None:
            self._write(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and self._sum is not None:
            self._write(trainer, pl_module, trainer.global_step)

    # ---- the figure ------------------------------------------------------------------------------
    def _biases(self, pl_module, experts: int) -> np.ndarray:
        rows = []
        for moe in pl_module.model.moe_layers():
            bias = moe.gate.expert_bias
            if bias is None:  # moe_router_enable_expert_bias: false
                rows.append(np.full(experts, np.nan))
                continue
            bias = bias.detach()
            bias = full(bias)  # a DTensor: every rank takes part
            rows.append(bias.to(torch.float64).cpu().numpy())
        return np.stack(rows)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        counts = self._sum.cpu()  # the one host read of the window
        first, steps = self._first_step, self._steps
        self._reset()
        bias = self._biases(pl_module, counts.shape[-1])
        if not trainer.is_global_zero:
            return
        violation = max_violation(counts).numpy().astype(np.float64)
        counts = counts.numpy()
        relative = counts / np.maximum(counts.mean(axis=1, keepdims=True), 1e-9)
        os.makedirs(self.dirpath, exist_ok=True)
        stem = os.path.join(self.dirpath, f"expert_load_step={step}")
        np.savez(
            stem + ".npz", counts=counts, relative=relative, max_violation=violation, bias=bias,
            layers=np.array(self._layers), first_step=first, last_step=step, steps=steps,
        )  # fmt: skip
        figure = self._figure(counts, relative, violation, bias, first, step, steps)
        figure.savefig(stem + ".png", dpi=100)
        self.paths.append(stem + ".png")
        self._log(trainer, figure, stem + ".png", step)

    def _figure(self, counts, relative, violation, bias, first: int, last: int, steps: int):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
        from matplotlib.transforms import blended_transform_factory

        layers, experts = counts.shape
        width = min(max(3.0, 0.22 * experts), 14.0)
        height = min(max(2.5, 0.35 * layers + 1.5), 16.0)
        figure = Figure(figsize=(2 * width + 4.5, height), layout="constrained")
        FigureCanvasAgg(figure)
        load_ax, bias_ax = figure.subplots(1, 2)
        names = self._layers
        window = f"steps {first}-{last}" if first != last else f"step {last}"
        figure.suptitle(f"expert load, {window} ({steps} steps, {int(counts.sum())} token-expert picks)")

        top = max(float(np.nanmax(relative)), 2.0)
        image = load_ax.imshow(
            relative, aspect="auto", interpolation="nearest", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, top)
        )
        load_ax.set(title="tokens / layer mean", xlabel="expert", yticks=range(layers), yticklabels=names)
        beside = blended_transform_factory(load_ax.transAxes, load_ax.transData)
        for i, value in enumerate(violation):
            load_ax.text(1.02, i, f"{value:+.2f}", transform=beside, va="center", ha="left", fontsize=8)
        load_ax.text(1.02, -0.6, "max viol.", transform=beside, va="bottom", ha="left", fontsize=8)
        figure.colorbar(image, ax=load_ax, pad=0.12, label="count / mean count")

        span = float(np.nanmax(np.abs(bias))) if np.isfinite(bias).any() else 0.0
        span = max(span, 1e-6)
        image = bias_ax.imshow(bias, aspect="auto", interpolation="nearest", cmap="PuOr_r", vmin=-span, vmax=span)
        bias_ax.set(title="expert bias", xlabel="expert", yticks=range(layers), yticklabels=names)
        figure.colorbar(image, ax=bias_ax, label="bias")
        return figure

    @staticmethod
    def _log(trainer: L.Trainer, figure, path: str, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("expert_load", figure, global_step=step, close=False)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key="expert_load", images=[path], step=step)
