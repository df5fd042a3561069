"""ExpertLoadHeatmap: the saved numbers are the per-step counts of the bias update summed over each
window; the PNG is written and reaches a TensorBoard logger."""

import glob
import os

import lightning as L
import matplotlib.image
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.expert_load import ExpertLoadHeatmap
from ling.balance import max_violation
from ling.config import ConfigError
from tests.parallel_setup import make_data, make_module


class StepCounts(L.Callback):
    """The counts each step's bias update reduces, read independently by wrapping `expert_load.reduce`."""

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}
        self.bias: dict[int, np.ndarray] = {}
        self._pending = None

    def on_fit_start(self, trainer, pl_module):
        reduce = pl_module.expert_load.reduce

        def recorded(*args, **kwargs):
            counts = reduce(*args, **kwargs)
            self._pending = None if counts is None else counts.detach().clone()
            return counts

        pl_module.expert_load.reduce = recorded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts[trainer.global_step] = self._pending
        self.bias[trainer.global_step] = np.stack(
            [m.gate.expert_bias.detach().double().numpy() for m in pl_module.model.moe_layers()]
        )


def fit(root, steps, callbacks, logger=False):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, enable_checkpointing=False, callbacks=callbacks, default_root_dir=root,
    )  # fmt: skip
    module = make_module()
    trainer.fit(module, datamodule=make_data())
    return trainer, module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_load")
    record = StepCounts()
    heatmap = ExpertLoadHeatmap(every_n_steps=2)
    logger = TensorBoardLogger(str(root), name="tb")
    trainer, module = fit(str(root), 5, [record, heatmap], logger=logger)
    return trainer, module, record, heatmap


def load(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_windows_sum_the_step_counts(run):
    trainer, module, record, heatmap = run
    assert heatmap.dirpath == os.path.join(trainer.log_dir, "expert_load")
    names = sorted(os.listdir(heatmap.dirpath))
    # every 2 steps, and the last (odd) step at the end of fit
    assert names == [f"expert_load_step={s}.{ext}" for s in (2, 4, 5) for ext in ("npz", "png")]
    for first, last in [(1, 2), (3, 4), (5, 5)]:
        saved = load(os.path.join(heatmap.dirpath, f"expert_load_step={last}.npz"))
        expected = sum(record.counts[s] for s in range(first, last + 1)).numpy()
        assert saved["counts"].dtype == np.int64
        np.testing.assert_array_equal(saved["counts"], expected)
        assert (int(saved["first_step"]), int(saved["last_step"]), int(saved["steps"])) == (
            first, last, last - first + 1,
        )  # fmt: skip
        np.testing.assert_allclose(saved["relative"], expected / expected.mean(axis=1, keepdims=True), rtol=1e-12)
        np.testing.assert_allclose(saved["max_violation"], max_violation(torch.from_numpy(expected)).numpy(), 1e-6)
        np.testing.assert_allclose(
            saved["max_violation"], (expected.max(1) - expected.mean(1)) / expected.mean(1), rtol=1e-5
        )
        np.testing.assert_array_equal(saved["bias"], record.bias[last])
        assert list(saved["layers"]) == module.moe_layer_names
        assert saved["counts"].shape == (len(module.moe_layer_names), module.config.num_experts)


def test_png_and_tensorboard_image(run):
    trainer, module, record, heatmap = run
    assert len(heatmap.paths) == 3
    for path in heatmap.paths:
        assert os.path.getsize(path) > 0
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > image.shape[0]  # two panels side by side

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = glob.glob(os.path.join(trainer.logger.log_dir, "events.out.tfevents.*"))
    assert events and all(os.path.getsize(e) > 0 for e in events)
    accumulator = EventAccumulator(trainer.logger.log_dir, size_guidance={IMAGES: 0})
    accumulator.Reload()
    assert "expert_load" in accumulator.Tags()[IMAGES]
    assert [e.step for e in accumulator.Images("expert_load")] == [2, 4, 5]


def test_window_shorter_than_interval(tmp_path):
    record = StepCounts()
    heatmap = ExpertLoadHeatmap(every_n_steps=3, window=1, dirpath=str(tmp_path / "maps"))
    fit(str(tmp_path), 3, [record, heatmap])
    assert sorted(os.listdir(tmp_path / "maps")) == ["expert_load_step=3.npz", "expert_load_step=3.png"]
    saved = load(tmp_path / "maps" / "expert_load_step=3.npz")
    np.testing.assert_array_equal(saved["counts"], record.counts[3].numpy())
    assert (int(saved["first_step"]), int(saved["steps"])) == (3, 1)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"every_n_steps": 2, "window": 0}, "window=0"),
        ({"every_n_steps": 2, "window": 3}, "window=3"),
    ],
)
def test_bad_arguments(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ExpertLoadHeatmap(**kwargs)


def test_model_without_moe_warns_and_writes_nothing(tmp_path):
    class Dense(L.LightningModule):
        moe_layer_names: list = []

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    heatmap = ExpertLoadHeatmap(every_n_steps=1, dirpath=str(tmp_path / "maps"))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[heatmap], default_root_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no MoE layers"):
        trainer.fit(Dense(), data)
    assert not (tmp_path / "maps").exists() and heatmap.paths == []
