"""Seeded, stateless sampling: shuffled row orders and per-step mixture counts.

Everything here is a pure function of its keys, so a data position is just a step number: a
resumed run recomputes exactly where it was, on every rank, with no sampler state to save.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK32 = 0xFFFF_FFFF


def stable_key(*parts: object) -> int:
    """A 64-bit key from ints and strings that is the same in every process (unlike `hash` on str)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _round_keys(key: int, rounds: int) -> list[int]:
    rng = np.random.Generator(np.random.Philox(key=key))
    return [int(k) for k in rng.integers(0, 2**32, size=rounds, dtype=np.uint64)]


def permute(indices: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A seeded bijection of range(n) applied to `indices`, without materialising a permutation.

    A Feistel network permutes the smallest even-bit domain >= n; values that land outside range(n)
    are permuted again until they fall inside (cycle walking), which keeps it a bijection of
    range(n). numpy and torch only offer full permutations, which need O(n) memory per epoch of
    every source; this costs O(len(indices)).
    """
    if n <= 1:
        return np.zeros_like(indices, dtype=np.int64)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    keys = _round_keys(key, rounds)

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            mixed = (right * 0x9E3779B1 + k) & _MASK32
            mixed ^= mixed >> 15
            mixed = (mixed * 0x85EBCA6B) & _MASK32
            mixed ^= mixed >> 13
            left, right = right, left ^ (mixed & mask)
        return (left << half) | right

    out = once(np.asarray(indices, dtype=np.uint64))
    outside = out >= n
    while outside.any():
        out[outside] = once(out[outside])
        outside = out >= n
    return out.astype(np.int64)


def mixture_counts(rows_per_step: np.ndarray, weights: np.ndarray, key: int) -> np.ndarray:
    """[steps, sources] rows drawn from each source at each step: one multinomial per step.

    numpy draws the steps one after another from one stream, so the counts of a step depend only on
    the key and the steps before it: a prefix of `rows_per_step` gives a prefix of the result.
    """
    probs = np.asarray(weights, dtype=np.float64)
    probs = probs / probs.sum()
    rng = np.random.Generator(np.random.Philox(key=key))
    return rng.multinomial(np.asarray(rows_per_step, dtype=np.int64), probs).astype(np.int64)
