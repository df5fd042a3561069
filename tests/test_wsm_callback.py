"""The WSM callback: merges equal a hand merge of the raw weights at the snapshot steps, swapping the
merge in and out leaves training bit for bit as without the callback, a resumed run merges what the
uninterrupted one does, and a 2-process sharded run merges like one process."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from parallel_setup import Record, make_data, make_module

from callbacks.wsm import WSM
from ling.config import ConfigError
from ling.convert import open_checkpoint
from ling.optim import OptimizerConfig
from ling.schedules import ScheduleConfig
from ling.wsm import merge_weights

ROOT = Path(__file__).resolve().parents[1]


class CaptureWSM(WSM):
    """Keeps a copy of every merged model while it is swapped in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full: list[dict] = []

    def on_merged(self, trainer, pl_module, record):
        self.full.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


class RawWeights(L.Callback):
    """The raw weights after every optimizer step (the independent record to merge by hand)."""

    def __init__(self):
        self.at: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class Probe(L.Callback):
    """The model and optimizer state at on_train_batch_end of the given steps, at its place in the list."""

    def __init__(self, steps):
        self.steps, self.seen = set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            optim = trainer.optimizers[0].state_dict()["state"]
            self.seen[trainer.global_step] = (
                {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                {i: {k: v.clone() for k, v in s.items()} for i, s in optim.items()},
            )


def fit(root, steps, callbacks, module=None, ckpt_path=None, checkpointing=False):
    module = module or make_module()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, enable_checkpointing=checkpointing, callbacks=callbacks, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return trainer, module


def hand_merge(raw: dict[int, dict], steps: list[int], weights: list[float]) -> dict:
    total = sum(weights)
    return {
        name: sum(w / total * raw[s][name].double() for s, w in zip(steps, weights, strict=True))
        for name, t in raw[steps[0]].items()
        if t.is_floating_point()
    }


def assert_close(merged: dict, expected: dict, atol=1e-6):
    assert set(expected) <= set(merged)
    for name, value in expected.items():
        torch.testing.assert_close(
            merged[name].double(), value, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"interval": 0, "count": 2}, "interval=0"),
        ({"interval": 2, "count": 0}, "count=0"),
        ({"interval": 2, "count": 2, "shape": "linear-ish"}, "linear-ish"),
        ({"interval": 2, "count": 3, "weights": [0.5, 0.5]}, "2 merge weights"),
        ({"interval": 2, "count": 2, "shape": "mean", "weights": [0.5, 0.5]}, "not both|both"),
    ],
)
def test_bad_settings_are_one_sentence(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        WSM(**kwargs)


def test_merge_before_any_snapshot_is_refused():
    wsm = WSM(interval=2, count=2)
    module = SimpleNamespace(schedule_config=ScheduleConfig(warmup_steps=3))
    with pytest.raises(ConfigError, match="no snapshot"):
        wsm.merge_now(SimpleNamespace(global_step=1), module)


# ---- one process ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """12 steps (warmup 2) with merges of 3 snapshots every 2 steps: full at step 8 (4, 6, 8), and a
    partial one of (10, 12) when training ends; beside it the same run without the callback."""
    root = tmp_path_factory.mktemp("wsm")
    raw, before, after, record = RawWeights(), Probe([8, 12]), Probe([8, 12]), Record()
    wsm = CaptureWSM(interval=2, count=3, shape="1-sqrt", val_batches=2, save_hf=True, save_checkpoint=True)
    fit(root / "a", 12, [record, raw, before, wsm, after])
    plain = Record()
    fit(root / "b", 12, [plain])
    return {"wsm": wsm, "raw": raw, "before": before, "after": after, "losses": record.losses,
            "plain": plain.losses}  # fmt: skip


def test_merges_equal_a_hand_merge_of_the_raw_weights(runs):
    wsm, raw = runs["wsm"], runs["raw"].at
    weights = merge_weights("1-sqrt", 3)
    assert [m["snapshots"] for m in wsm.merges] == [[4, 6, 8], [10, 12]]
    assert [m["reason"] for m in wsm.merges] == ["window full", "fit end"]
    assert_close(wsm.full[0], hand_merge(raw, [4, 6, 8], weights))
    # A window cut short renormalises the weights of the snapshots it has.
    assert_close(wsm.full[1], hand_merge(raw, [10, 12], weights[:2]))
    assert wsm.merges[1]["weights"] == pytest.approx([w / sum(weights[:2]) for w in weights[:2]])


def test_swap_back_is_bit_exact_and_training_is_unchanged(runs):
    for step in (8, 12):
        (model_a, optim_a), (model_b, optim_b) = runs["before"].seen[step], runs["after"].seen[step]
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
        assert optim_a.keys() == optim_b.keys()
        assert all(torch.equal(optim_a[i][k], optim_b[i][k]) for i in optim_a for k in optim_a[i])
    assert runs["losses"] == runs["plain"]


def test_merged_model_is_saved_in_both_formats(runs):
    merge = runs["wsm"].merges[0]
    assert Path(merge["hf"]).name == "step=8-hf" and (Path(merge["hf"]) / "config.json").is_file()
    assert Path(merge["checkpoint"]).name == "step=8.ckpt"
    source = open_checkpoint(Path(merge["checkpoint"]))
    tensors = source.read(list(source.shapes))
    assert_close(tensors, {k: v.double() for k, v in runs["wsm"].full[0].items()}, atol=0)
    assert {"val_loss", "raw_val_loss"} <= merge.keys()


def test_a_resumed_run_merges_what_the_uninterrupted_one_merges(tmp_path):
    def wsm():
        return CaptureWSM(interval=2, count=3, evaluate=False, save_hf=False)

    whole = wsm()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1)
    fit(tmp_path / "a", 10, [whole, ckpt], checkpointing=True)
    resumed = wsm()  # step 5 is mid-window: the snapshot of step 4 is in the accumulator
    fit(tmp_path / "b", 10, [resumed], ckpt_path=tmp_path / "ck" / "epoch=0-step=5.ckpt")
    assert [m["snapshots"] for m in resumed.merges] == [[4, 6, 8], [10]]
    assert [m["snapshots"] for m in whole.merges] == [[4, 6, 8], [10]]
    for a, b in zip(whole.full, resumed.full, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_merging_lowers_the_validation_loss(tmp_path):
    """At a high constant LR (1e-2) the 1-sqrt merge of steps 42..60 beats the raw weights of step 60
    (raw 2.249, merged 2.046 when written)."""
    module = make_module()
    module.optimizer_config = OptimizerConfig(lr=1e-2)
    wsm = WSM(interval=2, count=10, shape="1-sqrt", start_step=40, save_hf=False, val_batches=4)
    fit(tmp_path, 60, [wsm], module=module)
    merge = wsm.merges[-1]
    print(f"merge of steps {merge['snapshots']}: raw {merge['raw_val_loss']:.4f}, merged {merge['val_loss']:.4f}")
    assert merge["snapshots"] == list(range(42, 61, 2))
    assert merge["val_loss"] < merge["raw_val_loss"]


# ---- two processes --------------------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_expert_parallel_merge_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    out = tmp_path / "dist.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/wsm_run.py", "--dims", "1,2,2", "--steps", "8", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dist = torch.load(out, weights_only=True)
    single = CaptureWSM(interval=2, count=2, shape="1-sqrt", val_batches=1, save_hf=False)
    fit(tmp_path / "one", 8, [single])
    assert [m["snapshots"] for m in dist["merges"]] == [m["snapshots"] for m in single.merges] == [[4, 6], [8]]
    for sharded, one in zip(dist["full"], single.full, strict=True):
        assert_close(sharded, {k: v.double() for k, v in one.items()})
    # The validation rows are split over the ranks, so the losses are compared within the sharded run: a
    # merge of one snapshot is that snapshot, and it is evaluated on the same rows as the raw weights.
    last = dist["merges"][-1]
    assert last["val_loss"] == pytest.approx(last["raw_val_loss"], abs=1e-6)
    assert (
        Path(dist["merges"][0]["hf"]).name == "step=6-hf" and (Path(dist["merges"][0]["hf"]) / "config.json").is_file()
    )


def test_the_offline_merge_of_the_saved_checkpoints_equals_the_callbacks_merge(tmp_path):
    """`python -m ling.merge` over the checkpoints saved at the snapshot steps gives the callback's merge."""
    from ling.merge import merge_checkpoints

    wsm = CaptureWSM(interval=2, count=3, shape="1-sqrt", evaluate=False, save_hf=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    fit(tmp_path, 8, [saver, wsm], checkpointing=True)
    assert wsm.merges[0]["snapshots"] == [4, 6, 8]
    paths = [tmp_path / "ck" / f"epoch=0-step={step}.ckpt" for step in (4, 6, 8)]
    offline = merge_checkpoints(paths, shape="1-sqrt").state
    merged = wsm.full[0]
    assert offline.keys() == merged.keys()
    for name, value in offline.items():
        assert torch.equal(value, merged[name]), name
