"""The documents of the offline tasks, built in memory from the project's own corpora each time a task loads.

Nothing is downloaded or written: the task YAMLs next to this file name these functions as their
`custom_dataset`, and lm-eval imports this file by its path (so it works from any working directory).
Every set is a pure function of the code, so two runs evaluate the same documents.

- Shakespeare: the scenes that lie wholly inside the held-out tail of the bundled corpus, the part
  `LingDataModule` keeps for validation (`val_fraction`, default 0.05, with the byte tokenizer), so no
  training row contains any of their text. Each document is a scene's opening, cut at a blank line
  within its first 2,000 characters, so that the whole set takes seconds on a CPU-sized model.
- Arithmetic: problems of the generator's `test` split (`ling.data.arithmetic.split_of`); the training
  corpus draws only `train` problems, so the two never share a problem whatever the seed or count.
  Multiple-choice distractors are the correct worked solution with one slip: one column's result off
  by 1 or 2, the written digit, the carries after it and the answer following from the slip. Each
  problem has 4 choices, so chance is 25%, and a model that does the columns right can tell them apart.
"""

from __future__ import annotations

import random

import datasets

from ling.data.arithmetic import ANSWER_PREFIX, Problem, arithmetic_problems
from ling.data.bundled import shakespeare_documents
from ling.data.tokenizer import load_tokenizer

__all__ = [
    "ARITHMETIC_GEN_COUNT",
    "ARITHMETIC_MAX_DIGITS",
    "ARITHMETIC_MC_COUNT",
    "ARITHMETIC_SEED",
    "CHOICES",
    "SHAKESPEARE_VAL_FRACTION",
    "arithmetic_gen",
    "arithmetic_mc",
    "arithmetic_mc_docs",
    "eval_problems",
    "heldout_shakespeare",
    "opening",
    "shakespeare_ppl",
    "slipped",
    "worked_steps",
]

# The held-out share `LingDataModule(val_fraction=...)` uses by default and the shipped configs keep.
SHAKESPEARE_VAL_FRACTION = 0.05
# The training corpus is `arithmetic_documents()`: seed 0, max_digits 3, train split. The eval sets use
# the same operand sizes; their own seed only picks which test-split problems.
ARITHMETIC_SEED = 2_000_003
ARITHMETIC_MAX_DIGITS = 3
ARITHMETIC_MC_COUNT = 200
ARITHMETIC_GEN_COUNT = 50  # generation is a forward per token: fewer problems than the scored choices
CHOICES = 4
SLIPS = (-2, -1, 1, 2)
PASSAGE_CHARS = 2000


def _as_test_split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ---- Shakespeare --------------------------------------------------------------------------------------
def heldout_shakespeare(val_fraction: float = SHAKESPEARE_VAL_FRACTION) -> list[tuple[int, str]]:
    """(index in `shakespeare_documents()`, text) of every scene that starts inside the held-out tail.

    The data module's stream is each document's tokens followed by EOS, back to back; its first
    int(len * (1 - val_fraction)) tokens are the training part, and no training row reads past it.
    """
    documents = shakespeare_documents()
    lengths = [len(ids) + 1 for ids in load_tokenizer("byte").encode_batch(documents)]
    split = int(sum(lengths) * (1 - val_fraction))
    held, start = [], 0
    for index, (text, length) in enumerate(zip(documents, lengths)):
        if start >= split:
            held.append((index, text))
        start += length
    return held


