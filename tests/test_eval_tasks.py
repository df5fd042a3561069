"""The offline lm-eval tasks in eval/tasks/: they load from any working directory, the arithmetic problems
are never training problems and are scored against Python's own arithmetic, and the Shakespeare documents
lie wholly in the data module's held-out tail."""

import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # eval/ is used from the checkout, like callbacks/
    sys.path.insert(0, str(ROOT))

from lm_eval.tasks import TaskManager  # noqa: E402

from eval.__main__ import TASKS_DIR  # noqa: E402
from eval.tasks import task_data  # noqa: E402
from ling.data.arithmetic import arithmetic_documents, arithmetic_problems, make_problem, split_of  # noqa: E402
from ling.data.bundled import bundled_documents, shakespeare_documents  # noqa: E402
from ling.data.datamodule import LingDataModule  # noqa: E402

TASKS = ("ling_arithmetic_gen", "ling_arithmetic_mc", "ling_shakespeare_ppl")
STEP = re.compile(r"^(\d)([+-])(\d)\2(\d)=(-?\d+), write (\d), (carry|borrow) (\d)$")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The three tasks loaded by lm-eval's TaskManager from a folder that is not the checkout."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        assert set(TASKS) <= set(manager.all_tasks) and "ling_offline" in manager.all_tags
        tasks = manager.load(["ling_offline"])["tasks"]
        for task in tasks.values():
            task.build_all_requests(rank=0, world_size=1)
    assert sorted(tasks) == sorted(TASKS)
    return tasks


def _docs(task):
    return list(task.test_docs())


# ---- arithmetic -------------------------------------------------------------------------------------
def test_arithmetic_problems_are_never_training_problems(loaded):
    # The training corpus is the bundled `arithmetic` source (configs/tiny.yaml: `path: arithmetic`).
    training = {doc.split("\n", 1)[0] for doc in bundled_documents("arithmetic")}
    assert len(training) > 5000  # the check below compares against a real problem set
    for name in ("ling_arithmetic_mc", "ling_arithmetic_gen"):
        docs = _docs(loaded[name])
        prompts = [doc["prompt"] for doc in docs]
        assert len(set(prompts)) == len(prompts)  # no problem asked twice
        assert not {p.rstrip("\n") for p in prompts} & training
        for doc in docs:
            a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", doc["expression"]).groups()
            assert split_of(int(a), op, int(b)) == "test"  # the split the training stream never draws
    # The eval problems are test-split ones, so training corpora drawn with other seeds miss them too.
    asked = {doc["prompt"] for doc in _docs(loaded["ling_arithmetic_mc"])}
    for seed in (1, 2):
        assert not asked & {doc.split("\n", 1)[0] + "\n" for doc in arithmetic_documents(5000, seed=seed)}


