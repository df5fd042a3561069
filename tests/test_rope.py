"""Partial rotate-half RoPE and YaRN frequencies against float64 `math` formulas."""

import math

import pytest
import torch

import ling
from ling.model import build_model
from ling.model.rope import RotaryEmbedding, apply_partial_rope, rope_parameters

YARN_128K = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def yarn_128k_config(**overrides):
    kwargs = dict(rope_scaling=dict(YARN_128K), max_position_embeddings=131072)
    kwargs.update(overrides)
    return ling.preset("mini", **kwargs)


def hf_yarn(dim, base, factor, original, beta_fast=32.0, beta_slow=1.0):
    """HF `_compute_yarn_parameters` in float64 with `math` (reference wsm-yarn-lmeval-data.md §2.1)."""

    def find_correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(find_correction_dim(beta_fast)), 0)
    high = min(math.ceil(find_correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    inv_freq = []
    for i in range(dim // 2):
        extra = 1.0 / base ** (2 * i / dim)
        inter = extra / factor
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extra_factor = 1.0 - ramp
        inv_freq.append(inter * (1 - extra_factor) + extra * extra_factor)
    attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention, low, high


def hand_rope(x, positions, inv_freq, rope_dim, scale=1.0):
    """x: [B, T, H, D] float64. Pair (i, i + rope_dim/2) rotated by angle pos * inv_freq[i], explicitly."""
    out = x.clone()
    half = rope_dim // 2
    B, T, H, _ = x.shape
    for b in range(B):
        for t in range(T):
            for i in range(half):
                angle = positions[b][t] * inv_freq[i]
                c, s = math.cos(angle) * scale, math.sin(angle) * scale
                a, bb = x[b, t, :, i], x[b, t, :, i + half]
                out[b, t, :, i] = a * c - bb * s
                out[b, t, :, i + half] = bb * c + a * s
    return out


def test_apply_partial_rope_float64_hand():
    torch.manual_seed(0)
    B, T, H, D, R = 2, 5, 3, 16, 8
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    inv_freq = [10000.0 ** (-2 * j / R) for j in range(R // 2)]
    positions = [[0, 1, 2, 3, 4], [7, 11, 13, 100, 2047]]
    cos = torch.empty(B, T, R, dtype=torch.float64)
    sin = torch.empty(B, T, R, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for j in range(R):
                angle = positions[b][t] * inv_freq[j % (R // 2)]
                cos[b, t, j], sin[b, t, j] = math.cos(angle), math.sin(angle)
    out = apply_partial_rope(x, cos, sin)
    assert torch.equal(out[..., R:], x[..., R:])
    ref = hand_rope(x, positions, inv_freq, R)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)
    # A rotation keeps the norm of every pair.
    half = R // 2
    pair_in = x[..., :half] ** 2 + x[..., half:R] ** 2
    pair_out = out[..., :half] ** 2 + out[..., half:R] ** 2
    assert torch.allclose(pair_in, pair_out, atol=1e-12)


def test_rotary_embedding_plus_apply_matches_hand(tiny_config):
    rotary = RotaryEmbedding(tiny_config)
    R, D = tiny_config.rope_dim, tiny_config.head_dim
    assert (R, D) == (8, 16)
    torch.manual_seed(1)
    x = torch.randn(2, 6, 4, D)
    positions = [[0, 1, 2, 3, 4, 5], [10, 20, 30, 40, 50, 60]]
    cos, sin = rotary(torch.tensor(positions), torch.float32)
    assert cos.shape == (2, 6, R) and cos.dtype == torch.float32
    out = apply_partial_rope(x, cos, sin)
    assert torch.equal(out[..., R:], x[..., R:])
    inv_freq = [tiny_config.rope_theta ** (-2 * j / R) for j in range(R // 2)]
    ref = hand_rope(x.double(), positions, inv_freq, R)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_default_inv_freq(tiny_config):
    for cfg in (tiny_config, ling.preset("mini"), ling.preset("1t")):
        inv_freq, attention = rope_parameters(cfg)
        R, theta = cfg.rope_dim, cfg.rope_theta
        assert inv_freq.dtype == torch.float32
        assert inv_freq.shape == (R // 2,)
        expected = [theta ** (-2 * j / R) for j in range(R // 2)]
        for got, want in zip(inv_freq.tolist(), expected):
            assert got == pytest.approx(want, rel=1e-6)
        assert attention == 1.0


def test_yarn_128k_inv_freq_and_attention_factor():
    cfg = yarn_128k_config()
    assert cfg.rope_dim == 64 and cfg.rope_theta == 600000
    inv_freq, attention = rope_parameters(cfg)
    ref, ref_attention, low, high = hf_yarn(64, 600000.0, 4.0, 32768)
    assert (low, high) == (12, 21)  # the reference table's correction range for this setting
    assert ref_attention == pytest.approx(1.1386, abs=1e-4)
    assert attention == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-12)
    assert inv_freq.shape == (32,)
    for got, want in zip(inv_freq.tolist(), ref):
        assert got == pytest.approx(want, rel=1e-6)
    for i in range(32):
        original = 600000.0 ** (-2 * i / 64)
        if i <= low:  # more than 32 rotations in the original window: unchanged
            assert inv_freq[i].item() == pytest.approx(original, rel=1e-6)
        elif i >= high:  # less than one rotation: interpolated by the factor
            assert inv_freq[i].item() == pytest.approx(original / 4.0, rel=1e-6)
        else:  # blended strictly in between
            assert original / 4.0 < inv_freq[i].item() < original


def test_yarn_explicit_attention_factor_and_betas():
    scaling = dict(YARN_128K, attention_factor=1.5, beta_fast=16, beta_slow=2)
    cfg = yarn_128k_config(rope_scaling=scaling)
    inv_freq, attention = rope_parameters(cfg)
    ref, _, _, _ = hf_yarn(64, 600000.0, 4.0, 32768, beta_fast=16, beta_slow=2)
    assert attention == 1.5
    for got, want in zip(inv_freq.tolist(), ref):
        assert got == pytest.approx(want, rel=1e-6)


def test_yarn_mscale_all_dim_ratio():
    scaling = dict(YARN_128K, mscale=1.0, mscale_all_dim=0.5)
    _, attention = rope_parameters(yarn_128k_config(rope_scaling=scaling))
    expected = (0.1 * 1.0 * math.log(4.0) + 1.0) / (0.1 * 0.5 * math.log(4.0) + 1.0)
    assert attention == pytest.approx(expected, rel=1e-12)


def test_rotary_embedding_cos_sin_carry_attention_factor():
    cfg = yarn_128k_config()
    rotary = RotaryEmbedding(cfg)
    ref, attention, _, _ = hf_yarn(64, 600000.0, 4.0, 32768)
    positions = [0, 1, 1000, 40000, 131071]
    cos, sin = rotary(torch.tensor([positions]), torch.float32)
    assert cos.shape == (1, len(positions), 64)
    for t, pos in enumerate(positions):
        for j in range(64):
            angle = pos * ref[j % 32]
            # fp32 position * inv_freq: allow the phase error of one fp32 rounding of a large angle.
            tol = 2e-6 + 2e-7 * abs(angle)
            assert cos[0, t, j].item() == pytest.approx(math.cos(angle) * attention, abs=tol)
            assert sin[0, t, j].item() == pytest.approx(math.sin(angle) * attention, abs=tol)
    assert cos[0, 0, 0].item() == pytest.approx(1.1386, abs=1e-4)


def test_inv_freq_dtype_stays_fp32_after_bf16_cast(tiny_model):
    tiny_model.to(torch.bfloat16)
    assert tiny_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert tiny_model.lm_head.weight.dtype == torch.bfloat16
    assert "model.rotary_emb.inv_freq" not in tiny_model.state_dict()


def test_inv_freq_values_survive_bf16_build(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config, dtype=torch.bfloat16)
    inv_freq = model.model.rotary_emb.inv_freq
    R = tiny_config.rope_dim
    for j, got in enumerate(inv_freq.tolist()):
        assert got == pytest.approx(tiny_config.rope_theta ** (-2 * j / R), rel=1e-6)


def test_set_rope_changes_cos_sin(tiny_model, tiny_config):
    positions = torch.arange(6)[None]
    cos0, sin0 = tiny_model.model.rotary_emb(positions, torch.float32)
    tiny_model.set_rope(rope_theta=500.0)
    assert tiny_model.config.rope_theta == 500.0
    cos1, sin1 = tiny_model.model.rotary_emb(positions, torch.float32)
    assert not torch.allclose(cos0, cos1)
    R = tiny_config.rope_dim
    for t in range(6):
        for j in range(R):
            angle = t * 500.0 ** (-2 * (j % (R // 2)) / R)
            assert cos1[0, t, j].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin1[0, t, j].item() == pytest.approx(math.sin(angle), abs=1e-6)

    # Switching YaRN on keeps the new theta and applies the attention factor; "keep" leaves scaling alone.
    scaling = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}
    tiny_model.set_rope(rope_scaling=scaling)
    assert tiny_model.config.rope_scaling == scaling and tiny_model.config.rope_theta == 500.0
    cos2, _ = tiny_model.model.rotary_emb(positions, torch.float32)
    assert cos2[0, 0, 0].item() == pytest.approx(0.1 * math.log(2.0) + 1.0, rel=1e-6)
    ref, _, _, _ = hf_yarn(R, 500.0, 2.0, 1024)
    for got, want in zip(tiny_model.model.rotary_emb.inv_freq.tolist(), ref):
        assert got == pytest.approx(want, rel=1e-6)
    tiny_model.set_rope(rope_theta=600.0)
    assert tiny_model.config.rope_scaling == scaling
    tiny_model.set_rope(rope_scaling=None)
    cos3, _ = tiny_model.model.rotary_emb(positions, torch.float32)
    assert cos3[0, 0, 0].item() == pytest.approx(1.0)


def test_set_rope_changes_model_output(tiny_model):
    torch.manual_seed(3)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = tiny_model(ids).logits
        tiny_model.set_rope(rope_theta=10.0)
        after = tiny_model(ids).logits
    # Position 0 has angle 0 under any theta; later positions move.
    assert torch.allclose(before[:, 0], after[:, 0], atol=1e-6)
    assert not torch.allclose(before[:, 1:], after[:, 1:], atol=1e-4)
