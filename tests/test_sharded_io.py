"""Sharded load and export: 2 gloo ranks with FSDP2 + ep=2 read only their own slices of a HF folder
(bf16 and blockwise fp8) and get exactly the one-process weights; their bf16 export is the one-process
export byte for byte; and each rank's peak memory stays at about its share of the model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from sharded_io import memory_config  # noqa: E402

from ling import preset
from ling.checkpoint import load_pretrained, save_pretrained
from ling.checkpoint.fp8 import FP8_DTYPE
from ling.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str) -> list[dict]:
    out = Path(args[args.index("--out") + 1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/sharded_io.py", *args]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def trained_like(config, seed=0):
    torch.manual_seed(seed)
    model = build_model(config)
    for moe in model.moe_layers():
        moe.gate.expert_bias.normal_(0, 0.01)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model as bf16 and as blockwise-fp8 HF folders (sharded into several files), the 2-rank
    load of both (gathered) and the 2-rank bf16 export of the first."""
    tmp = tmp_path_factory.mktemp("sharded_io")
    model = trained_like(preset("tiny"))
    save_pretrained(model, tmp / "bf16", max_shard_size="100KB", dtype=torch.bfloat16)
    save_pretrained(model, tmp / "fp8", max_shard_size="100KB", dtype=FP8_DTYPE)
    runs = torchrun("--hf", str(tmp / "bf16"), "--hf", str(tmp / "fp8"), "--export", str(tmp / "export"),
                    "--gather", "--out", str(tmp / "runs.pt"))  # fmt: skip
    return tmp, runs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_two_rank_load_equals_one_process_load(folders, kind):
    tmp, runs = folders
    run = runs[["bf16", "fp8"].index(kind)]
    expected = load_pretrained(tmp / kind, dtype=torch.float32).state_dict()
    assert run["state"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(run["state"][name], value), name
    assert any(name.endswith("expert_bias") and value.abs().sum() > 0 for name, value in expected.items())


@pytest.mark.slow
def test_two_rank_bf16_export_is_the_one_process_export_byte_for_byte(folders, tmp_path):
    tmp, _ = folders
    single = load_pretrained(tmp / "bf16", dtype=torch.float32)
    save_pretrained(single, tmp_path / "single", max_shard_size="300MB", dtype=torch.bfloat16)
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (tmp / "export").iterdir())
    for name in names:
        assert (tmp_path / "single" / name).read_bytes() == (tmp / "export" / name).read_bytes(), name


@pytest.mark.slow
def test_each_rank_holds_its_share_not_the_model(tmp_path):
    """Peak RSS growth of the sharded load is about the rank's fp32 shard plus the pages it read of the
    one file open at a time (a 200 MB shard file); loading the whole checkpoint on each rank and
    keeping its shard, as before, needs the full fp32 model on top. The export's extra peak on the
    writing rank is about one shard file."""
    model = build_model(memory_config(), dtype=torch.bfloat16)
    save_pretrained(model, tmp_path / "hf", max_shard_size="200MB")
    largest_file = max(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    full_fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    del model
    (run,) = torchrun("--hf", str(tmp_path / "hf"), "--export", str(tmp_path / "out"), "--out", str(tmp_path / "r.pt"))
    mb = 2**20
    for rank in run["ranks"]:
        assert rank["load_peak_mb"] < (rank["local_bytes"] + largest_file) / mb + 64, rank
        assert rank["load_peak_mb"] < 0.6 * (full_fp32 + rank["local_bytes"]) / mb
    # Both ranks take part in the same gathers, one tensor at a time; only rank 0 writes. What rank 0
    # needs beyond rank 1 is the shard file it fills (at most 300 MB) and the tensor it is cutting up.
    writer, other = run["ranks"]
    assert writer["export_peak_mb"] - other["export_peak_mb"] < 300 * 10**6 / mb + writer["largest_mb"] + 32
    assert other["export_peak_mb"] < 4 * writer["largest_mb"]  # the gathers never hold the model