def _check_steps(worked: str, a: int, op: str, b: int) -> tuple[int, int]:
    """(wrong column results, answer) of a worked solution, each line checked against the digits of a and b."""
    lines = worked.rstrip("\n").split("\n")
    answer = int(lines.pop().removeprefix("Answer: "))
    width = max(len(str(a)), len(str(b)))
    top, bottom = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    wrong, carry, written = 0, 0, []
    for column, line in enumerate(lines):
        x, line_op, y, carry_in, value, digit, word, carry_out = STEP.fullmatch(line).groups()
        assert line_op == op and word == ("carry" if op == "+" else "borrow")
        if column < width:
            assert (x, y) == (top[column], bottom[column])
        else:  # the extra column of a carry out of the top
            assert (op, x, y, carry_in, value, carry_out) == ("+", "0", "0", "1", "1", "0")
        assert int(carry_in) == carry  # the carry the line above passed on
        true = int(x) + int(y) + carry if op == "+" else int(x) - int(y) - carry
        wrong += int(value) != true
        assert int(digit) == int(value) % 10
        assert int(carry_out) == (int(value) // 10 if op == "+" else int(int(value) < 0))
        carry = int(carry_out)
        written.append(digit)
    assert carry == 0 and answer == int("".join(reversed(written)))
    return wrong, answer


def test_multiple_choice_answers_by_hand(loaded):
    task = loaded["ling_arithmetic_mc"]
    docs = _docs(task)
    assert len(docs) == task_data.ARITHMETIC_MC_COUNT
    assert {"-" in doc["expression"] for doc in docs} == {True, False}  # both operators appear
    labels = []
    for doc in docs:
        expected = eval(doc["expression"])  # the oracle: Python's arithmetic
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", doc["expression"]).groups()
        choices, label = doc["choices"], doc["label"]
        assert len(choices) == 4 and len(set(choices)) == 4
        answers = []
        for index, choice in enumerate(choices):
            wrong, answer = _check_steps(choice, int(a), op, int(b))
            assert wrong == (0 if index == label else 1)  # distractors: exactly one column slipped
            answers.append(answer)
        assert answers[label] == expected and str(expected) == doc["answer"]
        assert len(set(answers)) == 4 and min(answers) >= 0
        for answer in answers[:label] + answers[label + 1 :]:
            slip = abs(answer - expected)
            assert slip in {d * 10**k for d in (1, 2) for k in range(4)}  # off by 1 or 2 in one column
        labels.append(label)
    # Chance is 1/4: the right choice sits at each position about equally often.
    assert all(35 <= labels.count(i) <= 65 for i in range(4))


def test_prompts_are_the_training_format(loaded):
    """The question line is the context and the right worked lines continue it, as in a training document."""
    mc, gen = loaded["ling_arithmetic_mc"], loaded["ling_arithmetic_gen"]
    docs = _docs(mc)
    for instance in mc.instances:
        doc = docs[instance.doc_id]
        context, continuation = instance.args
        assert context == doc["prompt"]
        if instance.idx == doc["label"]:
            a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", doc["expression"]).groups()
            assert context + continuation == make_problem(int(a), op, int(b)).document
    assert len(mc.instances) == 4 * len(docs)
    gen_docs = _docs(gen)
    assert len(gen_docs) == task_data.ARITHMETIC_GEN_COUNT
    for instance in gen.instances:
        doc = gen_docs[instance.doc_id]
        context, kwargs = instance.args
        assert context == doc["prompt"] and doc["answer"] == str(eval(doc["expression"]))
        assert "Q:" in kwargs["until"] and kwargs["max_gen_toks"] >= 130  # the longest worked solution fits
    longest = max(len(make_problem(999, "+", 999).worked), len(make_problem(999, "-", 0).worked))
    assert longest < 130


def test_generation_filter_reads_the_answer_line(loaded):
    """The task's filter takes the number on the Answer: line, so exact_match scores a right solution 1."""
    gen = loaded["ling_arithmetic_gen"]
    docs = _docs(gen)
    solutions = {}
    for instance in gen.instances:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", docs[instance.doc_id]["expression"]).groups()
        worked = make_problem(int(a), op, int(b)).worked
        if instance.doc_id % 2:  # every other one a wrong solution: one column slipped
            worked = task_data.slipped(make_problem(int(a), op, int(b)))[0][1]
        solutions[instance.doc_id] = worked
        instance.resps = [worked + "Q: 1+1\n"]  # what a model running on would add is cut by the stop, not here
    gen.apply_filters()
    for instance in gen.instances:
        doc = docs[instance.doc_id]
        (extracted,) = [instance.filtered_resps["answer-line"]]
        assert extracted == solutions[instance.doc_id].rstrip("\n").rsplit("Answer: ", 1)[1]
        score = gen.process_results(doc, [extracted])["exact_match"]
        assert score == (0.0 if instance.doc_id % 2 else 1.0)


def test_worked_steps_reproduce_the_generator():
    rows = [(0, "+", 0), (5, "+", 7), (999, "+", 1), (9, "+", 275), (100, "-", 1), (347, "-", 347), (70, "-", 9)]
    rows += [(p.a, p.op, p.b) for p in arithmetic_problems(300, seed=5)]
    for a, op, b in rows:
        problem = make_problem(a, op, b)
        assert task_data.worked_steps(a, op, b) == (problem.worked, int(problem.answer))
        for (column, delta), worked, answer in task_data.slipped(problem):
            assert answer == eval(f"{a}{op}{b}") + delta * 10**column
            assert _check_steps(worked, a, op, b) == (1, answer)


def test_slips_that_leave_the_column_range_or_go_negative_are_dropped():
    assert task_data.worked_steps(0, "+", 0, (0, -1)) is None  # no sum is -1
    assert task_data.worked_steps(9, "+", 9, (0, 2)) is None  # no column of sums reaches 20
    assert task_data.worked_steps(5, "-", 5, (0, -1)) is None  # 5-5 = -1 would need a borrow out of the top
    assert task_data.worked_steps(0, "-", 0, (0, -1)) is None


# ---- Shakespeare ------------------------------------------------------------------------------------
def test_shakespeare_documents_are_held_out(loaded, tmp_path):
    docs = _docs(loaded["ling_shakespeare_ppl"])
    assert 24 <= len(docs) <= 60 and all(0 < len(d["text"]) <= task_data.PASSAGE_CHARS for d in docs)
    for instance in loaded["ling_shakespeare_ppl"].instances:
        assert instance.args == (docs[instance.doc_id]["text"],)
    # The oracle: the data module itself, as configs/tiny.yaml sets it up (its val_fraction is the default).
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    default = inspect.signature(LingDataModule.__init__).parameters["val_fraction"].default
    assert config["data"].get("val_fraction", default) == default == task_data.SHAKESPEARE_VAL_FRACTION
    data = LingDataModule(sources={"shakespeare": {"path": "shakespeare"}}, cache_dir=str(tmp_path))
    data.setup()
    (rows,) = data.train_rows
    split, stream = rows.end, rows.stream
    for stage in config["data"]["stages"]:  # the last token any training row reads is before the split
        seq_len = stage["seq_len"]
        assert rows.count(seq_len) * seq_len < split
    tokens = stream.read(0, len(stream))
    eos = data.tokenizer.eos_token_id
    assert not np.any(tokens[tokens != eos] > 255)  # byte tokens: the stream is the text's UTF-8 bytes
    text = np.where(tokens == eos, 0, tokens).astype(np.uint8).tobytes()  # EOS as a NUL byte
    training = text[:split]
    scenes = shakespeare_documents()
    for doc in docs:
        needle = doc["text"].encode()
        assert scenes[doc["document"]].startswith(doc["text"])
        start = text.find(b"\0" + needle) + 1  # a scene starts right after the EOS of the one before
        assert start >= split, doc["document"]
        assert needle not in training and needle[:200] not in training
