"""Runs through the Trainer: exact resume (also across curriculum stages), stage switches, document isolation."""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ling.checkpoint.atomic import AtomicCheckpointIO
from ling.data.curriculum import Stage
from ling.data.datamodule import LingDataModule
from ling.data.packing import document_ids, document_positions
from ling.data.sources import SourceSpec
from ling.lightning_module import LingModule
from ling.model.masks import document_causal_mask
from ling.model.rope import rope_parameters
from ling.schedules import ScheduleConfig


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses, self.inputs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.inputs.append(batch["input_ids"][..., :4].clone())


def make_trainer(tmp_path, max_steps, callbacks):
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def make_module():
    torch.manual_seed(0)
    return LingModule(model="tiny", bias_update_rate=0.01, schedule=ScheduleConfig(name="wsm", warmup_steps=3))


def data():
    return LingDataModule(seq_len=32, micro_batch_size=4, global_batch_size=8, seed=7)


def test_resume_continues_exactly(tmp_path):
    full = RecordLosses()
    module_full = make_module()
    make_trainer(tmp_path / "full", 6, [full]).fit(module_full, datamodule=data())

    first = RecordLosses()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path / "a", 3, [first, ckpt]).fit(make_module(), datamodule=data())
    saved = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert saved.exists()
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))

    second = RecordLosses()
    module_resumed = make_module()
    make_trainer(tmp_path / "b", 6, [second]).fit(module_resumed, datamodule=data(), ckpt_path=saved)

    assert len(full.losses) == 6 and len(first.losses) == 3 and len(second.losses) == 3
    assert full.inputs[0].shape == (2, 4, 4)  # two micro-batches of four rows per step
    for a, b in zip(full.inputs, first.inputs + second.inputs, strict=True):
        assert torch.equal(a, b)  # the resumed run reads the next unseen batches
    assert first.losses + second.losses == full.losses
    for (name, a), b in zip(
        module_full.model.state_dict().items(), module_resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert module_resumed.tokens_seen == module_full.tokens_seen == 6 * 2 * 4 * 32


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.arange(10)}, path)
    good = path.read_bytes()

    def crash_mid_write(obj, fh, *args, **kwargs):
        fh.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.arange(20)}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 1


class RecordStage(RecordLosses):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        rope = pl_module.model.model.rotary_emb
        self.stages = getattr(self, "stages", []) + [
            (batch["stage"], rope.config.rope_theta, rope.inv_freq.clone(), trainer.optimizers[0].param_groups[0]["lr"],
             pl_module.bias_update_rate)
        ]  # fmt: skip


def staged_data():
    stages = [
        Stage("a", steps=2, seq_len=32),
        Stage("b", steps=2, seq_len=64, rope_theta=50000.0, lr=5e-4, bias_update_rate=0.0),
        Stage("c", seq_len=128, rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
    ]
    return LingDataModule(seq_len=32, micro_batch_size=4, global_batch_size=8, seed=7, stages=stages)


def test_stages_switch_at_the_exact_step_and_resume_across_a_boundary(tmp_path):
    full = RecordStage()
    module_full = make_module()
    make_trainer(tmp_path / "full", 6, [full]).fit(module_full, datamodule=staged_data())
    assert [s[0] for s in full.stages] == [0, 0, 1, 1, 2, 2]
    assert [s[1] for s in full.stages] == [10000.0, 10000.0, 50000.0, 50000.0, 10000.0, 10000.0]
    assert [s[4] for s in full.stages] == [0.01, 0.01, 0.0, 0.0, 0.01, 0.01]
    # WSM with 3 warmup steps to the default peak 3e-4 (logged after each step): a stage lr replaces the peak.
    assert [s[3] for s in full.stages] == pytest.approx([2e-4, 3e-4, 5e-4, 5e-4, 3e-4, 3e-4])
    # The rope frequencies follow the formula for each stage's settings.
    config = module_full.config
    for stage, theta, inv_freq, _, _ in full.stages:
        scaling = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64} if stage == 2 else None
        expected, _ = rope_parameters(config.replace(rope_theta=theta, rope_scaling=scaling))
        torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
    assert [x.shape for x in full.inputs] == [(2, 4, 4)] * 2 + [(2, 2, 4)] * 2 + [(2, 1, 4)] * 2

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    first = RecordStage()
    make_trainer(tmp_path / "a", 1, [first, ckpt]).fit(make_module(), datamodule=staged_data())
    second = RecordStage()
    module_resumed = make_module()
    saved = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    make_trainer(tmp_path / "b", 6, [second]).fit(module_resumed, datamodule=staged_data(), ckpt_path=saved)
    for a, b in zip(full.inputs, first.inputs + second.inputs, strict=True):
        assert torch.equal(a, b)
    assert first.losses + second.losses == full.losses
    assert [s[:2] for s in first.stages + second.stages] == [s[:2] for s in full.stages]
    for (name, a), b in zip(
        module_full.model.state_dict().items(), module_resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


class RecordBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = float(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("isolation", [True, False])
def test_document_isolation_reaches_the_model(tmp_path, isolation):
    """The logged loss equals the initial model's loss with (or without) per-document positions and mask."""
    module = make_module()
    module.configure_model()
    initial = copy.deepcopy(module.model)
    recorder = RecordBatch()
    data = LingDataModule(
        sources={"arithmetic": SourceSpec("arithmetic")}, seq_len=128, micro_batch_size=2, global_batch_size=4,
        document_isolation=isolation,
    )  # fmt: skip
    make_trainer(tmp_path, 1, [recorder]).fit(module, datamodule=data)
    batch = recorder.batch
    inputs, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        isolated, joined = [], []
        for i in range(inputs.shape[0]):
            doc = document_ids(inputs[i], 256)
            isolated.append(
                initial(
                    inputs[i],
                    labels=labels[i],
                    position_ids=document_positions(doc),
                    attn_mask=document_causal_mask(doc),
                ).main_loss  # fmt: skip
            )
            joined.append(initial(inputs[i], labels=labels[i]).main_loss)
    assert ("doc_ids" in batch) == isolation
    expected, other = torch.stack(isolated).mean(), torch.stack(joined).mean()
    if not isolation:
        expected, other = other, expected
    assert recorder.loss == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(expected) - float(other)) > 1e-4  # the two settings differ by far more than the tolerance
