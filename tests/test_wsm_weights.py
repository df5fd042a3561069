"""WSM merge weights against the closed forms of the decay <-> merge duality, and the fp32 merge accumulator
against float64 sums computed by hand."""

import io
import math

import pytest
import torch

import ling.wsm as wsm
from ling.config import ConfigError
from ling.wsm import SHAPES, MergeAccumulator, decay_multipliers, merge_coefficients, merge_weights

COUNTS = list(range(1, 41)) + [64, 100, 257]
ALPHA = {"ema": 0.3}


@pytest.mark.parametrize("shape", SHAPES)
def test_weights_non_negative_and_sum_to_one(shape):
    for count in COUNTS:
        c = merge_weights(shape, count, alpha=ALPHA.get(shape))
        assert len(c) == count
        assert all(v >= 0.0 for v in c), (count, c)
        assert math.fsum(c) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_suffix_sums_reproduce_multipliers(shape):
    for count in COUNTS:
        w = decay_multipliers(shape, count, alpha=ALPHA.get(shape))
        c = merge_weights(shape, count, alpha=ALPHA.get(shape))
        assert len(w) == count - 1
        suffix = [math.fsum(c[i:]) for i in range(1, count)]
        assert suffix == pytest.approx(w, abs=1e-12)
        assert all(1.0 >= a >= b >= 0.0 for a, b in zip([1.0] + w, w))


def test_multipliers_sample_the_decay_on_the_grid():
    # Interval i of a window of `count` snapshots sits at x = i / count.
    k = 6
    x = [i / (k + 1) for i in range(1, k + 1)]
    assert decay_multipliers("mean", k + 1) == pytest.approx([1 - v for v in x])
    assert decay_multipliers("cosine", k + 1) == pytest.approx([(1 + math.cos(math.pi * v)) / 2 for v in x])
    assert decay_multipliers("1-sqrt", k + 1) == pytest.approx([1 - math.sqrt(v) for v in x])
    assert decay_multipliers("mean", 1) == []


def test_mean_is_linear_decay_and_the_plain_mean():
    for count in COUNTS:
        k = count - 1
        linear = [1 - i / (k + 1) for i in range(1, k + 1)]
        assert merge_coefficients(linear) == pytest.approx([1 / count] * count, abs=1e-12)
        c = merge_weights("mean", count)
        assert c == pytest.approx([1 / count] * count, abs=1e-12)
        # Constant tensors 1 .. k+1 merge to (k+2)/2.
        acc = MergeAccumulator({"x": torch.zeros(3, dtype=torch.float64)})
        for j, cj in enumerate(c):
            acc.add({"x": torch.full((3,), float(j + 1), dtype=torch.float64)}, cj)
        assert acc.merged()["x"].tolist() == pytest.approx([(k + 2) / 2] * 3, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5, 1.0])
def test_ema_closed_form(alpha):
    for count in COUNTS:
        k = count - 1
        expected = [(1 - alpha) ** k] + [alpha * (1 - alpha) ** (k - j) for j in range(1, k + 1)]
        assert merge_weights("ema", count, alpha=alpha) == pytest.approx(expected, rel=1e-9, abs=1e-15)
        w = decay_multipliers("ema", count, alpha=alpha)
        assert w == pytest.approx([1 - (1 - alpha) ** (k - i + 1) for i in range(1, k + 1)], abs=1e-12)


def test_ema_is_the_running_average_over_snapshots():
    # e <- (1 - a) e + a theta_j, started at theta_0: the same weights, by recurrence instead of formula.
    alpha, count = 0.2, 7
    snaps = [float(2**j) for j in range(count)]
    ema = snaps[0]
    for value in snaps[1:]:
        ema = (1 - alpha) * ema + alpha * value
    c = merge_weights("ema", count, alpha=alpha)
    assert math.fsum(cj * v for cj, v in zip(c, snaps)) == pytest.approx(ema, rel=1e-12)


