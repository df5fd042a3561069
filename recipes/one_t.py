"""1t: Ling-1T (999.7B total, 51B active), trained as in the Ling 2.0 report. Registry key "1t".

Report values: peak LR 1.86e-4, warmup 2,000 steps, batch 18,144 sequences of 4,096 tokens, ramp
from 3,024 over ~500B tokens; the MTP weight 0.1 and init std 0.006 are the preset's, the bias update
1e-3 (1e-4 after context extension) the shared training settings' (recipes/common.py).

Layout: 126 nodes x 8 H100-80GB = 1,008 ranks, EP 16 (two nodes), full activation checkpointing,
micro-batch 1. 1,008 divides both 3,024 and 18,144, so accumulate_grad_batches is 3 at the ramp's
start and 18 at the full batch; the ramp adds 1,008 sequences 15 times. EP 32 or 64 would need 32 to
divide the rank count, and no rank count divisible by 32 divides 3,024 (= 2^4 x 189): EP 16 is the
largest that keeps every ramp batch whole. (The report trained on 2,016 GPUs with PP 21 x EP 8.)

The config runs the 20T tokens of 4K pre-training only. The report's two 32K stages (150B tokens of
context extension, 600B of reasoning pre-activation) are kept in `left_out` and are not in
configs/1t.yaml, because no layout this strategy can build fits them in 80 GB: a micro-batch cannot
hold less than one 32,768-token row, and for that row full checkpointing keeps the 80 block inputs
(80 x 32,768 x 8,192 bf16 values, 43 GB; 46 GB with the MTP and head inputs) while the MTP block is
recomputed (33 GB more). These 79 GB of activations belong to the row, so more nodes or a larger EP,
which only shard the 16 GB of weights, gradients and AdamW state further, leave the estimate above
100 GB per GPU; checkpointing only the MoE part keeps far more, and the loss is already computed in
chunks (4.5 GB). Fitting them needs a row split over GPUs (context or pipeline parallelism, which
this project does not have) or larger GPUs: on 141 GB H200s the same layout fits on paper
(`python -m recipes.describe 1t --gpu-memory-gb 141` prints the left-out stages' memory too).
Without a 32K stage the exported checkpoint gets no YaRN setting: it is a 4K model.
"""

from recipes.report import report_recipe

REASON = (
    "one 32,768-token row per micro-batch does not fit in 80 GB per GPU on any layout this strategy "
    "can build: its activations under full checkpointing do not shrink with more nodes or a larger EP, "
    "and splitting a row over GPUs (context parallelism) does not exist here"
)

ONE_T = report_recipe(
    "1t", peak_lr=1.86e-4, global_batch=18144, nodes=126, ep=16,
    leave_out=("long_context", "reasoning"), reason=REASON,
)  # fmt: skip
