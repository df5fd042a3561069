"""Whole-model construction and initialisation, causality, layer layout, and attention vs a slow reference."""

import math

import pytest
import torch

import ling
from ling.model import build_model
from ling.model.attention import Attention
from ling.model.mlp import SwiGLU
from ling.model.moe import MoE
from ling.model.norm import RMSNorm
from ling.model.rope import RotaryEmbedding


def test_meta_build_allocates_nothing(tiny_config):
    model = build_model(tiny_config, device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors
    assert all(t.is_meta for t in tensors)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_meta_then_to_empty_and_init(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config, device="meta").to_empty(device="cpu")
    model.init_weights()
    std = tiny_config.initializer_range
    assert std == 0.006
    checked = 0
    for name, param in model.named_parameters():
        assert not param.is_meta
        assert torch.isfinite(param).all(), name
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        n = param.numel()
        sample_std = param.double().std().item()
        sample_mean = param.double().mean().item()
        # Sample std of n normals has relative spread ~ 1/sqrt(2n); allow 6 sigma plus a floor.
        assert abs(sample_std - std) <= std * (6 / math.sqrt(2 * n) + 0.01), (name, sample_std)
        assert abs(sample_mean) <= 6 * std / math.sqrt(n), (name, sample_mean)
        checked += 1
    assert checked >= 20
    for moe in model.moe_layers():
        assert torch.equal(moe.gate.expert_bias, torch.zeros(tiny_config.num_experts))
        assert moe.gate.expert_bias.dtype == torch.float32
    for module in model.modules():
        if isinstance(module, RMSNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
    R = tiny_config.rope_dim
    inv_freq = model.model.rotary_emb.inv_freq
    for j, got in enumerate(inv_freq.tolist()):
        assert got == pytest.approx(tiny_config.rope_theta ** (-2 * j / R), rel=1e-6)


def test_init_weights_custom_std(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config.replace(initializer_range=0.05))
    w = model.model.word_embeddings.weight.double()
    assert w.std().item() == pytest.approx(0.05, rel=0.03)
    e = model.model.layers[1].mlp.experts.gate_proj.double()
    assert e.std().item() == pytest.approx(0.05, rel=0.03)


def test_equal_seeds_equal_weights(tiny_config):
    torch.manual_seed(123)
    a = build_model(tiny_config).state_dict()
    torch.manual_seed(123)
    b = build_model(tiny_config).state_dict()
    torch.manual_seed(124)
    c = build_model(tiny_config).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert not torch.equal(a["model.layers.1.mlp.experts.down_proj"], c["model.layers.1.mlp.experts.down_proj"])


def test_build_model_dtype(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_layer_layout(tiny_config):
    cfg = ling.preset("tiny", num_hidden_layers=4, first_k_dense_replace=2)
    model = build_model(cfg, device="meta")
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [SwiGLU, SwiGLU, MoE, MoE]
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    assert model.model.layers[2].mlp.experts.gate_proj.shape == (
        cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size,
    )  # fmt: skip
    assert isinstance(model.model.mtp_layers[0].mlp, MoE)
    assert model.model.mtp_layers[0].layer_idx == 4
    assert len(model.moe_layers()) == 3

    names = dict(build_model(tiny_config, device="meta").named_parameters())
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.weight" in names
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in names
    assert names["model.layers.0.attention.query_key_value.weight"].shape == (
        (tiny_config.num_attention_heads + 2 * tiny_config.num_key_value_heads) * tiny_config.head_dim,
        tiny_config.hidden_size,
    )
    assert "model.mtp_layers.0.eh_proj.weight" in names
    assert names["model.mtp_layers.0.eh_proj.weight"].shape == (tiny_config.hidden_size, 2 * tiny_config.hidden_size)


def test_all_dense_and_all_moe_layouts():
    dense = build_model(ling.preset("tiny", first_k_dense_replace=3, num_nextn_predict_layers=0), device="meta")
    assert all(isinstance(layer.mlp, SwiGLU) for layer in dense.model.layers)
    moe = build_model(ling.preset("tiny", first_k_dense_replace=0), device="meta")
    assert all(isinstance(layer.mlp, MoE) for layer in moe.model.layers)


def test_causality(tiny_model):
    torch.manual_seed(7)
    ids = torch.randint(0, 512, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 17) % 512
    changed[1, 9] = (ids[1, 9] + 3) % 512
    with torch.no_grad():
        a = tiny_model(ids).logits
        b = tiny_model(changed).logits
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6], b[:, 6], atol=1e-4)


def test_logits_and_backward(tiny_model):
    torch.manual_seed(8)
    ids = torch.randint(0, 512, (2, 6))
    out = tiny_model(ids, labels=torch.randint(0, 512, (2, 6)))
    assert out.logits.shape == (2, 6, 512)
    out.loss.backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


# ---- attention vs a slow reference -----------------------------------------------------------


def reference_attention(attn, x, positions, cfg):
    """Slow GQA in float64: split the fused rows [Q heads | K heads | V heads], per-head RMSNorm over
    head_dim, partial rotate-half RoPE by hand, kv head of query head h is h // (n_h / n_kv), causal softmax."""
    Hq, Hkv, D, R = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rope_dim
    eps = cfg.rms_norm_eps
    W = attn.query_key_value.weight.detach().double()
    Wq, Wk, Wv = W[: Hq * D], W[Hq * D : (Hq + Hkv) * D], W[(Hq + Hkv) * D :]
    qn = attn.query_layernorm.weight.detach().double()
    kn = attn.key_layernorm.weight.detach().double()
    Wo = attn.dense.weight.detach().double()
    inv_freq = [cfg.rope_theta ** (-2 * j / R) for j in range(R // 2)]
    B, T, _ = x.shape
    out = torch.zeros(B, T, cfg.hidden_size, dtype=torch.float64)

    def norm(v, w):
        return v / torch.sqrt(v.square().mean() + eps) * w

    def rope(v, pos):
        v = v.clone()
        half = R // 2
        for i in range(half):
            c, s = math.cos(pos * inv_freq[i]), math.sin(pos * inv_freq[i])
            a, b = v[i].item(), v[i + half].item()
            v[i], v[i + half] = a * c - b * s, b * c + a * s
        return v

    for b in range(B):
        xb = x[b].double()
        q = [[rope(norm(xb[t] @ Wq[h * D : (h + 1) * D].T, qn), positions[t]) for h in range(Hq)] for t in range(T)]
        k = [[rope(norm(xb[t] @ Wk[g * D : (g + 1) * D].T, kn), positions[t]) for g in range(Hkv)] for t in range(T)]
        v = [[xb[t] @ Wv[g * D : (g + 1) * D].T for g in range(Hkv)] for t in range(T)]
        for t in range(T):
            heads = []
            for h in range(Hq):
                g = h // (Hq // Hkv)
                logits = [float(q[t][h] @ k[s][g]) / math.sqrt(D) for s in range(t + 1)]
                m = max(logits)
                probs = [math.exp(lg - m) for lg in logits]
                z = sum(probs)
                heads.append(sum(p / z * v[s][g] for s, p in enumerate(probs)))
            out[b, t] = torch.cat(heads) @ Wo.T
    return out


def test_attention_matches_slow_reference(tiny_config):
    cfg = tiny_config
    torch.manual_seed(9)
    attn = Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.2)
        attn.query_layernorm.weight.add_(1.0)
        attn.key_layernorm.weight.add_(1.0)
    rotary = RotaryEmbedding(cfg)
    B, T = 2, 6
    x = torch.randn(B, T, cfg.hidden_size)
    positions = list(range(3, 3 + T))
    cos, sin = rotary(torch.tensor(positions).expand(B, T), torch.float32)
    with torch.no_grad():
        y = attn(x, cos, sin)
    ref = reference_attention(attn, x, positions, cfg)
    assert y.shape == (B, T, cfg.hidden_size)
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_swapped_kv_blocks_detected(tiny_config):
    """The reference is sensitive to the fused-row layout: swapping the K and V row blocks changes it."""
    cfg = tiny_config
    torch.manual_seed(10)
    attn = Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.2)
    rotary = RotaryEmbedding(cfg)
    x = torch.randn(1, 4, cfg.hidden_size)
    cos, sin = rotary(torch.arange(4)[None], torch.float32)
    with torch.no_grad():
        y = attn(x, cos, sin)
        Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        W = attn.query_key_value.weight
        W.copy_(torch.cat([W[: Hq * D], W[(Hq + Hkv) * D :], W[Hq * D : (Hq + Hkv) * D]]))
    ref_swapped = reference_attention(attn, x, list(range(4)), cfg)
    assert not torch.allclose(y.double(), ref_swapped, atol=1e-3)
