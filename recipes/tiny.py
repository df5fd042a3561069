"""tiny: the CPU-sized preset with every architectural feature on, for demos and tests.

No batch ramp; a high LR and a short warmup so the CPU demo (`configs/tiny.yaml`, 1,000 steps of
2,048 tokens) shows the loss fall in a few minutes. One device (the planner calls it a GPU) with
micro-batches of 8 x 128 tokens: 2 micro-batches per step, so gradient accumulation is exercised too.

The data plan is the report's in miniature, on the bundled corpora (Shakespeare's plays and worked
arithmetic): 128-token rows with a 70/30 text/reasoning mix, 256-token rows with 55/45 and the
lower bias-update rate, then 512-token rows reached by YaRN (factor 2 on 256), as Ling reaches 128K
from 32K. Tokens per step stay at 2,048, so the rows per micro-batch go 8 -> 4 -> 2.

Deterministic (torch's deterministic algorithms, about 3% slower here): two runs of the demo, and a
run resumed from a checkpoint, repeat each other's losses bit for bit (tests/test_reproducibility.py).
"""

from ling.data.curriculum import Stage
from ling.data.sources import SourceSpec
from ling.planner import ParallelLayout
from recipes import Recipe

SEQ_LEN = 128
MICRO_BATCH = 8

TINY = Recipe(
    name="tiny",
    preset="tiny",
    peak_lr=3e-3,
    warmup_steps=30,
    train_tokens=1000 * 16 * SEQ_LEN,
    sources={"shakespeare": SourceSpec("shakespeare"), "arithmetic": SourceSpec("arithmetic")},
    stages=[
        Stage("short", tokens=600 * 16 * SEQ_LEN, seq_len=128, mixture={"shakespeare": 0.7, "arithmetic": 0.3}),
        Stage(
            "long",
            tokens=250 * 16 * SEQ_LEN,
            seq_len=256,
            mixture={"shakespeare": 0.55, "arithmetic": 0.45},
            bias_update_rate=1e-4,
        ),
        Stage(
            "yarn",
            seq_len=512,
            mixture={"shakespeare": 0.5, "arithmetic": 0.5},
            bias_update_rate=1e-4,
            rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256},
        ),
    ],  # fmt: skip
    global_batch=16,
    seq_len=SEQ_LEN,
    micro_batch=MICRO_BATCH,
    deterministic=True,
    layout=ParallelLayout(
        nodes=1,
        gpus_per_node=1,
        ep=1,
        activation_checkpointing="none",
        micro_batch=MICRO_BATCH,
        seq_len=SEQ_LEN,
        gpu_memory_gb=8.0,
    ),
)