def test_cosine_weighs_the_middle_most():
    for count in range(3, 41):
        c = merge_weights("cosine", count)
        mid = (count - 1) / 2
        assert c == pytest.approx(c[::-1], abs=1e-12)  # symmetric around the middle of the window
        top = max(c)
        assert all(abs(j - mid) <= 1 for j, v in enumerate(c) if v == pytest.approx(top, abs=1e-12))
        assert c[0] < top and c[-1] < top
        # Monotone up to the middle, then down.
        half = count // 2
        assert all(a <= b + 1e-12 for a, b in zip(c[:half], c[1 : half + 1]))


def test_one_minus_sqrt_closed_form():
    for count in range(2, 41):
        k = count - 1
        c = merge_weights("1-sqrt", count)
        assert c[0] == pytest.approx(math.sqrt(1 / (k + 1)), abs=1e-12)
        assert c[-1] == pytest.approx(1 - math.sqrt(k / (k + 1)), abs=1e-12)
        for j in range(1, k):
            assert c[j] == pytest.approx(math.sqrt((j + 1) / (k + 1)) - math.sqrt(j / (k + 1)), abs=1e-12)


def test_explicit_weights_are_returned():
    assert merge_weights(None, 3, weights=[0.25, 0.25, 0.5]) == [0.25, 0.25, 0.5]
    assert merge_weights(None, 2, weights=(0.5, 0.5 + 5e-7)) == [0.5, 0.5 + 5e-7]
    assert merge_weights(None, 1, weights=[1]) == [1.0]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"shape": "linear", "count": 3}, r"Unknown WSM merge shape 'linear'; valid shapes are 'mean', 'cosine', "),
        ({"shape": "mean", "count": 0}, r"at least one snapshot, got count=0\."),
        ({"shape": "mean", "count": -2}, r"at least one snapshot, got count=-2\."),
        ({"shape": None, "count": 0, "weights": []}, r"at least one snapshot, got count=0\."),
        ({"shape": "ema", "count": 3}, r"'ema' WSM merge shape needs alpha"),
        ({"shape": "ema", "count": 3, "alpha": 0.0}, r"alpha=0\.0 is outside \(0, 1\]"),
        ({"shape": "ema", "count": 3, "alpha": 1.5}, r"alpha=1\.5 is outside \(0, 1\]"),
        ({"shape": "ema", "count": 3, "alpha": -0.1}, r"alpha=-0\.1 is outside \(0, 1\]"),
        ({"shape": "cosine", "count": 3, "alpha": 0.1}, r"alpha=0\.1 only applies to the 'ema' .* not 'cosine'"),
        ({"shape": None, "count": 2, "weights": [1.2, -0.2]}, r"non-negative, got -0\.2 at position 1\."),
        ({"shape": None, "count": 2, "weights": [0.5, 0.4]}, r"must sum to 1 \(within 1e-06\), got \[0\.5, 0\.4\]"),
        ({"shape": None, "count": 2, "weights": [0.5, 0.5 + 2e-6]}, r"must sum to 1"),
        ({"shape": None, "count": 3, "weights": [0.5, 0.5]}, r"Got 2 merge weights for a window of 3 snapshots"),
        ({"shape": None, "count": 2, "weights": [float("nan"), 1.0]}, r"finite numbers, got nan at position 0\."),
        ({"shape": "mean", "count": 2, "weights": [0.5, 0.5]}, r"either a WSM merge shape or explicit weights"),
        ({"shape": None, "count": 2}, r"needs a shape .* or explicit weights, got neither\."),
    ],
)
def test_bad_input_is_one_sentence(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        merge_weights(**kwargs)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_bad_multipliers():
    with pytest.raises(ConfigError, match=r"non-increasing in \[0, 1\].*w_2=0\.6 after 0\.5"):
        merge_coefficients([0.5, 0.6])
    with pytest.raises(ConfigError, match=r"w_1=1\.5 after 1\.0"):
        merge_coefficients([1.5])
    assert merge_coefficients([]) == [1.0]


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.nn.Parameter(torch.randn(5, 4, generator=g).to(torch.bfloat16)),
        "norm.weight": torch.nn.Parameter(torch.randn(4, generator=g)),
        "mlp.gate.expert_bias": torch.randn(6, generator=g),
        "steps": torch.tensor([seed, 10 * seed], dtype=torch.int64),
        "mask": torch.tensor([seed % 2 == 0, True]),
    }


