"""mini: Ling-mini-2.0 (16.26B total, 1.43B active), trained as in the Ling 2.0 report.

Report values: peak LR 3.36e-4, warmup 2,000 steps, batch 4,400 sequences of 4,096 tokens, ramp from
3,024 over ~500B tokens; the MTP weight 0.1 and init std 0.006 are the preset's, the bias update 1e-3
(1e-4 after context extension) the shared training settings' (recipes/common.py).

Layout: 2 nodes x 8 H100-80GB, EP 8 (one node's NVLink domain), full activation checkpointing,
micro-batch 1. Every ramp batch must be a multiple of ranks x micro-batch; 16 = gcd(3024, 4400) is
the largest data-parallel size that allows it, so mini runs on 16 GPUs (the report's own
throughput table measures 8/16/32 GPUs). accumulate_grad_batches = 4400 / 16 = 275 (189 at the
ramp's start); the ramp adds 16 sequences (one micro-batch per rank) 86 times.
"""

from recipes.report import report_recipe

MINI = report_recipe("mini", peak_lr=3.36e-4, global_batch=4400, nodes=2, ep=8)
