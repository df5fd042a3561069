"""Batched KV-cache generation for `generate_until`: stop strings end a row as soon as they appear.

`ling.generate.generate` stops only at stop tokens, so a task whose answers end at "\\n" would run every
request to max_gen_toks. This loop uses the same pieces (`KVCache`, `sample_next`) and also checks the
decoded text after every step. Rows must have equal prompt lengths (no padding, so the model sees
exactly what an unbatched call would). In a distributed run the chosen tokens are broadcast from
rank 0, so every rank feeds the same tokens and takes the same number of steps: sharded (FSDP2 /
expert-parallel) forwards need all ranks in every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ling.generate import sample_next
from ling.model import KVCache


class LazyKVCache(KVCache):
    """A KVCache whose buffers take the dtype and device of the first keys written to them.

    A model under FSDP2 mixed precision computes in bf16 while its stored (sharded) weights are fp32,
    so the weights cannot tell the cache its dtype; the first forward does."""

    def __init__(self, num_layers: int, max_len: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_zeros(B, H, self.max_len, D)
            self.values[layer] = v.new_zeros(B, v.shape[1], self.max_len, v.shape[3])
        return super().update(layer, k, v)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any non-empty stop string in `text`, None if there is none."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


@torch.no_grad()
def generate_rows(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    decode: Callable[[list[int]], str],
    eos_token_id: int,
    stops: Sequence[str] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    broadcast: bool = False,
) -> list[list[int]]:
    """The new tokens of each row of `prompt` [B, T], ending at (and including) EOS, or at the first
    token whose text completes a stop string, or after `max_new_tokens`."""
    B, T = prompt.shape
    cache = LazyKVCache(model.config.num_hidden_layers, T + max_new_tokens)
    rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    logits = model(prompt, kv_cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if broadcast:
            torch.distributed.broadcast(token, src=0)
        for i, tok in enumerate(token.tolist()):
            if done[i]:
                continue
            rows[i].append(tok)
            done[i] = tok == eos_token_id or (bool(stops) and first_stop(decode(rows[i]), stops) is not None)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], kv_cache=cache).logits[:, -1]
    return rows
