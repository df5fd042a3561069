"""tiny: the CPU-sized preset with every architectural feature on, for demos and tests.

No batch ramp; a high LR and a short warmup so the CPU demo (`configs/tiny.yaml`, 1,000 steps of
16 x 128 tokens) shows the loss fall in a few minutes. One device (the planner calls it a GPU) with
micro-batches of 8 rows: 16 / (1 x 8) = 2 micro-batches per step, so gradient accumulation is
exercised too.
"""

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
    global_batch=16,
    seq_len=SEQ_LEN,
    micro_batch=MICRO_BATCH,
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
