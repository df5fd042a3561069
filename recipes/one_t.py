"""1t: Ling-1T (999.7B total, 51B active), trained as in the Ling 2.0 report. Registry key "1t".

Report values: peak LR 1.86e-4, warmup 2,000 steps, batch 18,144 sequences of 4,096 tokens, ramp
from 3,024 over ~500B tokens, MTP weight 0.1, bias update 1e-3 (1e-4 after context extension).

Layout: 126 nodes x 8 H100-80GB = 1,008 ranks, EP 16 (two nodes), full activation checkpointing,
micro-batch 1. 1,008 divides both 3,024 and 18,144, so accumulate_grad_batches is 3 at the ramp's
start and 18 at the full batch; the ramp adds 1,008 sequences 15 times. EP 32 or 64 would need 32 to
divide the rank count, and no rank count divisible by 32 divides 3,024 (= 2^4 x 189): EP 16 is the
largest that keeps every ramp batch whole. (The report trained on 2,016 GPUs with PP 21 x EP 8.)
"""

from recipes import report_recipe

ONE_T = report_recipe("1t", peak_lr=1.86e-4, global_batch=18144, nodes=126, ep=16)
