"""Resuming with changed settings: a setting that decides the model's parameters or architecture is one
error naming it, raised before any step; any other change is logged in one line and really used."""

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ling.checkpoint.atomic import AtomicCheckpointIO
from ling.config import ConfigError
from ling.data.datamodule import LingDataModule
from ling.lightning_module import LingModule
from ling.optim import OptimizerConfig
from ling.schedules import ScheduleConfig


def make_module(optimizer=None, warmup_steps=2, **kwargs) -> LingModule:
    torch.manual_seed(0)
    kwargs.setdefault("bias_update_rate", 0.01)
    schedule = ScheduleConfig(name="wsm", warmup_steps=warmup_steps)
    return LingModule(model="tiny", optimizer=optimizer, schedule=schedule, **kwargs)


def data() -> LingDataModule:
    return LingDataModule(seq_len=32, micro_batch_size=4, global_batch_size=8, seed=7)


def trainer(root, steps, callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=root, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Two steps of the tiny model (peak lr 3e-4, bias_update_rate 0.01, weight decay 0.1)."""
    root = tmp_path_factory.mktemp("first")
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2)
    trainer(root, 2, [ckpt]).fit(make_module(), datamodule=data())
    return root / "ckpt" / "epoch=0-step=2.ckpt"


class FirstStep(L.Callback):
    """What the first resumed step used: the optimizer's groups as it steps, the bias-update rate, and
    how far the expert biases moved."""

    def __init__(self):
        self.groups = self.rate = self.bias_moved = self.theta = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1
        self._biases = [m.gate.expert_bias.clone() for m in pl_module.model.moe_layers()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.groups is None:
            self.groups = [{k: g[k] for k in ("name", "lr", "weight_decay", "betas")} for g in optimizer.param_groups]
            self.rate = pl_module.bias_update_rate
            self.theta = pl_module.model.config.rope_theta

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bias_moved is None:
            moved = [m.gate.expert_bias - b for m, b in zip(pl_module.model.moe_layers(), self._biases, strict=True)]
            self.bias_moved = max(float(d.abs().max()) for d in moved)


def resumed_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming with")]


def test_unchanged_settings_resume_without_a_line(tmp_path, checkpoint, caplog):
    caplog.set_level(logging.INFO)
    trainer(tmp_path, 3, []).fit(make_module(), datamodule=data(), ckpt_path=checkpoint)
    assert resumed_lines(caplog) == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"num_experts": 32}, "num_experts=16 but this run's model has num_experts=32"),
        ({"num_experts_per_tok": 2}, "num_experts_per_tok=4 but this run's model has num_experts_per_tok=2"),
        ({"num_experts": 32, "hidden_size": 128}, "hidden_size=64, num_experts=16 but this run's model has "
                                                  "hidden_size=128, num_experts=32"),
    ],
)  # fmt: skip
def test_a_changed_shape_or_architecture_is_one_error_before_any_step(tmp_path, checkpoint, overrides, named):
    first = FirstStep()
    with pytest.raises(ConfigError, match=f"^the checkpoint was trained with {named}; these cannot change") as err:
        module = make_module(model_overrides=overrides)
        trainer(tmp_path, 4, [first]).fit(module, datamodule=data(), ckpt_path=checkpoint)
    assert "\n" not in str(err.value) and first.steps == 0


def test_an_optimizer_setting_that_regroups_the_parameters_is_refused(tmp_path, checkpoint):
    module = make_module(optimizer=OptimizerConfig(embedding_weight_decay=False))
    with pytest.raises(ConfigError, match="optimizer.embedding_weight_decay=True but this run has optimizer"):
        trainer(tmp_path, 4, []).fit(module, datamodule=data(), ckpt_path=checkpoint)


def test_changed_settings_are_logged_once_each_and_used_from_the_first_step(tmp_path, checkpoint, caplog):
    caplog.set_level(logging.INFO)
    first = FirstStep()
    module = make_module(
        optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.05), bias_update_rate=0.002, grad_clip=0.5,
        model_overrides={"rope_theta": 20000.0, "mtp_loss_scaling_factor": 0.2, "initializer_range": 0.01},
        warmup_steps=4,
    )  # fmt: skip
    trainer(tmp_path, 3, [first]).fit(module, datamodule=data(), ckpt_path=checkpoint)
    assert sorted(resumed_lines(caplog)) == [
        "resuming with bias_update_rate=0.002 (the checkpoint was trained with 0.01)",
        "resuming with grad_clip=0.5 (the checkpoint was trained with 1.0)",
        "resuming with initializer_range=0.01 (the checkpoint was trained with 0.006); not used, the weights come "
        "from the checkpoint",
        "resuming with mtp_loss_scaling_factor=0.2 (the checkpoint was trained with 0.1)",
        "resuming with optimizer.lr=0.001 (the checkpoint was trained with 0.0003)",
        "resuming with optimizer.weight_decay=0.05 (the checkpoint was trained with 0.1)",
        "resuming with rope_theta=20000.0 (the checkpoint was trained with 10000.0)",
        "resuming with schedule.warmup_steps=4 (the checkpoint was trained with 2)",
    ]
    assert module.trainer.global_step == 3 and first.steps == 1
    # Over the restored optimizer state: step 3 of the new 4 warmup steps, 3/4 of the new peak.
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in first.groups] == [
        ("decay", pytest.approx(0.75e-3), 0.05), ("no_decay", pytest.approx(0.75e-3), 0.0)
    ]  # fmt: skip
    # Each bias moves by rate x (sign - mean sign): at most 2 x 0.002 (at least 0.005 at the old 0.01).
    assert first.rate == 0.002 and 0 < first.bias_moved <= 2 * 0.002 + 1e-7
    assert first.theta == 20000.0 and module.grad_clip == 0.5
    assert module.model.config.mtp_loss_scaling_factor == 0.2


def test_a_checkpoint_whose_scheduler_kept_the_peak_as_its_base_rate_resumes_at_the_right_rate(tmp_path, checkpoint):
    """Older checkpoints hold LambdaLR's base rate as the peak (3e-4); the schedule now gives the rate itself."""
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["lr_schedulers"][0]["base_lrs"] == [1.0, 1.0]
    saved["lr_schedulers"][0]["base_lrs"] = [3e-4, 3e-4]
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    rates = []

    class Rates(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            rates.append([g["lr"] for g in optimizer.param_groups])

    trainer(tmp_path, 4, [Rates()]).fit(make_module(), datamodule=data(), ckpt_path=old)
    # Steps 3 and 4 are past the 2 warmup steps: the WSM schedule's constant peak.
    assert rates == [[pytest.approx(3e-4)] * 2] * 2


def test_a_sharded_checkpoint_of_another_shape_is_one_sentence_before_loading(tmp_path):
    """Lightning reads a sharded (DCP) checkpoint's weights before the module's hooks run; the strategy
    compares the settings in its meta.pt first, so the error names the field, not a tensor."""
    import torch.distributed as dist

    from ling.parallel.strategy import LingParallelStrategy

    def sharded_trainer(root, steps, callbacks):
        return L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=root, callbacks=callbacks,
            strategy=LingParallelStrategy(param_dtype=None, reduce_dtype=None),
        )  # fmt: skip

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    try:
        sharded_trainer(tmp_path, 1, [ckpt]).fit(make_module(), datamodule=data())
        saved = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
        assert (saved / "meta.pt").is_file()
        other = make_module(model_overrides={"num_experts": 8, "n_group": 4})
        with pytest.raises(ConfigError, match=r"trained with num_experts=16 but this run's model has num_experts=8"):
            sharded_trainer(tmp_path, 2, []).fit(other, datamodule=data(), ckpt_path=saved)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
