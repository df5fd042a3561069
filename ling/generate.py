"""Autoregressive generation with a KV cache: greedy or sampled, ending at stop tokens or stop strings.

In a distributed run (`broadcast=True`) the chosen tokens are broadcast from rank 0, so every rank
feeds the same tokens and takes the same number of steps: sharded (FSDP2 / expert-parallel) forwards
need all ranks in every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ling.model import KVCache, LingForCausalLM


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any non-empty stop string in `text`, None if there is none."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


@torch.no_grad()
def generate(
    model: LingForCausalLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    *,
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    broadcast: bool = False,
    eval_mode: bool = True,
) -> list[list[int]]:
    """Continue each row of `prompt` [B, T] (rows of equal length); returns the new tokens per row,
    ending at (and including) the first stop token, or the first token whose text completes one of
    `stop_strings` (`decode` turns a row's new tokens into text; cut the text with `first_stop`), or
    after `max_new_tokens`.

    broadcast: take rank 0's tokens at every step (a distributed run). eval_mode: run the model in
    eval mode and restore its mode afterwards; False runs it in the mode it is in."""
    if prompt.dim() == 1:
        prompt = prompt[None]
    B, T = prompt.shape
    limit = model.config.context_length
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context length {limit}.")
    if stop_strings and decode is None:
        raise ValueError(f"stop_strings={list(stop_strings)!r} need decode= (token ids to text) to be found.")
    was_training = model.training
    if eval_mode:
        model.eval()
    cache = KVCache(model.config.num_hidden_layers, T + max_new_tokens)
    stop_set = set(stop_tokens)
    rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    try:
        logits = model(prompt, kv_cache=cache).logits[:, -1]
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if broadcast:
                torch.distributed.broadcast(token, src=0)
            for i, tok in enumerate(token.tolist()):
                if not done[i]:
                    rows[i].append(tok)
                    done[i] = tok in stop_set or (
                        bool(stop_strings) and first_stop(decode(rows[i]), stop_strings) is not None
                    )
            if all(done) or step == max_new_tokens - 1:
                break  # no forward for a token nobody reads
            logits = model(token[:, None], kv_cache=cache).logits[:, -1]
    finally:
        if eval_mode:
            model.train(was_training)
    return rows
