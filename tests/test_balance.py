"""Aux-loss-free expert-bias update: the rule on hand-built counts, and once per optimizer step."""

import copy

import lightning as L
import torch

from ling.balance import ExpertLoad, max_violation, update_expert_bias
from ling.data.datamodule import LingDataModule
from ling.lightning_module import LingModule


def hand_rule(bias, counts, rate):
    """Ling's zero-mean sign rule written out element by element."""
    mean = sum(counts) / len(counts)
    signs = [(mean - c > 0) - (mean - c < 0) for c in counts]
    avg = sum(signs) / len(signs)
    return [b + rate * (s - avg) for b, s in zip(bias, signs, strict=True)]


def test_update_on_hand_counts():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 2, 5, 3]), 0.01)
    # mean 5: errors [-5, 3, 0, 2], signs [-1, 1, 0, 1], mean sign 0.25.
    torch.testing.assert_close(bias, torch.tensor([-0.0125, 0.0075, -0.0025, 0.0075]))
    assert abs(float(bias.sum())) < 1e-9


def test_update_matches_hand_rule_and_keeps_fp32():
    torch.manual_seed(0)
    bias = torch.randn(16) * 0.01
    counts = torch.randint(0, 50, (16,))
    expected = hand_rule(bias.tolist(), counts.tolist(), 1e-3)
    update_expert_bias(bias, counts, 1e-3)
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, torch.tensor(expected), rtol=0, atol=1e-7)


def test_max_violation_and_accumulation():
    torch.testing.assert_close(max_violation(torch.tensor([[10, 2, 5, 3], [4, 4, 4, 4]])), torch.tensor([1.0, 0.0]))
    load = ExpertLoad()
    load.add(torch.tensor([[1, 2], [3, 4]]))
    load.add(torch.tensor([[10, 20], [30, 40]]))
    assert load.reduce().tolist() == [[11, 22], [33, 44]]
    assert load.reduce() is None


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for i in range(batch["input_ids"].shape[0]):
            self.batches.append({k: batch[k][i].clone() for k in ("input_ids", "labels")})


def test_bias_updated_once_per_step_from_all_micro_batches(tmp_path):
    torch.manual_seed(0)
    module = LingModule(model="tiny", bias_update_rate=0.01)
    module.configure_model()
    initial = copy.deepcopy(module.model)
    recorder = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=LingDataModule(seq_len=32, micro_batch_size=4, global_batch_size=12))
    assert len(recorder.batches) == 3
    # Recount the routing of the step's three micro-batches with the initial weights.
    with torch.no_grad():
        counts = sum(initial(b["input_ids"], labels=b["labels"]).tokens_per_expert for b in recorder.batches)
    assert len(counts) == len(module.model.moe_layers()) == 3  # two decoder MoE layers and the MTP layer
    for moe, layer_counts in zip(module.model.moe_layers(), counts, strict=True):
        expected = hand_rule([0.0] * len(layer_counts), layer_counts.tolist(), 0.01)
        torch.testing.assert_close(moe.gate.expert_bias, torch.tensor(expected), rtol=0, atol=1e-7)
        assert moe.gate.expert_bias.dtype == torch.float32 and not moe.gate.expert_bias.requires_grad
