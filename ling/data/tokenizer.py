"""A tokenizer that needs no download: UTF-8 bytes are ids 0..255 and id 256 is end-of-text."""

from __future__ import annotations


class ByteTokenizer:
    eos_token_id = 256
    pad_token_id = 256  # as in Ling's own tokenizer, EOS doubles as pad and is never masked as padding
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
