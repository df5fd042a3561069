"""What the recipes' runs share: the Ling 2.0 report's optimisation settings, the loggers, the
callbacks and the checkpoint plugin, as the arguments the YAML passes on."""

from __future__ import annotations

import inspect
from typing import Any

from ling.lightning_module import LingModule
from ling.optim import OptimizerConfig


def _defaults(cls: type, names: tuple[str, ...]) -> dict[str, Any]:
    parameters = inspect.signature(cls).parameters
    return {name: parameters[name].default for name in names}


# The report's settings are LingModule's and OptimizerConfig's own defaults (router bias-update rate
# 1e-3, which stages lower after context extension; gradient clipping at 1.0; the loss 2,048 tokens at
# a time; AdamW betas (0.9, 0.95) and weight decay 0.1); the configs spell them out.
TRAINING: dict[str, Any] = _defaults(LingModule, ("bias_update_rate", "grad_clip", "loss_chunk_tokens"))
ADAMW: dict[str, Any] = _defaults(OptimizerConfig, ("betas", "weight_decay"))  # besides lr

PLUGINS = [{"class_path": "ling.checkpoint.atomic.AtomicCheckpointIO"}]


def loggers(out_dir: str, tensorboard: bool) -> dict | list[dict]:
    """Lightning's CSVLogger that claims its version folder atomically (ling/run_folder.py); with
    `tensorboard`, TensorBoard too (`tensorboard --logdir <out_dir>/tensorboard`)."""
    csv = {"class_path": "ling.run_folder.CSVLogger", "init_args": {"save_dir": out_dir, "name": "logs"}}
    if not tensorboard:
        return csv
    board = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
             "init_args": {"save_dir": out_dir, "name": "tensorboard"}}  # fmt: skip
    return [csv, board]


def callbacks(every: int, export_dtype: str | None, rope_scaling: dict | None) -> list[dict]:
    """Progress, a checkpoint every `every` steps (kept), the LR, the Hugging Face export in `export_dtype`
    (None: the training dtype) with `rope_scaling` written into its config, a text sample, the per-layer
    expert load (and biases) as a heatmap every `every // 2` steps, and the plots of the run."""
    return [
        {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 25}},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": every, "save_last": True, "save_top_k": -1},
        },
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {
            "class_path": "callbacks.hf_export.HFExport",
            "init_args": {"dtype": export_dtype, "rope_scaling": rope_scaling},
        },
        {"class_path": "callbacks.sample_text.SampleText"},
        {"class_path": "callbacks.expert_load.ExpertLoadHeatmap", "init_args": {"every_n_steps": every // 2}},
        {"class_path": "callbacks.run_report.RunReport"},
    ]
