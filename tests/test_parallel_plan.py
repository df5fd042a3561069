"""The parallel plan in one process (a one-rank mesh): activation checkpointing recomputes without changing
the training, and the strategy's run equals the plain one."""

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from parallel_setup import Record, make_data, make_module

from ling.config import ConfigError
from ling.model.dtensor import full
from ling.model.moe import GroupedExperts
from ling.parallel.strategy import LingParallelStrategy


def train(strategy=None, steps=2, ckpt_dir=None, resume=None):
    """Losses, full final weights and expert calls; with `ckpt_dir`, a checkpoint every 2 steps."""
    record, module = Record(), make_module()
    calls = []
    callbacks = [record, Count(calls)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=ckpt_dir is not None,
        callbacks=callbacks, default_root_dir=ckpt_dir, **({"strategy": strategy} if strategy else {}),
    )  # fmt: skip
    trainer.fit(module, datamodule=make_data(), ckpt_path=resume)
    state = {k: full(v) for k, v in module.model.state_dict().items()}
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
    assert state.keys() == plain[1].keys()
    for name, value in plain[1].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)


def test_checkpoints_move_between_activation_checkpointing_modes(tmp_path):
    """A sharded checkpoint saved with every block recomputed holds the keys of one saved without (no
    wrapper name among them), and resumes with the MoE parts recomputed to the same training."""
    from torch.distributed.checkpoint import FileSystemReader

    def strategy(mode):
        return LingParallelStrategy(param_dtype=None, reduce_dtype=None, activation_checkpointing=mode)

    reference, _, _ = train(strategy("none"), steps=4, ckpt_dir=tmp_path / "none")
    train(strategy("full"), steps=2, ckpt_dir=tmp_path / "full")
    step2 = "epoch=0-step=2.ckpt"
    keys = {mode: set(FileSystemReader(tmp_path / mode / step2).read_metadata().state_dict_metadata)
            for mode in ("none", "full")}  # fmt: skip
    assert keys["full"] == keys["none"] and not any("_checkpoint_wrapped_module" in key for key in keys["full"])
    resumed, _, _ = train(strategy("moe"), steps=4, resume=tmp_path / "full" / step2)
    assert len(resumed) == 2
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference[2:]), rtol=0, atol=1e-6)


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
    # the strategy's mesh reached the module as Lightning's `device_mesh`; every rank reads its own rows
    assert module.device_mesh is trainer.strategy.device_mesh
    assert module.device_mesh.mesh_dim_names == ("dp_replicate", "efsdp", "ep")
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
    loaded = {k: full(v) for k, v in module.model.state_dict().items()}
    assert loaded.keys() == source.state_dict().keys()
    for name, value in source.state_dict().items():
        assert torch.equal(loaded[name], value), name
    dist.destroy_process_group()
