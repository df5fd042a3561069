"""FSDP2 + expert parallelism on CPU/gloo with 2 processes: every layout trains exactly like one process,
sharded checkpoints resume under another layout, and bad mesh settings fail at once."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from parallel_setup import Record, make_data, make_module

from ling import preset
from ling.checkpoint import load_pretrained
from ling.config import ConfigError
from ling.model import build_model
from ling.parallel.expert_parallel import expert_major_order
from ling.parallel.layout import ParallelDims
from ling.parallel.strategy import LingParallelStrategy

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def torchrun(out: Path, dims: str, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/train_tiny.py", "--dims", dims, "--out", str(out), *extra]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the same run in one process without any parallelism."""
    record, module = Record(), make_module()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, enable_checkpointing=False, callbacks=[record],
        default_root_dir=tmp_path_factory.mktemp("single"),
    )  # fmt: skip
    trainer.fit(module, datamodule=make_data())
    return {"losses": record.losses, "state": module.model.state_dict()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each layout for 4 steps (checkpoints every 2), then resumes at step 2 with the other ep."""
    tmp = tmp_path_factory.mktemp("parallel")
    out = {
        "dp_shard=2": torchrun(tmp / "a.pt", "1,2,1", "--steps", "4", "--ckpt-dir", str(tmp / "ck_a"),
                               "--export", str(tmp / "hf_a")),
        "dp_shard=2, ep=2": torchrun(tmp / "b.pt", "1,2,2", "--steps", "4", "--ckpt-dir", str(tmp / "ck_b")),
        "dp_replicate=2": torchrun(tmp / "c.pt", "2,1,1", "--steps", "4"),
    }  # fmt: skip
    step2 = "epoch=0-step=2.ckpt"
    out["ep=1 saved, resumed with ep=2"] = torchrun(tmp / "d.pt", "1,2,2", "--resume", str(tmp / "ck_a" / step2))
    out["ep=2 saved, resumed with ep=1"] = torchrun(tmp / "e.pt", "1,2,1", "--resume", str(tmp / "ck_b" / step2))
    out["tmp"] = tmp
    return out


LAYOUTS = ["dp_shard=2", "dp_shard=2, ep=2", "dp_replicate=2"]
RESUMES = ["ep=1 saved, resumed with ep=2", "ep=2 saved, resumed with ep=1"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS + RESUMES)
def test_layout_trains_like_one_process(single, runs, layout):
    run = runs[layout]
    expected_losses = single["losses"][2:] if layout in RESUMES else single["losses"]
    assert len(run["losses"]) == len(expected_losses)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(expected_losses), rtol=0, atol=1e-5)
    assert run["state"].keys() == single["state"].keys()
    for name, value in single["state"].items():
        torch.testing.assert_close(run["state"][name], value, rtol=0, atol=1e-5, msg=name)
    biases = [name for name in single["state"] if name.endswith("expert_bias")]
    assert len(biases) == 3 and all(single["state"][b].abs().sum() > 0 for b in biases)  # the update ran
    assert run["tokens_seen"] == STEPS * 8 * 32


@pytest.mark.slow
def test_sharded_run_exports_and_converts_to_the_same_model(runs):
    """The HF export written by the sharded run, and the DCP checkpoint converted offline, hold the weights
    that the run gathered at its end."""
    from ling.convert import convert_checkpoint

    trained = build_model(preset("tiny"))
    trained.load_state_dict(runs["dp_shard=2, ep=2"]["state"])
    converted = convert_checkpoint(runs["tmp"] / "ck_b" / "epoch=0-step=4.ckpt", runs["tmp"] / "hf_b", dtype="float32")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(ids).logits
        assert torch.equal(load_pretrained(converted)(ids).logits, expected)
        exported = build_model(preset("tiny"))
        exported.load_state_dict(runs["dp_shard=2"]["state"])
        assert torch.equal(load_pretrained(runs["tmp"] / "hf_a")(ids).logits, exported(ids).logits)


def test_expert_major_order_by_hand():
    # Two source ranks, two local experts: received rows [r0e0 x2, r0e1 x1, r1e0 x1, r1e1 x3].
    received = torch.tensor([[2, 1], [1, 3]])
    # expert-major: e0 from r0 (rows 0, 1), e0 from r1 (row 3), e1 from r0 (row 2), e1 from r1 (rows 4-6)
    assert expert_major_order(received, total=7).tolist() == [0, 1, 3, 2, 4, 5, 6]
    assert expert_major_order(torch.tensor([[0, 0], [0, 2]]), total=2).tolist() == [0, 1]


def test_bad_mesh_settings_fail_at_once():
    with pytest.raises(ConfigError, match=r"ep=3 must divide dp_shard=4.*pick ep among \[1, 2, 4\]"):
        L.Trainer(accelerator="cpu", devices=4, strategy=LingParallelStrategy(dp_shard=4, ep=3), logger=False)
    with pytest.raises(ConfigError, match="needs 4 processes but the run has 2"):
        L.Trainer(accelerator="cpu", devices=2, strategy=LingParallelStrategy(dp_shard=4), logger=False)
    with pytest.raises(ConfigError, match="needs 8 processes but the run has 4"):
        ParallelDims(dp_replicate=2, dp_shard=4).check(4)
    with pytest.raises(ConfigError, match=r"ep=32 must divide num_experts=16 .* use one of \[1, 2, 4, 8, 16\]"):
        ParallelDims(dp_shard=32, ep=32).check(32, num_experts=16)
    with pytest.raises(ConfigError, match="activation_checkpointing='all' is not one of none, full, moe"):
        LingParallelStrategy(activation_checkpointing="all").validate(1)
    with pytest.raises(ConfigError, match="param_dtype='bf16' is not a dtype name; use one of float32, bfloat16"):
        LingParallelStrategy(param_dtype="bf16").validate(1)
    with pytest.raises(ConfigError, match="dp_replicate=3 must divide the 4 processes; pick one of \\[1, 2, 4\\]"):
        LingParallelStrategy(dp_replicate=3).validate(4)
    with pytest.raises(ConfigError, match="dp_replicate=0 must be a positive integer"):
        ParallelDims(dp_replicate=0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_generation_under_the_layout_matches_one_process(runs, layout):
    """SampleText generated with the sharded (and expert-parallel) model on both ranks; the same
    sampling from the gathered weights in one process gives the same text."""
    from callbacks.sample_text import SampleText

    model = build_model(preset("tiny"))
    model.load_state_dict(runs[layout]["state"])
    sample = SampleText(max_new_tokens=12)
    fake = type("T", (), {"datamodule": make_data(), "is_global_zero": False, "checkpoint_callbacks": []})()
    sample.on_train_end(fake, type("M", (), {"model": model, "device": torch.device("cpu")})())
    assert runs[layout]["sample"] == sample.text and len(sample.text) > len(sample.prompt)
