"""Packing a source's token stream into fixed-length training rows, and the document boundaries inside a row.

A source's documents are one stream with a document end after each (`ling.data.tokenize.TokenStream`),
cut into rows of seq_len + 1 tokens that overlap by one: inputs are row[:-1], labels row[1:], so every
token of the stream is a label exactly once per epoch. Ling trains without isolating documents (a row
attends across its document ends); `document_ids` and `document_positions` give what document
isolation needs.

The document end (`eos_id` here) is the tokenizer's `document_end_id`: its EOS, except for a chat
tokenizer whose EOS ends every turn (Ling's `<|role_end|>`), where it is `<|endoftext|>`, so that a
conversation is one document and not one per turn.
"""

from __future__ import annotations

import numpy as np
import torch

from ling.data.sampling import permute, stable_key
from ling.data.tokenize import TokenStream


class SourceRows:
    """The training part of one source's token stream (its first `end` tokens), cut into rows of
    seq_len + 1 tokens.

    Rows overlap by one token (inputs row[:-1], labels row[1:]), so consecutive rows cover every
    token as a label once. Each epoch visits every row once, in a seeded order of its own.
    """

    def __init__(self, name: str, stream: TokenStream, end: int):
        self.name, self.stream, self.end = name, stream, end

    def count(self, seq_len: int) -> int:
        return (self.end - 1) // seq_len

    def rows(self, draws: np.ndarray, seq_len: int, key: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, whether each of their tokens is trained) for the given draw numbers: draw k reads row
        perm_epoch(k % n) of epoch k // n; the second array is the stream's loss mask (all True without one)."""
        n = self.count(seq_len)
        out = np.empty((len(draws), seq_len + 1), dtype=np.int64)
        trained = np.ones(out.shape, dtype=bool)
        epochs = draws // n
        for epoch in np.unique(epochs):
            at = epochs == epoch
            rows = permute(draws[at] % n, n, stable_key(key, self.name, int(epoch)))
            for slot, row in zip(np.flatnonzero(at), rows):
                out[slot] = self.stream.read(int(row) * seq_len, seq_len + 1)
                if self.stream.has_loss_mask:
                    trained[slot] = self.stream.read_loss(int(row) * seq_len, seq_len + 1)
        return out, trained


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per position, the index of its document within the row: a new document starts after each
    document end `eos_id` (the tokenizer's `document_end_id`, not a chat EOS that ends a turn)."""
    ends = (input_ids == eos_id).long()
    return torch.cumsum(ends, dim=-1) - ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at each document start."""
    index = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start_index = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=-1).values
    return index - start_index
