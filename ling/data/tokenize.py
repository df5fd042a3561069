"""Tokenise a source once with `datasets.map`, cache it on disk, and read it back as one token stream.

Each document becomes its token ids followed by the tokenizer's document end (`document_end_id`: EOS,
or `<|endoftext|>` for a chat tokenizer whose EOS ends every turn). A chat source trained on its
assistant replies only (loss="assistant") also gets a `loss_mask` column, 1 where a token is trained,
parallel to `input_ids`. The cached Arrow file is keyed by the source's fingerprint and the tokenizer's,
so a second run (or another rank) reads it instead of tokenising again, and a changed source file or
tokenizer is tokenised anew. The stream view concatenates the cached documents without copying them out
of the memory-mapped file, so sources far larger than RAM can be sampled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
from datasets.fingerprint import generate_fingerprint

from ling.data.chat import LOSSES, encode_conversations, render_conversation
from ling.data.errors import DataError

PIPELINE_VERSION = 2  # bump when the tokenised layout changes, to invalidate old caches
LOSS_MASK = "loss_mask"


def default_cache_dir() -> Path:
    """`ling-train` inside the datasets cache ($HF_DATASETS_CACHE, by default $HF_HOME/datasets)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "ling-train"


class _Encode:
    """The map function; a class (not a closure) so it pickles into `num_proc` workers."""

    def __init__(self, tokenizer, field: str, chat: bool, loss: str = "all", name: str = "source"):
        self.tokenizer, self.field, self.chat, self.loss, self.name = tokenizer, field, chat, loss, name

    def __call__(self, batch: dict) -> dict:
        texts = batch[self.field]
        if self.chat and self.loss == "assistant":
            ids, masks = encode_conversations(self.tokenizer, texts, self.name)
            return {"input_ids": ids, LOSS_MASK: masks}
        if self.chat:
            texts = [render_conversation(self.tokenizer, messages, self.name) for messages in texts]
        end = self.tokenizer.document_end_id
        return {"input_ids": [ids + [end] for ids in self.tokenizer.encode_batch(texts)]}


def cache_key(data: datasets.Dataset, tokenizer, field: str, chat: bool, loss: str = "all") -> str:
    """The name of a source's tokenised cache: its documents, the tokenizer and how they are tokenised.

    The documents' part is `datasets`' own fingerprint of the dataset as it is: a hash of the rows of an
    in-memory dataset, or of the paths and modification times of the Arrow files behind one on disk (a saved
    dataset's own, or those `datasets` writes anew from a changed json/parquet/text file). `datasets` has
    no public reader of `Dataset._fingerprint`.
    """
    text = f"{generate_fingerprint(data)}|{tokenizer.fingerprint()}|{field}|{chat}|{loss}|{PIPELINE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_loss(name: str, loss: str, chat: bool) -> None:
    """A `DataError` naming the source unless `loss` is one of `LOSSES` and fits the source's kind."""
    if loss not in LOSSES:
        raise DataError(f"source {name!r}: loss={loss!r} is not one of {', '.join(LOSSES)}.")
    if loss == "assistant" and not chat:
        raise DataError(
            f"source {name!r}: loss='assistant' needs a chat source (set messages_field); a text source has "
            "no assistant turns."
        )


def tokenize_source(
    name: str,
    data: datasets.Dataset,
    tokenizer,
    field: str = "text",
    chat: bool = False,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    loss: str = "all",
) -> datasets.Dataset:
    """A dataset with an `input_ids` column (document ids + document end), and for loss="assistant" a
    parallel `loss_mask` column; read from the cache when present."""
    check_loss(name, loss, chat)
    key = cache_key(data, tokenizer, field, chat, loss)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dtype = "int32" if tokenizer.vocab_size < 2**31 else "int64"
    features = {"input_ids": datasets.List(datasets.Value(dtype))}
    if loss == "assistant":
        features[LOSS_MASK] = datasets.List(datasets.Value("uint8"))
    return data.map(
        _Encode(tokenizer, field, chat, loss, name),
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=data.column_names,
        features=datasets.Features(features),
        cache_file_name=str(folder / f"{name}-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc=f"tokenising {name}",
    )


class _Flat:
    """One list column of a dataset, its lists back to back, read by offset without copying the chunks."""

    def __init__(self, tokenized: datasets.Dataset, column: str):
        chunks = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in tokenized.data.column(column).chunks]
        self.chunks = [c for c in chunks if c.size]
        self.starts = np.concatenate([[0], np.cumsum([c.size for c in self.chunks])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int, dtype) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, taken = np.empty(length, dtype=dtype), 0
        while taken < length:
            chunk = self.chunks[first]
            offset = start + taken - int(self.starts[first])
            part = chunk[offset : offset + length - taken]
            out[taken : taken + part.size] = part
            taken += part.size
            first += 1
        return out


class TokenStream:
    """All documents of a tokenised dataset back to back, addressable by token offset; with the loss mask
    beside them where the dataset has one (`read_loss`)."""

    def __init__(self, tokenized: datasets.Dataset, name: str = "source"):
        self.name = name
        self._ids = _Flat(tokenized, "input_ids")
        if not len(self._ids):
            raise DataError(f"source {name!r} has no tokens after tokenisation.")
        self._loss = _Flat(tokenized, LOSS_MASK) if LOSS_MASK in tokenized.column_names else None
        if self._loss is not None and len(self._loss) != len(self._ids):
            raise DataError(
                f"source {name!r}: its {LOSS_MASK} column has {len(self._loss)} entries for {len(self._ids)} "
                "tokens; delete its cache files to tokenise it again."
            )

    @property
    def has_loss_mask(self) -> bool:
        """Whether some tokens are not trained (a chat source with loss="assistant")."""
        return self._loss is not None

    def __len__(self) -> int:
        return len(self._ids)

    def _check(self, start: int, length: int) -> None:
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) are outside a stream of {len(self)}")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64."""
        self._check(start, length)
        return self._ids.read(start, length, np.int64)

    def read_loss(self, start: int, length: int) -> np.ndarray:
        """Whether each of tokens [start, start + length) is trained, as bool (all True without a mask)."""
        self._check(start, length)
        if self._loss is None:
            return np.ones(length, dtype=bool)
        return self._loss.read(start, length, bool)
