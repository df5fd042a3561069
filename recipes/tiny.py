"""tiny: the CPU-sized preset with every architectural feature on, for demos and tests.

No batch ramp; a high LR and a short warmup so a few hundred steps on a laptop show the loss fall.
One device (the planner calls it a GPU) with micro-batches of 4 rows: 16 / (1 x 4) = 4 accumulation
steps, so gradient accumulation is exercised too.
"""

from ling.planner import ParallelLayout
from recipes import Recipe

SEQ_LEN = 128
MICRO_BATCH = 4

TINY = Recipe(
    name="tiny",
    preset="tiny",
    peak_lr=3e-3,
    warmup_steps=20,
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
