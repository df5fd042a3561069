"""KV-cache generation against full recomputation, and the sampling rules."""

import math

import pytest
import torch

from ling.generate import generate, sample_next
from ling.model import KVCache


def greedy_by_recomputation(model, prompt, steps):
    """The slow oracle: re-run the whole sequence for every new token, no cache."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, prompt.shape[1] :].tolist()


def test_kv_cache_greedy_equals_recomputation(tiny_model):
    tiny_model.eval()
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    assert generate(tiny_model, prompt, 12) == greedy_by_recomputation(tiny_model, prompt, 12)


def test_cached_chunks_equal_one_full_forward(tiny_model):
    """Prefill, one token, then a 5-token chunk through the cache: logits equal a single full pass."""
    cfg = tiny_model.config
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(4))
    cache = KVCache(cfg.num_hidden_layers, 2, 32, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    with torch.no_grad():
        full = tiny_model(ids).logits
        parts = [
            tiny_model(ids[:, :8], kv_cache=cache).logits,
            tiny_model(ids[:, 8:9], kv_cache=cache).logits,
            tiny_model(ids[:, 9:], kv_cache=cache).logits,
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 14


def test_stop_token_ends_generation(tiny_model):
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(5))
    free_run = greedy_by_recomputation(tiny_model, prompt, 10)[0]
    stop = free_run[3]
    first = free_run.index(stop)
    assert generate(tiny_model, prompt, 10, stop_tokens=[stop]) == [free_run[: first + 1]]


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.5, generator=gen)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = [math.exp(x / 1.5) for x in (2.0, 1.0, 0.0, -1.0)]
    expected = torch.tensor([e / sum(expected) for e in expected])
    assert (freq - expected).abs().max() < 0.03


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    gen = torch.Generator().manual_seed(1)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it, so tokens 0 and 1 only.
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=gen).tolist()) == {0, 1, 2}
    assert sample_next(logits[:3], 0.0).tolist() == [0, 0, 0]


def test_seeded_sampling_is_reproducible(tiny_model):
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(6))
    runs = [generate(tiny_model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(9)) for _ in "ab"]
    assert runs[0] == runs[1]


def test_too_long_request_is_refused(tiny_model):
    with pytest.raises(ValueError, match="context length 2048"):
        generate(tiny_model, torch.zeros(1, 10, dtype=torch.long), 2040)
