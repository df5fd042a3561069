"""Where the curriculum stages of a run end, for callbacks that act at stage ends (lm-eval, WSM), and
what callbacks that act at the end of the fit do first (`secure_fit_end`)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from ling.data.curriculum import Curriculum
from ling.data.datamodule import ling_data
from ling.lightning_module import LingModule


def curriculum(trainer: L.Trainer) -> Curriculum | None:
    """The data module's curriculum (None when the run has none, e.g. another data module)."""
    data = ling_data(trainer)
    return None if data is None else data.curriculum


def stage_ends_at(trainer: L.Trainer, step: int) -> bool:
    """Whether optimizer step `step` (counted from 1), just taken, was the last of its curriculum stage."""
    found = curriculum(trainer)
    return found is not None and step >= 1 and found.at(step).stage != found.at(step - 1).stage


def stage_changes_with(trainer: L.Trainer, pl_module: L.LightningModule, batch) -> bool:
    """At batch start, without a curriculum to look ahead in: whether this batch belongs to another stage
    than the module's, i.e. the previous stage has just ended (the weights are still that stage's here;
    the module enters the new stage in its step)."""
    if curriculum(trainer) is not None or not isinstance(batch, dict) or not isinstance(pl_module, LingModule):
        return False
    current = pl_module.stage
    return current is not None and batch.get("stage", current) != current


def check_nonfinite(pl_module: L.LightningModule) -> None:
    """Let the module stop the run on non-finite steps (`LingModule.check_nonfinite`; one host read)
    before a callback uses or writes its weights."""
    if isinstance(pl_module, LingModule):
        pl_module.check_nonfinite()


def secure_fit_end(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """What a callback's `on_train_end` does before its own work (every rank calls it).

    Lightning runs the ModelCheckpoint callbacks' `on_train_end`, which writes `last.ckpt` when no
    checkpoint has been saved yet, after every other callback's; run it now, so that an export,
    evaluation or sample that fails cannot lose the checkpoint (it writes only once). First the module
    may stop the run on non-finite steps, so that nothing is written or exported after them."""
    check_nonfinite(pl_module)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.on_train_end(trainer, pl_module)