def _by_hand(snaps, weights):
    """sum_j w_j theta_j in float64, cast to each tensor's dtype (the last snapshot for non-floats)."""
    out = {}
    for name, value in snaps[-1].items():
        if value.is_floating_point():
            total = sum(w * s[name].detach().double() for w, s in zip(weights, snaps))
            out[name] = total.to(value.dtype)
        else:
            out[name] = value
    return out


def test_accumulator_matches_float64_by_hand_and_keeps_dtypes():
    snaps = [_model_state(seed) for seed in range(1, 5)]
    weights = merge_weights("1-sqrt", len(snaps))
    acc = MergeAccumulator(snaps[0])
    for w, s in zip(weights, snaps):
        acc.add(s, w)
    assert acc.count == 4 and acc.total_weight == pytest.approx(1.0)
    merged, expected = acc.merged(), _by_hand(snaps, weights)
    assert list(merged) == list(snaps[0])
    for name, value in expected.items():
        assert merged[name].dtype == value.dtype, name
        assert not merged[name].requires_grad
        if value.dtype == torch.bfloat16:  # fp32 accumulation may round to the neighbouring bf16 value
            torch.testing.assert_close(merged[name], value, atol=0, rtol=2**-7)
        elif value.is_floating_point():
            torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(merged[name], value), name
    assert merged["mlp.gate.expert_bias"].dtype == torch.float32
    assert merged["steps"].tolist() == [4, 40]


def test_accumulator_is_exact_on_dyadic_values():
    # Values and weights exact in bf16 and fp32: the merge must come out bit for bit.
    snaps = [
        {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16), "b": torch.tensor([4.0, 8.0])},
        {"w": torch.tensor([3.0, 2.0, 1.5], dtype=torch.bfloat16), "b": torch.tensor([0.0, 16.0])},
        {"w": torch.tensor([5.0, 6.0, -0.5], dtype=torch.bfloat16), "b": torch.tensor([2.0, 1.0])},
    ]
    acc = MergeAccumulator(snaps[0])
    for w, s in zip([0.25, 0.25, 0.5], snaps):
        acc.add(s, w)
    merged = acc.merged()
    assert merged["w"].dtype == torch.bfloat16 and merged["w"].tolist() == [3.5, 3.0, 0.25]
    assert merged["b"].tolist() == [2.0, 6.5]


def test_partial_window_is_the_weighted_mean_so_far():
    acc = MergeAccumulator({"x": torch.zeros(2)})
    acc.add({"x": torch.tensor([1.0, 2.0])}, 1.0)
    acc.add({"x": torch.tensor([3.0, 6.0])}, 3.0)
    assert acc.merged()["x"].tolist() == [2.5, 5.0]


def test_chunked_add_matches_whole_tensor(monkeypatch):
    g = torch.Generator().manual_seed(0)
    snaps = [{"x": torch.randn(37, 11, generator=g).to(torch.bfloat16)} for _ in range(3)]
    weights = merge_weights("cosine", 3)
    whole = MergeAccumulator(snaps[0])
    for w, s in zip(weights, snaps):
        whole.add(s, w)
    monkeypatch.setattr(wsm, "CAST_CHUNK", 16)
    chunked = MergeAccumulator(snaps[0])
    for w, s in zip(weights, snaps):
        chunked.add(s, w)
    assert torch.equal(whole.state_dict()["sums"]["x"], chunked.state_dict()["sums"]["x"])


