"""Curriculum stages: batch shapes per stage by hand, the exact switch step, bad stage settings."""

import pytest

from ling.data.curriculum import Curriculum, Stage
from ling.data.errors import DataError
from ling.schedules import BatchRamp


def curriculum(stages, mode="tokens", ranks=1, ramp=None, batch=16, micro=8, sources=("a", "b")):
    return Curriculum(stages, list(sources), 128, micro, batch, ramp, ranks, mode)


def test_tokens_mode_keeps_tokens_per_step_and_micro_batch():
    c = curriculum([Stage("s128", steps=2), Stage("s256", steps=2, seq_len=256), Stage("s512", seq_len=512)])
    shapes = [(p.stage, p.seq_len, p.global_rows, p.rows, p.micro_batches) for p in map(c.at, range(6))]
    # 16 x 128 = 2048 tokens per step; micro-batch 8 x 128 = 1024 tokens.
    assert shapes == [
        (0, 128, 16, 8, 2), (0, 128, 16, 8, 2),
        (1, 256, 8, 4, 2), (1, 256, 8, 4, 2),
        (2, 512, 4, 2, 2), (2, 512, 4, 2, 2),
    ]  # fmt: skip
    assert {c.at(s).tokens for s in range(6)} == {2048}


def test_sequences_mode_keeps_rows():
    c = curriculum([Stage("short", steps=1), Stage("long", seq_len=512)], mode="sequences")
    assert [(p.global_rows, p.rows, p.micro_batches, p.tokens) for p in (c.at(0), c.at(1))] == [
        (16, 8, 2, 2048),
        (16, 8, 2, 8192),
    ]


def test_rows_longer_than_a_micro_batch_take_one_row_each():
    # micro-batch 1 x 128 tokens, a 1024-token stage: 1 row per micro-batch, 16 x 128 / 1024 = 2 rows per step.
    c = curriculum([Stage("short", steps=1), Stage("long", seq_len=1024)], micro=1, ranks=2)
    p = c.at(1)
    assert (p.global_rows, p.rows, p.micro_batches) == (2, 1, 1)


def test_token_budget_ends_a_stage_at_the_step_that_reaches_it():
    # 2048 tokens per step: 5000 tokens are reached after 3 steps (6144), so stage 1 starts at step 3.
    c = curriculum([Stage("a", tokens=5000), Stage("b", tokens=4096, seq_len=256), Stage("c", seq_len=512)])
    assert [c.at(s).stage for s in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert [c.at(s).step_in_stage for s in range(6)] == [0, 1, 2, 0, 1, 0]


def test_ramp_is_counted_in_base_length_sequences():
    # Batch 8 -> 16 in one increment after 24 base sequences (3 steps of 8). The 256-token stage from step 1
    # counts 8 rows x 256 = 16 base sequences per step... in tokens mode it has 4 rows of 256 = 8 base rows.
    c = curriculum([Stage("a", steps=1), Stage("b", seq_len=256)], ramp=BatchRamp(8, 8, 24))
    rows = [c.at(s).global_rows for s in range(5)]
    # consumed base sequences before each step: 0, 8, 16, 24 (-> batch 16), 40
    assert rows == [8, 4, 4, 8, 8]


@pytest.mark.parametrize(
    "stages, message",
    [
        ([Stage("a"), Stage("b")], "not the last stage, so it needs a budget"),
        ([Stage("a", tokens=10, steps=2)], "sets both tokens and steps"),
        ([Stage("a", seq_len=0)], "seq_len=0 must be a positive integer"),
        ([Stage("a", mixture={"a": -1.0, "b": 1.0})], "weight -1.0; weights must be >= 0"),
        ([Stage("a", mixture={"a": 0.0, "b": 0.0})], "all zero"),
        ([Stage("a", mixture={"c": 1.0})], "mixes source 'c', which is not in data.sources"),
        ([Stage("a", seq_len=96)], "not a whole number of 96-token rows"),
        ([Stage("a", seq_len=1024)], "not a whole number of micro-batches of 1 row"),
    ],
)
def test_bad_stages_are_refused_at_construction(stages, message):
    with pytest.raises(DataError, match=message):
        curriculum(stages, ranks=3 if stages[0].seq_len == 1024 else 1)


def test_bad_batch_mode():
    with pytest.raises(DataError, match="batch_mode='rows' is not one of tokens, sequences"):
        curriculum([Stage("a")], mode="rows")
