"""benchmarks/gpu_float8.py end to end on CPU at tiny sizes (its smoke path), and its answer when asked
for a GPU that is not there."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "benchmarks/gpu_float8.py"
SMOKE = (
    "--device cpu --hidden 128 --vocab 512 --layers 2 --seq 64 --batch 1 --steps 2 --warmup 1 --curve-steps 4 "
    "--no-compile --experts-recipe mxfp8_emulated"
).split()
ENV = {
    **os.environ,
    "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


def number(cell: str) -> float:
    value = float(cell.replace(",", "").rstrip("x%"))
    assert math.isfinite(value), cell
    return value


def test_cpu_smoke_run_ends_with_the_table():
    result = run(*SMOKE)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    header, columns, rule, *rows = lines[-6:]
    assert header.startswith("CPU") and "torch 2" in header and "torchao" in header and "--device cpu" in header
    assert columns.startswith("| setting |") and rule.startswith("|---")
    names = [c.strip() for c in columns.split("|")[1:-1]]
    table = {}
    for row in rows:
        cells = dict(zip(names, (c.strip() for c in row.split("|")[1:-1]), strict=True))
        table[cells["setting"]] = cells
    assert list(table) == ["bf16", "dense", "dense+experts"]
    assert [(t["dense"], t["experts"]) for t in table.values()] == [
        ("off", "off"), ("rowwise", "off"), ("rowwise", "mxfp8_emulated"),
    ]  # fmt: skip
    for cells in table.values():
        assert number(cells["tokens/s"]) > 0 and number(cells["speed-up"]) > 0
        assert cells["MFU"] == "n/a" and cells["peak GB"] == "n/a"  # no peak FLOP/s, no GPU memory on CPU
    assert table["bf16"]["speed-up"] == "1.00x"
    # loss curves: bf16 and the fastest fp8 setting, the same batches from the same seed
    loss, gap = names[-2], names[-1]
    curved = [name for name, cells in table.items() if cells[loss] != "-"]
    assert len(curved) == 2 and curved[0] == "bf16" and table["bf16"][gap] == "-"
    bf16_loss, fp8_loss = number(table["bf16"][loss]), number(table[curved[1]][loss])
    assert 0 < bf16_loss < 10 and 0 < fp8_loss < 10
    assert number(table[curved[1]][gap]) == pytest.approx((fp8_loss / bf16_loss - 1) * 100, abs=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_cuda_without_one_exits_2_with_one_sentence():
    result = run("--device", "cuda")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.startswith("error:") and "CUDA" in message and "\n" not in message
    assert result.stdout == ""
