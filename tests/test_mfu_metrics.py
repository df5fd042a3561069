"""MFU from Lightning's table of device peaks, and the token-weighted validation loss (torchmetrics)."""

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from dist.val_metric import ValData, hand_losses, make_batches
from lightning.fabric.utilities import throughput
from lightning.pytorch.plugins.precision import HalfPrecision, Precision

from ling.flops import training_flops_per_token
from ling.lightning_module import LingModule
from ling.parallel.strategy import LingParallelStrategy

ROOT = Path(__file__).resolve().parents[1]
H100_SXM = "NVIDIA H100 80GB HBM3"  # what torch.cuda.get_device_name gives for an H100 SXM


def throughput_module(monkeypatch, device: str, name: str, peak=None, plugin=None, plan=None) -> tuple:
    """A module with a stand-in trainer on `device` (named `name`), after `on_fit_start`; returns it and
    what `_log_throughput` logged for one step."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    module = LingModule(model="tiny", peak_flops_per_device=peak)
    strategy = SimpleNamespace(root_device=torch.device(device))
    if plan is not None:  # LingParallelStrategy with this plan's param_dtype
        strategy = LingParallelStrategy(param_dtype=plan.param_dtype)
        strategy.validate(1)
        strategy.parallel_devices = [torch.device(device)]
    module._trainer = SimpleNamespace(strategy=strategy, precision_plugin=plugin or Precision(), world_size=2)
    logged = {}
    monkeypatch.setattr(module, "log", lambda key, value, **kwargs: logged.__setitem__(key, value))
    module.on_fit_start()
    module._seq_len, module._last_step_end = 64, 0.0
    module._log_throughput(step_tokens=4096)
    return module, logged


def test_mfu_from_lightning_table_under_parallel_plan(monkeypatch):
    module, logged = throughput_module(monkeypatch, "cuda:0", H100_SXM, plan=SimpleNamespace(param_dtype="bfloat16"))
    peak = throughput._CUDA_FLOPS["h100 sxm"][torch.bfloat16]
    assert peak == 989.4e12  # the dense bf16 peak of an H100 SXM
    expected = logged["tok_s"] / 2 * training_flops_per_token(module.config, 64) / peak
    assert logged["mfu"] == pytest.approx(expected, rel=1e-12)


def test_mfu_from_trainer_precision(monkeypatch):
    _, logged = throughput_module(monkeypatch, "cuda:0", "NVIDIA H100 PCIe", plugin=HalfPrecision("bf16-true"))
    module = LingModule(model="tiny")
    peak = throughput._CUDA_FLOPS["h100 pcie"][torch.bfloat16]
    expected = logged["tok_s"] / 2 * training_flops_per_token(module.config, 64) / peak
    assert logged["mfu"] == pytest.approx(expected, rel=1e-12)


def test_no_mfu_on_cpu_or_unknown_device(monkeypatch):
    assert "mfu" not in throughput_module(monkeypatch, "cpu", "")[1]
    _, logged = throughput_module(
        monkeypatch, "cuda:0", "Some Unknown GPU", plan=SimpleNamespace(param_dtype="bfloat16")
    )
    assert "mfu" not in logged and "tok_s" in logged


def test_explicit_peak_overrides(monkeypatch):
    module, logged = throughput_module(monkeypatch, "cpu", "", peak=1e12)
    expected = logged["tok_s"] / 2 * training_flops_per_token(module.config, 64) / 1e12
    assert logged["mfu"] == pytest.approx(expected, rel=1e-12)


def test_validation_loss_is_token_weighted(tmp_path):
    torch.manual_seed(0)
    module = LingModule(model="tiny")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    data = ValData(module.config.vocab_size)
    for _ in range(2):  # a second validation starts from reset metrics
        trainer.validate(module, datamodule=data, verbose=False)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        hand = hand_losses(module.model, make_batches(0, data.vocab_size))
        assert set(logged) == set(hand)
        for name in ("val/loss", "val/loss/web", "val/loss/code"):
            assert logged[name] == pytest.approx(hand[name], abs=1e-6)
        assert logged["val/ppl"] == pytest.approx(math.exp(logged["val/loss"]), rel=1e-9)
    # Not the rows-weighted mean of the batch means, which over these uneven batches differs.
    means, rows = [], []
    for batch in make_batches(0, data.vocab_size):
        with torch.no_grad():
            means.append(float(module(batch["input_ids"], batch["labels"]).main_loss))
        rows.append(batch["input_ids"].shape[0])
    assert abs(sum(m * r for m, r in zip(means, rows)) / sum(rows) - hand["val/loss"]) > 1e-4


@pytest.mark.slow
def test_validation_loss_over_two_ranks(tmp_path):
    out = tmp_path / "val.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/val_metric.py", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = torch.load(out, weights_only=True)
    logged, hand = record["logged"], record["hand"]
    for name in ("val/loss", "val/loss/web", "val/loss/code"):
        assert logged[name] == pytest.approx(hand[name], abs=1e-6)
    assert logged["val/ppl"] == pytest.approx(math.exp(hand["val/loss"]), rel=1e-9)
