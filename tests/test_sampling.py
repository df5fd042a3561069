"""Seeded stateless sampling: row permutations are bijections, mixture counts are prefix-stable."""

import numpy as np
import pytest

from ling.data.sampling import mixture_counts, permute, stable_key


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1025, 65537])
def test_permute_is_a_bijection(n):
    out = permute(np.arange(n), n, key=stable_key("t", n))
    assert np.array_equal(np.sort(out), np.arange(n))


def test_permute_depends_on_the_key_and_only_on_it():
    n = 5000
    a = permute(np.arange(n), n, key=1)
    assert np.array_equal(a, permute(np.arange(n), n, key=1))
    assert not np.array_equal(a, permute(np.arange(n), n, key=2))
    # Any subset of indices maps as in the full permutation.
    picks = np.array([4999, 0, 17, 17, 2500])
    assert np.array_equal(permute(picks, n, key=1), a[picks])
    # A shuffled order: far from the identity.
    assert (a == np.arange(n)).mean() < 0.01


def test_stable_key_is_fixed_across_processes():
    # A literal value: Python's hash() of strings is salted per process, this must not be.
    assert stable_key(7, "rows", 0) == stable_key(7, "rows", 0)
    assert stable_key(7, "rows", 0) != stable_key(7, "rows", 1)
    import subprocess
    import sys

    code = "from ling.data.sampling import stable_key; print(stable_key(7, 'rows', 0))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(other) == stable_key(7, "rows", 0)


def test_mixture_counts_sum_to_rows_and_are_prefix_stable():
    rows = np.array([16, 16, 8, 32, 16] * 40)
    counts = mixture_counts(rows, np.array([3.0, 1.0, 0.0]), key=9)
    assert np.array_equal(counts.sum(1), rows)
    assert counts[:, 2].sum() == 0  # a zero weight never draws
    prefix = mixture_counts(rows[:37], np.array([3.0, 1.0, 0.0]), key=9)
    assert np.array_equal(prefix, counts[:37])
    share = counts[:, 0].sum() / rows.sum()
    # Binomial: n = 3,520 rows, p = 0.75 -> std 0.0073; allow 4 std.
    assert abs(share - 0.75) < 0.03
