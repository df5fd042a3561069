"""The parallel plan in one process (a one-rank mesh): activation checkpointing recomputes without changing
the training, and the strategy's run equals the plain one."""

import lightning as L
import pytest
import torch
import torch.distributed as dist
from parallel_setup import Record, make_data, make_module

from ling.config import ConfigError
from ling.model.moe import GroupedExperts
from ling.parallel.strategy import LingParallelStrategy


def train(strategy=None, steps=2):
    record, module = Record(), make_module()
    calls = []
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False, callbacks=[record, Count(calls)],
        **({"strategy": strategy} if strategy else {}),
    )  # fmt: skip
    trainer.fit(module, datamodule=make_data())
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.model.state_dict().items()}
    if dist.is_initialized():  # the strategy's one-rank process group; later tests run without one
        dist.destroy_process_group()
    return record.losses, state, calls


class Count(L.Callback):
    """Counts the calls of the first routed-expert module: forward, plus any recomputation in backward."""

    def __init__(self, calls):
        self.calls = calls

    def on_fit_start(self, trainer, pl_module):
        experts = next(m for m in pl_module.model.modules() if isinstance(m, GroupedExperts))
        experts.register_forward_hook(lambda *args: self.calls.append(1))


@pytest.fixture(scope="module")
def plain():
    return train()


@pytest.mark.parametrize(
    ("mode", "reshard", "calls_per_micro_batch"),
    [("none", True, 1), ("none", False, 1), ("full", True, 2), ("moe", True, 2)],
)
def test_activation_checkpointing_recomputes_and_changes_nothing(plain, mode, reshard, calls_per_micro_batch):
    strategy = LingParallelStrategy(param_dtype=None, reduce_dtype=None, activation_checkpointing=mode,
                                    reshard_after_forward=reshard)  # fmt: skip
    losses, state, calls = train(strategy)
    assert len(calls) == calls_per_micro_batch * 2 * 4  # 2 steps x 4 micro-batches
    assert len(plain[2]) == 2 * 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain[0]), rtol=0, atol=1e-6)
    for name, value in plain[1].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones():
    """torch.compile per block (bf16 compute, as on GPUs; the first compile takes ~30 s on CPU)."""
    eager, _, _ = train(LingParallelStrategy(param_dtype="bfloat16"))
    compiled, _, _ = train(LingParallelStrategy(param_dtype="bfloat16", compile=True))
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=0, atol=1e-3)


def test_compile_needs_bf16():
    with pytest.raises(ConfigError, match="compile=True needs param_dtype='bfloat16'"):
        LingParallelStrategy(param_dtype=None, compile=True).validate(1)


def test_pretrained_checkpoint_loads_into_the_sharded_model(tmp_path):
    """One step at lr 1e-30 (below fp32 resolution) with a frozen bias leaves the loaded weights as they are."""
    from ling import preset
    from ling.checkpoint import save_pretrained
    from ling.lightning_module import LingModule
    from ling.model import build_model
    from ling.optim import OptimizerConfig

    torch.manual_seed(5)
    source = build_model(preset("tiny"))
    save_pretrained(source, tmp_path / "hf")
    module = LingModule(pretrained=str(tmp_path / "hf"), bias_update_rate=0.0, optimizer=OptimizerConfig(lr=1e-30))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=LingParallelStrategy(param_dtype=None, reduce_dtype=None),
        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=make_data())
    loaded = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.model.state_dict().items()}
    assert loaded.keys() == source.state_dict().keys()
    for name, value in source.state_dict().items():
        assert torch.equal(loaded[name], value), name
    dist.destroy_process_group()
