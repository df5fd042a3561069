"""Autoregressive generation with a KV cache: greedy or sampled, with stop tokens."""

from __future__ import annotations

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


@torch.no_grad()
def generate(
    model: LingForCausalLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each row of `prompt` [B, T] (rows of equal length); returns the new tokens per row,
    ending at (and including) the first stop token."""
    if prompt.dim() == 1:
        prompt = prompt[None]
    B, T = prompt.shape
    limit = model.config.context_length
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context length {limit}.")
    was_training = model.training
    model.eval()
    config = model.config
    weight = model.lm_head.weight
    cache = KVCache(
        config.num_hidden_layers,
        B,
        T + max_new_tokens,
        config.num_key_value_heads,
        config.head_dim,
        weight.dtype,
        weight.device,
    )
    stops = torch.tensor(list(stop_tokens), device=prompt.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    generated: list[torch.Tensor] = []
    try:
        logits = model(prompt, kv_cache=cache).logits[:, -1]
        for _ in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            generated.append(token)
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
            logits = model(token[:, None], kv_cache=cache).logits[:, -1]
    finally:
        model.train(was_training)
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(B)]
    stop_set = set(stop_tokens)
    out = []
    for row in rows:
        end = next((i + 1 for i, tok in enumerate(row) if tok in stop_set), len(row))
        out.append(row[:end])
    return out
