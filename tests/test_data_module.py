"""The data module: packing, cached tokenisation, mixtures, stages, ranks, resume, loss masks, bad input."""

import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from ling.data.curriculum import Stage
from ling.data.datamodule import LingDataModule
from ling.data.errors import DataError
from ling.data.packing import SourceRows
from ling.data.sources import SourceSpec
from ling.data.tokenize import TokenStream, tokenize_source
from ling.data.tokenizer import ByteTokenizer
from ling.model.model import IGNORE_INDEX

EOS = 256


def write_source(path, start, count=60, length=40):
    """Random letters from chr(start)..chr(start + 25): a row tells its source (upper or lower case), and
    16-token windows of random text are unique, so a row's content identifies the row."""
    rng = random.Random(start)
    docs = ["".join(chr(start + rng.randrange(26)) for _ in range(length + d % 7)) for d in range(count)]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return docs


def make(tmp_path, ranks=None, **kwargs):
    sources = {"low": SourceSpec(str(tmp_path / "low.jsonl")), "high": SourceSpec(str(tmp_path / "high.jsonl"))}
    if not (tmp_path / "low.jsonl").exists():
        write_source(tmp_path / "low.jsonl", 65)
        write_source(tmp_path / "high.jsonl", 97)
    settings = dict(sources=sources, seq_len=16, micro_batch_size=2, global_batch_size=8, val_fraction=0.1, seed=5)
    settings["cache_dir"] = str(tmp_path / "cache")
    data = LingDataModule(**{**settings, **kwargs})
    if ranks is not None:
        data.trainer = type("T", (), {"world_size": ranks, "global_rank": 0, "global_step": 0})()
    data.setup("fit")
    return data


def cache_files(folder) -> list[Path]:
    """The tokenised source files in a cache folder."""
    return sorted(Path(folder).glob("*.arrow"))


def source_of(row: torch.Tensor) -> str:
    text = row[row != EOS]
    return "low" if int(text[0]) < 97 else "high"


def test_packing_covers_every_token_once_in_order():
    stream_ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    tokenized = datasets.Dataset.from_dict({"input_ids": [ids + [EOS] for ids in stream_ids]})
    stream = TokenStream(tokenized)
    flat = [t for ids in stream_ids for t in ids + [EOS]]
    assert stream.read(0, len(stream)).tolist() == flat
    rows = SourceRows("s", stream, end=len(stream))
    n = rows.count(3)
    got, trained = rows.rows(np.arange(n), 3, key=1)
    assert trained.all()  # no loss mask: every token is trained
    # One epoch visits every row once, in a shuffled order; sorted by offset the labels are the stream.
    got = got[np.argsort([flat.index(int(r[0])) if r[0] != EOS else flat.index(int(r[1])) - 1 for r in got])]
    assert np.array_equal(got[:, :-1].reshape(-1), np.array(flat[: n * 3]))
    assert np.array_equal(got[:, 1:].reshape(-1), np.array(flat[1 : n * 3 + 1]))


def test_tokenisation_is_cached(tmp_path):
    data = datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]})

    class Counting(ByteTokenizer):
        calls = 0

        def encode_batch(self, texts):
            Counting.calls += len(texts)
            return super().encode_batch(texts)

    first = tokenize_source("s", data, Counting(), cache_dir=tmp_path)
    assert Counting.calls == 2 and len(cache_files(tmp_path)) == 1
    second = tokenize_source("s", data, Counting(), cache_dir=tmp_path)
    assert Counting.calls == 2  # read back, not tokenised again
    assert second["input_ids"] == first["input_ids"] == [list(b"alpha beta") + [EOS], list(b"gamma") + [EOS]]


def test_data_module_second_setup_reads_the_cache(tmp_path):
    make(tmp_path)
    files = {p: p.stat().st_mtime_ns for p in cache_files(tmp_path / "cache")}
    assert len(files) == 2
    again = make(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in cache_files(tmp_path / "cache")} == files
    assert again.step_batch(0, 0)["input_ids"].shape == (4, 2, 16)


def test_two_ranks_read_disjoint_rows_that_make_up_the_step(tmp_path):
    one = make(tmp_path)
    two = make(tmp_path, ranks=2)
    for step in range(3):
        whole = one.step_batch(step, 0)["input_ids"].reshape(-1, 16)
        parts = [two.step_batch(step, r)["input_ids"] for r in (0, 1)]
        assert parts[0].shape == (2, 2, 16)  # 8 rows = 2 micro-batches x 2 rows x 2 ranks
        a, b = ({tuple(x.tolist()) for x in p.reshape(-1, 16)} for p in parts)
        assert not a & b
        assert a | b == {tuple(x.tolist()) for x in whole}


