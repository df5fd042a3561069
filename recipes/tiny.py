"""tiny: the CPU-sized preset with every architectural feature on, for demos and tests.

No batch ramp; a high LR and a short warmup so the CPU demo (`configs/tiny.yaml`, 1,000 steps of
2,048 tokens) shows the loss fall in a few minutes. One device (the memory estimate calls it a GPU)
with micro-batches of 8 x 128 tokens: 2 micro-batches per step, so gradient accumulation is
exercised too.

The stages are the report's in miniature, on the bundled corpora (Shakespeare's plays and worked
arithmetic): 128-token rows with a 70/30 text/reasoning mix, 256-token rows with 55/45 and the
lower bias-update rate, then 512-token rows reached by YaRN (factor 2 on 256), as Ling reaches 128K
from 32K. Tokens per step stay at 2,048, so the rows per micro-batch go 8 -> 4 -> 2.

Deterministic (torch's deterministic algorithms, about 3% slower here): two runs of the demo, and a
run resumed from a checkpoint, repeat each other's losses bit for bit (tests/test_reproducibility.py).
When training ends the demo scores itself on the offline tasks and merges its last stage's snapshots
(WSM), both sized to take seconds.
"""

from ling.data.curriculum import Stage
from ling.data.sources import SourceSpec
from recipes.common import ADAMW, PLUGINS, TRAINING, callbacks, loggers
from recipes.recipe import Recipe

SEQ_LEN, GLOBAL_BATCH, EVERY = 128, 16, 500
OUT_DIR = "outputs/tiny"


def demo_lm_eval(recipe: Recipe) -> dict:
    """Score the trained demo model once, when training ends, on the offline tasks (eval/tasks): all of
    the multiple-choice set, the first 50 generation problems and 10 held-out scenes keep the demo's
    evaluation to seconds. Windows as long as the longest training rows, the context it was trained for."""
    data = recipe.settings("data")
    longest = max(stage.seq_len or data["seq_len"] for stage in data["stages"])
    return {
        "class_path": "callbacks.lm_eval.LMEval",
        "init_args": {
            "tasks": ["ling_arithmetic_mc", "ling_arithmetic_gen", "ling_shakespeare_ppl"],
            "at_stage_end": False,
            "limit": {"ling_arithmetic_gen": 50, "ling_shakespeare_ppl": 10},
            "max_length": longest,
        },
    }


def demo_wsm(recipe: Recipe, count: int = 10) -> dict:
    """Merge the demo's last stage (constant LR, one rope setting): `count` snapshots evenly over it, the
    last at the final step, with 1-sqrt weights; one merge, so its evaluation costs seconds."""
    curriculum, last, steps = recipe.curriculum(), len(recipe.data["stages"]) - 1, recipe.max_steps
    start = next(step for step in range(steps) if curriculum.at(step).stage == last)
    interval = (steps - start) // count
    return {
        "class_path": "callbacks.wsm.WSM",
        "init_args": {"interval": interval, "count": count, "shape": "1-sqrt", "start_step": steps - count * interval},
    }


_RUN = Recipe(
    name="tiny",
    train_tokens=1000 * GLOBAL_BATCH * SEQ_LEN,
    trainer={
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 1,
        "precision": "32-true",
        # torch's deterministic algorithms, so that reruns and resumes repeat the losses bit for bit
        "deterministic": True,
        "log_every_n_steps": 25,
        "val_check_interval": EVERY,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "default_root_dir": OUT_DIR,
        "logger": loggers(OUT_DIR, tensorboard=False),
        "callbacks": callbacks(EVERY, export_dtype=None, rope_scaling=None),
        "plugins": PLUGINS,
    },
    model={
        "model": "tiny",
        "model_overrides": None,
        **TRAINING,
        "optimizer": {"lr": 3e-3, **ADAMW},
        "schedule": {"name": "wsm", "warmup_steps": 30},
    },
    data={
        "sources": {"shakespeare": SourceSpec("shakespeare"), "arithmetic": SourceSpec("arithmetic")},
        "tokenizer": "byte",
        "seq_len": SEQ_LEN,
        "micro_batch_size": 8,
        "global_batch_size": GLOBAL_BATCH,
        "batch_ramp": None,
        "batch_mode": "tokens",
        "stages": [
            Stage(
                "short",
                tokens=600 * GLOBAL_BATCH * SEQ_LEN,
                seq_len=128,
                mixture={"shakespeare": 0.7, "arithmetic": 0.3},
            ),
            Stage(
                "long",
                tokens=250 * GLOBAL_BATCH * SEQ_LEN,
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
        ],
    },
    gpu_memory_gb=8.0,
)
TINY = _RUN.with_args(trainer={"callbacks": _RUN.trainer["callbacks"] + [demo_lm_eval(_RUN), demo_wsm(_RUN)]})
