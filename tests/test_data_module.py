"""Step batches: ramped micro-batch counts, resumable positions, held-out windows, bad input."""

import itertools

import pytest
import torch

from ling.data.corpus import DataError
from ling.data.module import BatchSchedule, LingDataModule, StepBatches
from ling.schedules import BatchRamp


def test_ramped_schedule_by_hand():
    # start 4, +2 per increment, target 10 over 30 samples: 3 increments, one every 10 samples.
    # Consumed before each step: 0, 4, 8, 12, 18, 24, 32, 42 -> batches 4, 4, 4, 6, 6, 8, 10, 10.
    schedule = BatchSchedule(10, BatchRamp(start=4, increment=2, ramp_samples=30), ranks=1, rows=2)
    assert [schedule.micro_batches_at(s) for s in range(8)] == [2, 2, 2, 3, 3, 4, 5, 5]
    assert [schedule.micro_batches_before(s) for s in range(8)] == [0, 2, 4, 6, 9, 12, 16, 21]


def test_schedule_rejects_partial_micro_batches():
    with pytest.raises(DataError, match="not a whole number of micro-batches of 4 rows on 2 rank"):
        BatchSchedule(12, None, ranks=2, rows=4)
    with pytest.raises(DataError, match="increment=2 must be a multiple of 4"):
        BatchSchedule(16, BatchRamp(start=8, increment=2, ramp_samples=10), ranks=2, rows=2)


def steps(start_step, count, rank=0):
    tokens = torch.arange(5000) % 251
    schedule = BatchSchedule(10, BatchRamp(start=4, increment=2, ramp_samples=30), ranks=1, rows=2)
    stream = StepBatches(tokens, 16, 2, seed=3, rank=rank, start_step=start_step, schedule=schedule)
    return list(itertools.islice(iter(stream), count))


def test_step_batches_follow_the_ramp_and_resume_mid_ramp():
    full = steps(0, 7)
    assert [b["input_ids"].shape for b in full] == [(n, 2, 16) for n in (2, 2, 2, 3, 3, 4, 5)]
    for batch in full:
        assert torch.equal(batch["labels"][..., :-1], batch["input_ids"][..., 1:])
    resumed = steps(4, 3)
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_ranks_read_different_rows():
    a, b = steps(0, 3, rank=0), steps(0, 3, rank=1)
    assert all(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))


def test_validation_windows_are_consecutive_held_out_text():
    data = LingDataModule(seq_len=64, micro_batch_size=4, val_batches=2)
    data.setup("fit")
    batches = list(data.val_dataloader())
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 64)
    flat = torch.cat([b["input_ids"].flatten() for b in batches])
    assert torch.equal(flat, data.val_tokens[: flat.numel()])
    assert data.train_tokens.numel() + data.val_tokens.numel() == len(data.tokenizer.encode(_pydoc()))


def _pydoc():
    from ling.data.corpus import pydoc_topics

    return pydoc_topics()


def test_bad_corpus_and_lengths(tmp_path):
    with pytest.raises(DataError, match="neither a bundled corpus"):
        LingDataModule(corpus=str(tmp_path / "absent.txt")).setup("fit")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        LingDataModule(corpus=str(empty)).setup("fit")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(DataError, match="fewer than seq_len \\+ 1 = 129"):
        LingDataModule(corpus=str(short)).setup("fit")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        LingDataModule(corpus=str(binary)).setup("fit")