def test_merged_does_not_alias_the_accumulator():
    acc = MergeAccumulator({"x": torch.zeros(2)})
    acc.add({"x": torch.ones(2)}, 1.0)
    acc.merged()["x"].fill_(7.0)
    assert acc.merged()["x"].tolist() == [1.0, 1.0]


def test_copy_into_live_model_and_restore_bit_exact():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    model[1].register_buffer("expert_bias", torch.randn(3))
    model[1].register_buffer("counter", torch.tensor(5))
    live = model.state_dict()
    saved = {k: v.clone() for k, v in live.items()}
    snaps = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        snaps.append({k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v + seed
                      for k, v in live.items()})  # fmt: skip
    acc = MergeAccumulator(live)
    for w, s in zip(merge_weights("mean", 3), snaps):
        acc.add(s, w)
    merged = acc.merged()
    acc.copy_into(model.state_dict())
    for name, value in model.state_dict().items():
        assert value.dtype == saved[name].dtype
        assert torch.equal(value, merged[name]), name
    assert model[1].counter.item() == 7
    assert model[0].weight.requires_grad
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value.copy_(saved[name])
    for name, value in model.state_dict().items():
        assert torch.equal(value.view(torch.uint8) if value.is_floating_point() else value,
                           saved[name].view(torch.uint8) if value.is_floating_point() else saved[name])  # fmt: skip


def test_state_dict_round_trip_resumes_the_window():
    snaps = [_model_state(seed) for seed in range(1, 5)]
    weights = merge_weights("ema", 4, alpha=0.4)
    straight = MergeAccumulator(snaps[0])
    for w, s in zip(weights, snaps):
        straight.add(s, w)

    first = MergeAccumulator(snaps[0])
    for w, s in zip(weights[:2], snaps[:2]):
        first.add(s, w)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = MergeAccumulator(snaps[0])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.count == 2 and resumed.total_weight == first.total_weight
    for w, s in zip(weights[2:], snaps[2:]):
        resumed.add(s, w)
    assert all(isinstance(v, torch.Tensor) for v in resumed.state_dict()["sums"].values())
    for name, value in straight.merged().items():
        assert torch.equal(resumed.merged()[name], value), name


def test_reset_empties_the_window():
    acc = MergeAccumulator({"x": torch.zeros(2)})
    acc.add({"x": torch.ones(2)}, 1.0)
    acc.reset()
    assert acc.count == 0 and acc.total_weight == 0.0
    with pytest.raises(ConfigError, match=r"holds no weight yet \(0 snapshots"):
        acc.merged()
    acc.add({"x": torch.full((2,), 3.0)}, 1.0)
    assert acc.merged()["x"].tolist() == [3.0, 3.0]


def test_snapshot_mismatch_errors():
    acc = MergeAccumulator({"x": torch.zeros(2), "n": torch.tensor(1)})
    with pytest.raises(ConfigError, match=r"lacks 'n'"):
        acc.add({"x": torch.zeros(2)}, 1.0)
    with pytest.raises(ConfigError, match=r"unexpected entry 'y'"):
        acc.add({"x": torch.zeros(2), "n": torch.tensor(1), "y": torch.zeros(1)}, 1.0)
    with pytest.raises(ConfigError, match=r"'x' has shape \(3,\), but the window's is \(2,\)"):
        acc.add({"x": torch.zeros(3), "n": torch.tensor(1)}, 1.0)
    with pytest.raises(ConfigError, match=r"non-negative finite number, got -1\.0"):
        acc.add({"x": torch.zeros(2), "n": torch.tensor(1)}, -1.0)
    other = MergeAccumulator({"x": torch.zeros(3), "n": torch.tensor(1)})
    with pytest.raises(ConfigError, match=r"saved merge sum 'x' has shape \(3,\)"):
        acc.load_state_dict(other.state_dict())
