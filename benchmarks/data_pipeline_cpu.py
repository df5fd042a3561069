"""CPU throughput of the data pipeline: tokenise (datasets.map, cold cache), pack into step batches, and
the share of a training step spent producing its batch in the tiny demo.

    python benchmarks/data_pipeline_cpu.py [--steps 100]

Tokenisers: the byte tokenizer, and a byte-level BPE (8,192 tokens, `tokenizers` library) trained
once on the bundled Shakespeare, standing in for a real Hugging Face tokenizer without a download.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

# recipes/ is used from the checkout, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from ling.data.bundled import shakespeare_documents  # noqa: E402
from ling.data.datamodule import LingDataModule  # noqa: E402
from ling.data.sources import SourceSpec, load_source  # noqa: E402
from ling.data.tokenize import tokenize_source  # noqa: E402
from ling.data.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from ling.lightning_module import LingModule  # noqa: E402
from ling.optim import OptimizerConfig  # noqa: E402
from ling.schedules import ScheduleConfig  # noqa: E402
from recipes import get_recipe  # noqa: E402


def bpe_tokenizer(folder: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>"],
    )  # fmt: skip
    raw.train_from_iterator(shakespeare_documents(), trainer=trainer)
    raw.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


def tokenise_rows(work: Path) -> list[tuple]:
    data = load_source("shakespeare", SourceSpec("shakespeare"))
    characters = sum(len(t) for t in data["text"])
    rows = []
    for label, tokenizer in (("byte", ByteTokenizer()), ("BPE 8192", load_tokenizer(bpe_tokenizer(work)))):
        for num_proc in (1, 2):
            cache = work / f"cache-{label}-{num_proc}".replace(" ", "")
            start = time.perf_counter()
            out = tokenize_source("shakespeare", data, tokenizer, cache_dir=cache, num_proc=num_proc)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            tokenize_source("shakespeare", data, tokenizer, cache_dir=cache, num_proc=num_proc)
            warm = time.perf_counter() - start
            tokens = sum(len(ids) for ids in out["input_ids"])
            rows.append((label, num_proc, characters, tokens, cold, tokens / cold, warm))
    return rows


def tiny_data(work: Path, steps: int) -> LingDataModule:
    """The demo's data module, with the stage budgets scaled to `steps` steps (60% / 25% / rest)."""
    data = get_recipe("tiny").data
    stages = copy.deepcopy(data["stages"])
    per_step = data["global_batch_size"] * data["seq_len"]
    stages[0] = dataclasses.replace(stages[0], tokens=int(steps * 0.6) * per_step)
    stages[1] = dataclasses.replace(stages[1], tokens=int(steps * 0.25) * per_step)
    return LingDataModule(**{**data, "stages": stages, "cache_dir": str(work / "cache-demo")})


def pack_rows(work: Path, steps: int) -> list[tuple]:
    data = tiny_data(work, steps)
    data.setup("fit")
    rows = []
    for stage in range(len(data.stages)):
        stage_steps = [s for s in range(steps) if data.curriculum.at(s).stage == stage]
        start = time.perf_counter()
        tokens = sum(data.step_batch(s, 0)["input_ids"].numel() for s in stage_steps)
        elapsed = time.perf_counter() - start
        rows.append((data.stages[stage].name, data.curriculum.at(stage_steps[0]).seq_len, len(stage_steps),
                     tokens / elapsed, 1e3 * elapsed / len(stage_steps)))  # fmt: skip
    return rows


def demo_share(work: Path, steps: int) -> tuple[float, float, int]:
    """(seconds producing batches, seconds of the whole fit loop) for `steps` demo steps."""
    data = tiny_data(work, steps)
    spent = [0.0]
    produce = data.step_batch

    def timed(step, rank):
        start = time.perf_counter()
        batch = produce(step, rank)
        spent[0] += time.perf_counter() - start
        return batch

    data.step_batch = timed
    args = get_recipe("tiny").model
    torch.manual_seed(0)
    module = LingModule(**{**args, "optimizer": OptimizerConfig(**args["optimizer"]),
                           "schedule": ScheduleConfig(**args["schedule"])})  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=work,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return spent[0], time.perf_counter() - start, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="demo steps to time (stages scaled to fit)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenise = tokenise_rows(work)
        pack = pack_rows(work, args.steps)
        data_s, total_s, steps = demo_share(work, args.steps)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\nTokenise the bundled Shakespeare (datasets.map, cold cache; warm = cache hit)")
    print(f"{'tokenizer':<10} {'procs':>5} {'chars':>10} {'tokens':>10} {'cold s':>7} {'tokens/s':>11} {'warm s':>7}")
    for label, procs, chars, tokens, cold, rate, warm in tokenise:
        print(f"{label:<10} {procs:>5} {chars:>10,} {tokens:>10,} {cold:>7.2f} {rate:>11,.0f} {warm:>7.2f}")
    print("\nPack step batches of the tiny curriculum (one rank, 2,048 tokens per step)")
    print(f"{'stage':<8} {'seq_len':>7} {'steps':>6} {'tokens/s':>11} {'ms/step':>8}")
    for name, seq_len, count, rate, ms in pack:
        print(f"{name:<8} {seq_len:>7} {count:>6} {rate:>11,.0f} {ms:>8.2f}")
    print(f"\nDemo training, {steps} steps: {total_s:.1f} s in fit, {data_s:.2f} s producing batches "
          f"= {100 * data_s / total_s:.1f}% of step time")  # fmt: skip


if __name__ == "__main__":
    main()