def test_mixture_shares_follow_the_weights(tmp_path):
    data = make(tmp_path, mixture={"low": 0.75, "high": 0.25}, global_batch_size=16)
    counted = {"low": 0, "high": 0}
    claimed = torch.zeros(2, dtype=torch.long)
    for step in range(60):
        batch = data.step_batch(step, 0)
        claimed += batch["source_rows"]
        for row in batch["input_ids"].reshape(-1, 16):
            counted[source_of(row)] += 1
    assert claimed.tolist() == [counted["low"], counted["high"]]  # the logged counts are the rows read
    share = counted["low"] / 960
    assert abs(share - 0.75) < 0.06  # binomial std 0.014 at n = 960


def test_stage_switch_changes_length_and_mixture_at_the_exact_step(tmp_path):
    stages = [
        Stage("short", tokens=300, seq_len=16, mixture={"low": 1.0}),
        Stage("long", seq_len=32, mixture={"high": 1.0}),
    ]
    data = make(tmp_path, stages=stages)
    # 8 x 16 = 128 tokens per step: 300 tokens are reached after 3 steps.
    batches = [data.step_batch(s, 0) for s in range(5)]
    assert [b["stage"] for b in batches] == [0, 0, 0, 1, 1]
    assert [b["input_ids"].shape for b in batches] == [(4, 2, 16)] * 3 + [(4, 1, 32)] * 2
    assert {source_of(r) for b in batches[:3] for r in b["input_ids"].reshape(-1, 16)} == {"low"}
    assert {source_of(r) for b in batches[3:] for r in b["input_ids"].reshape(-1, 32)} == {"high"}


def test_resumed_stream_continues_across_a_stage_boundary(tmp_path):
    stages = [Stage("a", steps=3), Stage("b", seq_len=32, mixture={"low": 1 / 3, "high": 2 / 3})]
    full = make(tmp_path, stages=stages)
    expected = [full.step_batch(s, 0) for s in range(6)]
    resumed = make(tmp_path, stages=stages)
    resumed.load_state_dict({"steps": 2, "seed": 5})
    stream = iter(resumed.train_dataloader())
    for step in range(2, 6):
        got = next(stream)
        assert got["stage"] == expected[step]["stage"]
        assert torch.equal(got["input_ids"], expected[step]["input_ids"])
        assert torch.equal(got["labels"], expected[step]["labels"])


def test_eos_is_a_target_and_only_the_next_document_start_is_masked(tmp_path):
    data = make(tmp_path, global_batch_size=64)
    batch = data.step_batch(0, 0)
    inputs, labels = batch["input_ids"], batch["labels"]
    after_eos = inputs == EOS
    assert after_eos.any() and (labels[after_eos] == IGNORE_INDEX).all()
    assert (labels[~after_eos] != IGNORE_INDEX).all()
    assert (labels == EOS).any()  # EOS is predicted, never treated as padding
    unmasked = make(tmp_path, eod_mask_loss=False, global_batch_size=64).step_batch(0, 0)
    assert (unmasked["labels"] != IGNORE_INDEX).all()
    assert torch.equal(unmasked["labels"][..., :-1], unmasked["input_ids"][..., 1:])


def test_document_isolation_adds_positions_and_document_ids(tmp_path):
    batch = make(tmp_path, document_isolation=True, global_batch_size=64).step_batch(0, 0)
    assert (batch["position_ids"] == 0).sum() > 64  # rows hold several documents
    for row, doc, pos in zip(batch["input_ids"].reshape(-1, 16), batch["doc_ids"].reshape(-1, 16),
                             batch["position_ids"].reshape(-1, 16)):  # fmt: skip
        expected_doc, expected_pos, d, p = [], [], 0, 0
        for token in row.tolist():  # by hand: a new document (position 0) starts after each EOS
            expected_doc.append(d)
            expected_pos.append(p)
            d, p = (d + 1, 0) if token == EOS else (d, p + 1)
        assert doc.tolist() == expected_doc and pos.tolist() == expected_pos


