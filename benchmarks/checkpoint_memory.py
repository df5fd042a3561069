"""Peak memory of loading and exporting a Hugging Face checkpoint, one process vs 2 ranks (FSDP2 + ep=2).

Builds a ~0.9 GB bf16 checkpoint (4 layers, 3 of them MoE with 96 experts of 1024 x 512), then:
- one process: `load_pretrained` in fp32 and `save_pretrained` in bf16;
- 2 gloo ranks (torchrun, `tests/dist/sharded_io.py`): the sharded load, where each rank reads only
  its slices, and the bf16 export, where rank 0 writes while both ranks gather one tensor at a time.
Prints the peak RSS growth of each step (Linux VmHWM after resetting it) next to what it is compared with.

    .venv/bin/python benchmarks/checkpoint_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dist"))

import torch  # noqa: E402
from sharded_io import memory_config, peak_rss_mb, reset_peak  # noqa: E402

from ling.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from ling.model import build_model  # noqa: E402

SHARD = "300MB"
MB = 2**20


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(memory_config(), dtype=torch.bfloat16)
        save_pretrained(model, tmp / "hf", max_shard_size="200MB")
        del model
        files = [p.stat().st_size / MB for p in (tmp / "hf").glob("*.safetensors")]
        file_mb, largest_file_mb = sum(files), max(files)

        before = reset_peak()
        loaded = load_pretrained(tmp / "hf", dtype=torch.float32)
        one_load = peak_rss_mb() - before
        model_mb = sum(t.nbytes for t in loaded.state_dict().values()) / MB
        before = reset_peak()
        save_pretrained(loaded, tmp / "one", max_shard_size=SHARD, dtype=torch.bfloat16)
        one_export = peak_rss_mb() - before
        del loaded

        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   str(ROOT / "tests" / "dist" / "sharded_io.py"), "--hf", str(tmp / "hf"), "--export",
                   str(tmp / "two"), "--out", str(tmp / "r.pt")]  # fmt: skip
        subprocess.run(command, check=True, env=env, capture_output=True)
        ranks = torch.load(tmp / "r.pt", weights_only=True)[0]["ranks"]

    print(f"checkpoint: {file_mb:,.0f} MB bf16 on disk in {len(files)} files (largest {largest_file_mb:,.0f} MB); "
          f"the model in fp32: {model_mb:,.0f} MB; export shards {SHARD}")  # fmt: skip
    print(f"{'step':<44}{'peak RSS growth MB':>20}{'compare with':>34}")
    label = f"model {model_mb:,.0f} + one file {largest_file_mb:,.0f}"
    print(f"{'one process: load (fp32)':<44}{one_load:>20,.0f}{label:>34}")
    print(f"{'one process: export (bf16)':<44}{one_export:>20,.0f}{f'one shard <= {SHARD}':>34}")
    for rank, r in enumerate(ranks):
        label = f"shard {r['local_bytes'] / MB:,.0f} + one file {largest_file_mb:,.0f}"
        print(f"{f'2 ranks, ep=2: rank {rank} load':<44}{r['load_peak_mb']:>20,.0f}{label:>34}")
    for rank, r in enumerate(ranks):
        role = "writes" if rank == 0 else "gathers only"
        label = f"largest tensor {r['largest_mb']:,.0f}"
        print(f"{f'2 ranks, ep=2: rank {rank} export ({role})':<44}{r['export_peak_mb']:>20,.0f}{label:>34}")


if __name__ == "__main__":
    main()
