"""KV-cache generation against full recomputation, and the sampling and stopping rules."""

import math

import pytest
import torch

from ling.generate import first_stop, generate, sample_next
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
    cache = KVCache(cfg.num_hidden_layers, 32)
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


def test_stop_strings_end_a_row_at_the_token_that_completes_them(tiny_model):
    """Each row stops at its own first completed stop string; the others run on to max_new_tokens."""
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(7))
    free_run = greedy_by_recomputation(tiny_model, prompt, 10)

    def decode(tokens):
        return "".join(f"<{t}>" for t in tokens)

    pair = free_run[0][2:4]
    stop = decode(pair)  # completed by row 0's fourth token at the latest

    def until_pair(row):
        return next((row[: i + 1] for i in range(1, len(row)) if row[i - 1 : i + 1] == pair), row)

    rows = generate(tiny_model, prompt, 10, stop_strings=["never", stop], decode=decode)
    assert rows == [until_pair(free_run[0]), until_pair(free_run[1])] and len(rows[0]) <= 4
    assert first_stop(decode(rows[0]), ["never", stop]) == len(decode(rows[0])) - len(stop)
    with pytest.raises(ValueError, match="need decode="):
        generate(tiny_model, prompt, 4, stop_strings=["x"])


def test_one_forward_per_token_read_and_the_mode_handling(tiny_model):
    calls = []
    handle = tiny_model.register_forward_hook(lambda module, args, out: calls.append(module.training))
    prompt = torch.zeros(1, 3, dtype=torch.long)
    try:
        tiny_model.train()
        generate(tiny_model, prompt, 6)
        assert calls == [False] * 6 and tiny_model.training  # prefill + 5 steps, in eval mode, then restored
        calls.clear()
        tiny_model.model.layers[0].eval()  # a mixed-mode model is left exactly as it is
        generate(tiny_model, prompt, 6, eval_mode=False)
        assert calls == [True] * 6 and tiny_model.training and not tiny_model.model.layers[0].training
    finally:
        handle.remove()


def test_kv_cache_buffers_follow_the_first_keys():
    """A model under mixed precision writes bf16 keys while its stored weights are fp32."""
    cache = KVCache(2, 6)
    k = torch.randn(3, 2, 4, 8, dtype=torch.bfloat16)
    keys, values = cache.update(1, k, k + 1)
    assert cache.keys[0] is None and cache.keys[1].shape == (3, 2, 6, 8) and keys.dtype == torch.bfloat16
    torch.testing.assert_close(values, k + 1)
    cache.advance(4)
    with pytest.raises(ValueError, match="holds 6 positions but 7"):
        cache.update(1, k[:, :, :3], k[:, :, :3])