def test_validation_is_each_sources_held_out_tail(tmp_path):
    data = make(tmp_path, val_batches=2)
    batches = list(data.val_dataloader())
    assert [b["source"] for b in batches] == [0, 0, 1, 1]
    for index, (stream, split) in enumerate(data.val_streams):
        mine = [b for b in batches if b["source"] == index]
        flat = torch.cat([b["input_ids"].reshape(-1) for b in mine])
        assert torch.equal(flat, torch.from_numpy(stream.read(split, flat.numel())))
    halves = [list(make(tmp_path, ranks=2, val_batches=2).val_dataloader())]
    assert len(halves[0]) == 4 and halves[0][0]["input_ids"].shape == (2, 16)


def test_bad_data_settings(tmp_path):
    with pytest.raises(DataError, match="fewer than the 65 one row of stage 'long' needs"):
        make(tmp_path, val_fraction=0.5, stages=[Stage("a", steps=1), Stage("long", seq_len=64, mixture={"low": 1})],
             sources={"low": SourceSpec(str(tmp_path / "short.jsonl"))}) if write_short(tmp_path) else None  # fmt: skip
    with pytest.raises(DataError, match="val_fraction=1.5 must be between 0 and 1"):
        LingDataModule(val_fraction=1.5)
    with pytest.raises(DataError, match="stage 'a' mixes source 'nope'"):
        make(tmp_path, stages=[Stage("a", mixture={"nope": 1.0})])


def write_short(tmp_path):
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "x" * 70}) + "\n")
    return True


def ling_like_tokenizer(folder):
    """A word-level HF tokenizer whose EOS and pad are the same added token `<|endoftext|>`, as in Ling's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "user assistant : what is two plus two ? four three".split()
    vocab = {w: i for i, w in enumerate(["<unk>", *sorted(set(words))])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<|endoftext|>"])
    folder.mkdir()
    raw.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return raw.token_to_id("<|endoftext|>")


def test_chat_source_with_a_tokenizer_whose_eos_is_its_pad(tmp_path):
    eos = ling_like_tokenizer(tmp_path / "tok")
    chats = [
        {"messages": [{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": a}]}
        for a in ("four", "three") * 40
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    data = LingDataModule(
        sources={"chat": SourceSpec(str(tmp_path / "chat.jsonl"), messages_field="messages")},
        tokenizer=str(tmp_path / "tok"),
        seq_len=16,
        micro_batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert data.tokenizer.eos_token_id == data.tokenizer.pad_token_id == eos == 11  # after <unk> and 10 words
    data.setup("fit")
    tok = data.tokenizer
    rendered = tok.encode("user : what is two plus two ? assistant : four") + [eos]
    stream = data.train_rows[0].stream.read(0, len(rendered))
    assert stream.tolist() == rendered  # the chat template's text, then EOS
    batch = data.step_batch(0, 0)
    inputs, labels = batch["input_ids"], batch["labels"]
    assert (labels == eos).sum() == (inputs[..., 1:] == eos).sum() + (labels[..., -1] == eos).sum()
    assert (labels == eos).any() and (labels[inputs == eos] == IGNORE_INDEX).all()


def test_tokenising_in_worker_processes_gives_the_same_ids(tmp_path):
    data = datasets.Dataset.from_dict({"text": [f"document number {i} " * (i % 5 + 1) for i in range(40)]})
    one = tokenize_source("s", data, ByteTokenizer(), cache_dir=tmp_path / "a")
    two = tokenize_source("s", data, ByteTokenizer(), cache_dir=tmp_path / "b", num_proc=2)
    assert one["input_ids"] == two["input_ids"]
    assert one["input_ids"][3] == list(b"document number 3 " * 4) + [EOS]


def test_a_far_step_draws_its_mixture_without_recursing_per_chunk():
    """A resumed run far into a stage draws the mixture counts of every earlier 1,024-step chunk (each
    chunk's draws-before start where the previous one ends) in a loop, not one call deeper per chunk;
    the counts equal those of draws that walked there chunk by chunk."""
    import inspect
    import sys

    from ling.data.curriculum import Curriculum, Stage
    from ling.data.datamodule import _CHUNK, MixtureDraws

    curriculum = Curriculum([Stage(name="s", mixture={"a": 0.5, "b": 0.5})], ["a", "b"], 32, 2, 4)
    far = 150
    walked = MixtureDraws(curriculum, seed=3)
    for chunk in range(far + 1):
        walked.at(curriculum.at(chunk * _CHUNK))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 60)  # far fewer frames than chunks
    try:
        cold = MixtureDraws(curriculum, seed=3).at(curriculum.at(far * _CHUNK + 5))
    finally:
        sys.setrecursionlimit(limit)
    expected = walked.at(curriculum.at(far * _CHUNK + 5))
    assert all(np.array_equal(a, b) for a, b in zip(cold, expected, strict=True))
