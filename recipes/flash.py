"""flash: Ling-flash-2.0 (102.9B total, 6.1B active), trained as in the Ling 2.0 report.

Report values: peak LR 2.61e-4, warmup 2,000 steps, batch 8,352 sequences of 4,096 tokens, ramp from
3,024 over ~500B tokens; the MTP weight 0.1 and init std 0.006 are the preset's, the bias update 1e-3
(1e-4 after context extension) the shared training settings' (recipes/common.py).

Layout: 18 nodes x 8 H100-80GB = 144 ranks, EP 8 (intra-node all-to-all), full activation
checkpointing, micro-batch 1. 144 = gcd(3024, 8352), so every ramp batch is whole micro-batches per
rank: accumulate_grad_batches = 8352 / 144 = 58 (21 at the ramp's start); the ramp adds 144
sequences 37 times. 9 nodes (72 ranks) would also fit on paper (about 51 GB); 18 leave room for
the routing imbalance of early dropless training.
"""

from recipes.report import report_recipe

FLASH = report_recipe("flash", peak_lr=2.61e-4, global_batch=8352, nodes=18, ep=8)
