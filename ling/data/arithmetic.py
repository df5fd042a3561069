"""Generated column arithmetic with worked steps: a reasoning corpus a tiny byte-level model can learn on a CPU.

Every step line is a local computation: it restates the two digits of one column (right to left) and the carry
or borrow from the line above, then their result, the digit written and the carry or borrow passed on. The
answer is the written digits read bottom to top, alone on an `Answer:` line an evaluator can parse. A problem
belongs to the `test` split when a CRC-32 of its text falls in one of 20 buckets, so `train` and `test` never
share a problem and a model evaluated on `test` has not seen those exact problems.

A document (prompt + worked) looks like::

    Q: 347+584
    7+4+0=11, write 1, carry 1
    4+8+1=13, write 3, carry 1
    3+5+1=9, write 9, carry 0
    Answer: 931
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from ling.data.errors import DataError

__all__ = ["OPS", "SPLITS", "Problem", "arithmetic_documents", "arithmetic_problems", "make_problem", "split_of"]

OPS = ("+", "-")
SPLITS = ("train", "test")
TEST_BUCKETS = 20
ANSWER_PREFIX = "Answer: "


@dataclass(frozen=True)
class Problem:
    """One problem: `prompt` is the question line, `worked` the step lines through the answer line."""

    a: int
    b: int
    op: str
    prompt: str
    worked: str
    answer: str

    @property
    def document(self) -> str:
        return self.prompt + self.worked


def split_of(a: int, op: str, b: int) -> str:
    """The split a problem belongs to: stable across processes (unlike `hash()` of a string)."""
    bucket = zlib.crc32(f"{a}{op}{b}".encode()) % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def make_problem(a: int, op: str, b: int) -> Problem:
    """`a op b` with its worked column steps; subtraction needs `a >= b` so every answer is a plain digit string."""
    if op not in OPS:
        raise DataError(f"arithmetic operator {op!r} is not supported; use one of {', '.join(OPS)}.")
    if a < 0 or b < 0 or (op == "-" and a < b):
        raise DataError(f"arithmetic problem {a}{op}{b} needs non-negative operands with the first not smaller.")
    top, bottom = str(a), str(b)
    width = max(len(top), len(bottom))
    top, bottom = top.zfill(width), bottom.zfill(width)
    word = "carry" if op == "+" else "borrow"
    lines, written, carry = [], [], 0
    for x, y in zip(reversed(top), reversed(bottom)):
        carry_in = carry
        if op == "+":
            value = int(x) + int(y) + carry
            digit, carry = value % 10, value // 10
        else:
            value = int(x) - int(y) - carry
            digit, carry = value % 10, int(value < 0)
        lines.append(f"{x}{op}{y}{op}{carry_in}={value}, write {digit}, {word} {carry}")
        written.append(digit)
    if carry:
        # A carry out of the top column becomes one more column of zeros, so the last step is like the others.
        lines.append(f"0+0+1=1, write 1, {word} 0")
        written.append(1)
    answer = "".join(str(d) for d in reversed(written)).lstrip("0") or "0"
    prompt = f"Q: {a}{op}{b}\n"
    worked = "\n".join(lines) + f"\n{ANSWER_PREFIX}{answer}\n"
    return Problem(a=a, b=b, op=op, prompt=prompt, worked=worked, answer=answer)


def _operand(rng: random.Random, max_digits: int) -> int:
    # A digit count first, then a value with that many digits, so short operands are as common as long ones.
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def arithmetic_problems(
    count: int, seed: int = 0, max_digits: int = 3, split: str = "train", ops: str = "+-"
) -> list[Problem]:
    """`count` problems of one split, the same for the same arguments; operands have 1 to `max_digits` digits."""
    if count < 0:
        raise DataError(f"arithmetic problem count {count} is negative; use 0 or more.")
    if max_digits < 1:
        raise DataError(f"arithmetic max_digits {max_digits} is below 1; use 1 or more.")
    if split not in SPLITS:
        raise DataError(f"arithmetic split {split!r} is unknown; use one of {', '.join(SPLITS)}.")
    if not ops or any(op not in OPS for op in ops):
        raise DataError(f"arithmetic ops {ops!r} must be a non-empty string of {''.join(OPS)}.")
    rng = random.Random(seed)
    problems: list[Problem] = []
    # Rejection sampling: one problem in 20 is in `test`; the cap only trips when a split has no problems at all.
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 1000 + 100 * TEST_BUCKETS * count:
            raise DataError(f"arithmetic split {split!r} has too few problems with max_digits {max_digits}.")
        op = rng.choice(ops)
        a, b = _operand(rng, max_digits), _operand(rng, max_digits)
        if op == "-" and a < b:
            a, b = b, a
        if split_of(a, op, b) == split:
            problems.append(make_problem(a, op, b))
    return problems


def arithmetic_documents(count: int = 20000, seed: int = 0, max_digits: int = 3) -> list[str]:
    """Train-split problems as documents (question, steps and answer line)."""
    return [p.document for p in arithmetic_problems(count, seed=seed, max_digits=max_digits, split="train")]
