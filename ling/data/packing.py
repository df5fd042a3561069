"""Packing documents into fixed-length training rows, and the document boundaries inside a row.

Documents are joined into one stream with a document end after each, and the stream is cut into rows
of seq_len + 1 tokens that overlap by one: inputs are row[:-1], labels row[1:], so every token of the
stream is a label exactly once, in order. Ling trains without isolating documents (a row attends
across its document ends); `document_ids` gives what document isolation needs.

The document end (`eos_id` here) is the tokenizer's `document_end_id`: its EOS, except for a chat
tokenizer whose EOS ends every turn (Ling's `<|role_end|>`), where it is `<|endoftext|>`, so that a
conversation is one document and not one per turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def pack_stream(documents: Iterable[list[int]], eos_id: int) -> Iterator[int]:
    """The documents' ids, each followed by the document end `eos_id`."""
    for doc in documents:
        yield from doc
        yield eos_id


def pack_rows(documents: Iterable[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """[rows, seq_len + 1]: consecutive windows of the stream `pack_stream` joins, sharing one token at
    each seam; the tail that does not fill a row is dropped."""
    stream = torch.tensor(list(pack_stream(documents, eos_id)), dtype=torch.long)
    rows = (stream.numel() - 1) // seq_len
    if rows == 0:
        return stream.new_empty(0, seq_len + 1)
    return stream.unfold(0, seq_len + 1, seq_len)[:rows]


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
