"""CPU benchmark: `eval.LingLM` on the tiny preset, loglikelihood requests/s and generation tokens/s.

Loglikelihood: 128 requests of a 40-160 byte context and a 4-24 byte continuation (the shape of a
multiple-choice task), scored through `LingLM.loglikelihood`, which sorts them by length and runs
`batch_size` rows per forward. Generation: 16 prompts of 48 bytes, 32 new tokens each (no stop
strings, so every row runs to max_gen_toks unless it draws EOS), through `LingLM.generate_until`.
Both batch sizes must give the same log-likelihoods (checked before the table is printed).

    .venv/bin/python benchmarks/lm_eval_cpu.py                    # 1 thread, batch 1 and 16
    .venv/bin/python benchmarks/lm_eval_cpu.py --threads 8 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# Runnable from a checkout: eval/ is never installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import eval.lm as eval_lm  # noqa: E402
from ling.data.tokenizer import ByteTokenizer  # noqa: E402
from ling.model import build_model  # noqa: E402
from ling.presets import preset  # noqa: E402

WORDS = "the of and a to in is was that for it with as his on be at by had not are but from or have an they".split()


def text(rng: random.Random, length: int) -> str:
    out = ""
    while len(out) < length:
        out += rng.choice(WORDS) + " "
    return out[:length]


def loglikelihood_requests(n: int, seed: int = 0) -> list[Instance]:
    rng = random.Random(seed)
    pairs = [(text(rng, rng.randint(40, 160)).rstrip(), " " + text(rng, rng.randint(3, 23))) for _ in range(n)]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def generation_requests(n: int, new_tokens: int, seed: int = 1) -> list[Instance]:
    rng = random.Random(seed)
    kwargs = {"until": [], "max_gen_toks": new_tokens, "do_sample": False}
    return [Instance("generate_until", {}, (text(rng, 48), dict(kwargs)), i) for i in range(n)]


class CountTokens:
    """Wraps the generation loop to count the tokens it really produced (EOS can end a row early)."""

    def __init__(self):
        self.original, self.tokens = eval_lm.generate, 0

    def __call__(self, *args, **kwargs):
        rows = self.original(*args, **kwargs)
        self.tokens += sum(map(len, rows))
        return rows


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    ll_reqs = loglikelihood_requests(args.requests)
    gen_reqs = generation_requests(16, args.new_tokens)
    counter = CountTokens()
    eval_lm.generate = counter

    rows, reference = [], None
    for batch_size in args.batch_sizes:
        lm = eval_lm.LingLM(model=model, ling_tokenizer=ByteTokenizer(), batch_size=batch_size)
        seconds, scores = timed(lambda lm=lm: lm.loglikelihood(ll_reqs, disable_tqdm=True), args.repeats)
        if reference is None:
            reference = scores
        worst = max(abs(a - b) for (a, _), (b, _) in zip(scores, reference))
        if worst > 1e-4:
            raise SystemExit(f"batch_size={batch_size} changes a log-likelihood by {worst:.2e}; not timing it.")
        counter.tokens = 0
        gen_seconds, _ = timed(lambda lm=lm: lm.generate_until(gen_reqs, disable_tqdm=True), args.repeats)
        tokens = counter.tokens // (args.repeats + 1)
        rows.append((batch_size, args.requests / seconds, tokens, tokens / gen_seconds))

    print(f"tiny preset ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), fp32, "
          f"{args.threads} threads, torch {torch.__version__}; best of {args.repeats}")  # fmt: skip
    print(f"{'batch':>5} {'loglikelihood req/s':>20} {'gen tokens/run':>15} {'gen tokens/s':>13}")
    for batch_size, req_s, tokens, tok_s in rows:
        print(f"{batch_size:>5} {req_s:>20,.1f} {tokens:>15,} {tok_s:>13,.1f}")


if __name__ == "__main__":
    main()
