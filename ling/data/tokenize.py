"""Tokenise a source once with `datasets.map`, cache it on disk, and read it back as one token stream.

Each document becomes its token ids followed by EOS. The cached Arrow file is keyed by the
source's fingerprint and the tokenizer's, so a second run (or another rank) reads it instead of
tokenising again. The stream view concatenates the cached documents without copying them out of
the memory-mapped file, so sources far larger than RAM can be sampled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np

from ling.data.errors import DataError

PIPELINE_VERSION = 1  # bump when the tokenised layout changes, to invalidate old caches


def default_cache_dir() -> Path:
    """`ling-train` inside the datasets cache ($HF_DATASETS_CACHE, by default $HF_HOME/datasets)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "ling-train"


class _Encode:
    """The map function; a class (not a closure) so it pickles into `num_proc` workers."""

    def __init__(self, tokenizer, field: str, chat: bool):
        self.tokenizer, self.field, self.chat = tokenizer, field, chat

    def __call__(self, batch: dict) -> dict:
        texts = batch[self.field]
        if self.chat:
            texts = [self.tokenizer.apply_chat_template(messages) for messages in texts]
        eos = self.tokenizer.eos_token_id
        return {"input_ids": [ids + [eos] for ids in self.tokenizer.encode_batch(texts)]}


def cache_key(data: datasets.Dataset, tokenizer, field: str, chat: bool) -> str:
    text = f"{data._fingerprint}|{tokenizer.fingerprint()}|{field}|{chat}|{PIPELINE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def tokenize_source(
    name: str,
    data: datasets.Dataset,
    tokenizer,
    field: str = "text",
    chat: bool = False,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """A dataset with one `input_ids` column (document ids + EOS), read from the cache when present."""
    key = cache_key(data, tokenizer, field, chat)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dtype = "int32" if tokenizer.vocab_size < 2**31 else "int64"
    return data.map(
        _Encode(tokenizer, field, chat),
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=data.column_names,
        features=datasets.Features({"input_ids": datasets.List(datasets.Value(dtype))}),
        cache_file_name=str(folder / f"{name}-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc=f"tokenising {name}",
    )


class TokenStream:
    """All documents of a tokenised dataset back to back, addressable by token offset."""

    def __init__(self, tokenized: datasets.Dataset, name: str = "source"):
        column = tokenized.data.column("input_ids")
        self.chunks = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
        self.chunks = [c for c in self.chunks if c.size]
        sizes = [c.size for c in self.chunks]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.name = name
        if not sizes:
            raise DataError(f"source {name!r} has no tokens after tokenisation.")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) are outside a stream of {len(self)}")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, taken = np.empty(length, dtype=np.int64), 0
        while taken < length:
            chunk = self.chunks[first]
            offset = start + taken - int(self.starts[first])
            part = chunk[offset : offset + length - taken]
            out[taken : taken + part.size] = part
            taken += part.size
            first += 1
        return out