def opening(text: str, limit: int = PASSAGE_CHARS) -> str:
    """The text up to its last blank line within `limit` characters (all of it when shorter)."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[:cut] if cut > 0 else text[:limit]


def shakespeare_ppl(**_: object) -> datasets.DatasetDict:
    """`ling_shakespeare_ppl`: one row per held-out scene, its opening (`text`) and corpus index (`document`)."""
    return _as_test_split([{"document": i, "text": opening(text)} for i, text in heldout_shakespeare()])


# ---- arithmetic ---------------------------------------------------------------------------------------
def worked_steps(a: int, op: str, b: int, slip: tuple[int, int] | None = None) -> tuple[str, int] | None:
    """The worked lines and answer line of `a op b` in the training format, and the answer they reach.

    slip=(column, delta) adds delta to that column's result (column 0 is the rightmost) and works the
    rest from there, as a pupil who slipped once would. None when the slipped value is not one the
    column can produce, or the slip would make the result negative.
    """
    top, bottom = str(a), str(b)
    width = max(len(top), len(bottom))
    top, bottom = top.zfill(width), bottom.zfill(width)
    word = "carry" if op == "+" else "borrow"
    lines, answer, carry = [], 0, 0
    for column, (x, y) in enumerate(zip(reversed(top), reversed(bottom))):
        carry_in = carry
        value = int(x) + int(y) + carry if op == "+" else int(x) - int(y) - carry
        if slip is not None and slip[0] == column:
            value += slip[1]
            if not (0 <= value <= 19 if op == "+" else -10 <= value <= 9):
                return None
        digit = value % 10
        carry = value // 10 if op == "+" else int(value < 0)
        lines.append(f"{x}{op}{y}{op}{carry_in}={value}, write {digit}, {word} {carry}")
        answer += digit * 10**column
    if carry and op == "-":
        return None  # a borrow out of the top column: the slipped result is negative
    if carry:
        lines.append(f"0+0+1=1, write 1, {word} 0")
        answer += 10**width
    return "\n".join(lines) + f"\n{ANSWER_PREFIX}{answer}\n", answer


def slipped(problem: Problem) -> list[tuple[tuple[int, int], str, int]]:
    """Every valid one-slip variant of a problem: ((column, delta), worked text, answer)."""
    columns = max(len(str(problem.a)), len(str(problem.b)))
    variants = []
    for column in range(columns):
        for delta in SLIPS:
            worked = worked_steps(problem.a, problem.op, problem.b, (column, delta))
            if worked is not None:
                variants.append(((column, delta), *worked))
    return variants


def eval_problems(count: int, seed: int = ARITHMETIC_SEED) -> list[Problem]:
    """The first `count` distinct test-split problems of `seed` that have enough slips for the choices."""
    drawn = arithmetic_problems(4 * count, seed=seed, max_digits=ARITHMETIC_MAX_DIGITS, split="test")
    problems, seen = [], set()
    for problem in drawn:
        if problem.prompt not in seen and len(slipped(problem)) >= CHOICES - 1:
            seen.add(problem.prompt)
            problems.append(problem)
    if len(problems) < count:
        raise RuntimeError(f"only {len(problems)} distinct test-split problems for seed {seed}; draw more.")
    return problems[:count]


def arithmetic_mc_docs(count: int = ARITHMETIC_MC_COUNT, seed: int = ARITHMETIC_SEED) -> list[dict]:
    """Rows of `ling_arithmetic_mc`: the question line, 4 worked solutions and the index of the right one."""
    rng = random.Random(seed)
    rows = []
    for problem in eval_problems(count, seed):
        wrong = [worked for _, worked, _ in rng.sample(slipped(problem), CHOICES - 1)]
        choices = [problem.worked, *wrong]
        rng.shuffle(choices)
        rows.append(
            {
                "prompt": problem.prompt,
                "expression": f"{problem.a}{problem.op}{problem.b}",
                "answer": problem.answer,
                "choices": choices,
                "label": choices.index(problem.worked),
            }
        )
    return rows


def arithmetic_mc(**_: object) -> datasets.DatasetDict:
    """`ling_arithmetic_mc`."""
    return _as_test_split(arithmetic_mc_docs())


def arithmetic_gen(**_: object) -> datasets.DatasetDict:
    """`ling_arithmetic_gen`: the question line and the answer the model's `Answer:` line must give, for the
    first problems of the multiple-choice set."""
    rows = [
        {"prompt": p.prompt, "expression": f"{p.a}{p.op}{p.b}", "answer": p.answer}
        for p in eval_problems(ARITHMETIC_GEN_COUNT)
    ]
    return _as_test_split(rows)
