"""Every LingConfig switch either changes the model as its name says or is refused with one sentence."""

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from test_router import make_router

import ling
from ling import ConfigError, LingConfig
from ling.checkpoint import CheckpointError, load_pretrained, save_pretrained
from ling.model import build_model
from ling.model.attention import Attention
from ling.model.masks import document_mask
from ling.model.rope import RotaryEmbedding
from ling.params import count_parameters

# ---- use_qk_norm ----------------------------------------------------------------------------------


def hand_attention(attn, x, positions, cfg):
    """Causal GQA in float64 with no QK norm: rows [Q | K | V] of the fused weight, rotate-half RoPE on the
    first rope_dim channels (pairs i, i + rope_dim/2), query head h reads kv head h // (n_h / n_kv)."""
    Hq, Hkv, D, R = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rope_dim
    W = attn.query_key_value.weight.detach().double()
    B, T, _ = x.shape
    xd = x.double()
    q = (xd @ W[: Hq * D].T).view(B, T, Hq, D)
    k = (xd @ W[Hq * D : (Hq + Hkv) * D].T).view(B, T, Hkv, D)
    v = (xd @ W[(Hq + Hkv) * D :].T).view(B, T, Hkv, D)
    half = R // 2
    angle = torch.tensor([[p * cfg.rope_theta ** (-2 * j / R) for j in range(half)] for p in positions])
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]

    def rope(t):
        a, b, rest = t[..., :half], t[..., half:R], t[..., R:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)

    q, k = rope(q), rope(k)
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(Hq):
        g = h // (Hq // Hkv)
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g]) / math.sqrt(D)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out[:, :, h] = probs @ v[:, :, g]
    return out.reshape(B, T, Hq * D) @ attn.dense.weight.detach().double().T


def test_no_qk_norm_builds_no_norm_modules_or_keys():
    cfg = ling.preset("tiny", use_qk_norm=False)
    model = build_model(cfg)
    for layer in [*model.model.layers, *model.model.mtp_layers]:
        assert layer.attention.query_layernorm is None and layer.attention.key_layernorm is None
    names = [n for n, _ in model.named_modules()] + list(model.state_dict())
    assert not [n for n in names if "query_layernorm" in n or "key_layernorm" in n]
    with_norms = build_model(ling.preset("tiny")).state_dict()
    dropped = {k for k in with_norms if k.endswith(("query_layernorm.weight", "key_layernorm.weight"))}
    assert len(dropped) == 2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    assert set(model.state_dict()) == set(with_norms) - dropped


def test_no_qk_norm_attention_matches_hand_computation():
    cfg = ling.preset("tiny", use_qk_norm=False)
    torch.manual_seed(3)
    attn = Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.3)  # q/k far from unit RMS: a hidden norm would show
    B, T = 2, 5
    x = torch.randn(B, T, cfg.hidden_size)
    positions = list(range(2, 2 + T))
    cos, sin = RotaryEmbedding(cfg)(torch.tensor(positions).expand(B, T), torch.float32)
    with torch.no_grad():
        y = attn(x, cos, sin)
    torch.testing.assert_close(y.double(), hand_attention(attn, x, positions, cfg), atol=1e-5, rtol=1e-5)


def _safetensors_keys(folder):
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


def test_no_qk_norm_checkpoint_round_trip(tmp_path):
    cfg = ling.preset("tiny", use_qk_norm=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_pretrained(model, tmp_path)
    keys = _safetensors_keys(tmp_path)
    assert "model.layers.0.attention.query_key_value.weight" in keys
    assert not [k for k in keys if "layernorm" in k and ".attention." in k]
    assert json.loads((tmp_path / "config.json").read_text())["use_qk_norm"] is False
    loaded = load_pretrained(tmp_path)
    assert loaded.config.use_qk_norm is False
    assert loaded.model.layers[0].attention.query_layernorm is None
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # The checkpoint has no norm weights for a model that needs them.
    with pytest.raises(CheckpointError, match=re.escape("attention.query_layernorm.weight")):
        load_pretrained(tmp_path, use_qk_norm=True)


def test_checkpoint_with_qk_norms_refuses_a_model_without_them(tmp_path):
    save_pretrained(build_model(ling.preset("tiny")), tmp_path)
    with pytest.raises(CheckpointError, match=r"attention\.(query|key)_layernorm\.weight.*not a weight"):
        load_pretrained(tmp_path, use_qk_norm=False)


# ---- router switches ------------------------------------------------------------------------------


def hand_selection(scores, bias, cfg):
    """One token: groups ranked by the sum of their two best (biased) scores, then the best experts."""
    per_group = cfg.num_experts // cfg.n_group
    biased = [s + b for s, b in zip(scores, bias, strict=True)]
    group_score = [sum(sorted(biased[g * per_group : (g + 1) * per_group])[-2:]) for g in range(cfg.n_group)]
    kept = sorted(range(cfg.n_group), key=lambda g: group_score[g], reverse=True)[: cfg.topk_group]
    candidates = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
    return sorted(candidates, key=lambda e: biased[e], reverse=True)[: cfg.num_experts_per_tok]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_norm_topk_prob_false_weights_are_raw_scores_times_scaling():
    cfg, router = make_router(norm_topk_prob=False)
    _, normalising = make_router()
    torch.manual_seed(1)
    x = torch.randn(6, cfg.hidden_size) * 2
    routing = router(x)
    assert torch.equal(routing.indices, normalising(x).indices)  # selection does not depend on the switch
    for n in range(x.shape[0]):
        scores = [sigmoid(float(z)) for z in x[n, : cfg.num_experts]]
        chosen = hand_selection(scores, [0.0] * cfg.num_experts, cfg)
        assert sorted(routing.indices[n].tolist()) == sorted(chosen)
        expected = [scores[e] * cfg.routed_scaling_factor for e in routing.indices[n].tolist()]
        torch.testing.assert_close(routing.weights[n].double(), torch.tensor(expected, dtype=torch.float64))
    # Not renormalised: the rows do not sum to the scaling factor.
    assert not torch.allclose(routing.weights.sum(-1), torch.full((6,), cfg.routed_scaling_factor))


def test_expert_bias_disabled_has_no_buffer_and_routes_on_plain_scores():
    cfg, router = make_router(moe_router_enable_expert_bias=False)
    assert router.expert_bias is None
    assert "expert_bias" not in dict(router.named_buffers()) and "expert_bias" not in router.state_dict()
    torch.manual_seed(2)
    x = torch.randn(8, cfg.hidden_size) * 2
    routing = router(x)
    for n in range(x.shape[0]):
        scores = [sigmoid(float(z)) for z in x[n, : cfg.num_experts]]
        assert sorted(routing.indices[n].tolist()) == sorted(hand_selection(scores, [0.0] * cfg.num_experts, cfg))
        total = sum(scores[e] for e in routing.indices[n].tolist())
        expected = [scores[e] / total * cfg.routed_scaling_factor for e in routing.indices[n].tolist()]
        torch.testing.assert_close(routing.weights[n].double(), torch.tensor(expected, dtype=torch.float64))


def test_model_without_expert_bias_trains_casts_and_skips_bias_updates():
    from ling.lightning_module import LingModule

    module = LingModule(model="tiny", model_overrides={"moe_router_enable_expert_bias": False})
    module.configure_model()
    model = module.model
    assert all(moe.gate.expert_bias is None for moe in model.moe_layers())
    assert not [k for k in model.state_dict() if k.endswith("expert_bias")]
    ids = torch.randint(0, 512, (2, 8))
    out = model(ids, labels=torch.randint(0, 512, (2, 8)))
    out.loss.backward()
    module.expert_load.add(out.tokens_per_expert)
    logged = []
    module.log = lambda name, value, **kwargs: logged.append(name)
    module._balance_experts()  # no bias to update; the load metrics are still logged
    assert "load/max_violation_max" in logged
    assert model.to(torch.bfloat16)(ids).logits.dtype == torch.bfloat16


def test_router_dtype_fp64_computes_the_router_in_float64():
    cfg, router = make_router(router_dtype="fp64")
    x = torch.randn(5, cfg.hidden_size, dtype=torch.float32)
    routing = router(x.to(torch.bfloat16))
    assert routing.logits.dtype == routing.weights.dtype == torch.float64
    torch.testing.assert_close(routing.logits, x.to(torch.bfloat16).double()[:, : cfg.num_experts], rtol=0, atol=0)
    _, fp32 = make_router(router_dtype="float32")
    assert fp32(x).logits.dtype == torch.float32


# ---- attention_dropout ----------------------------------------------------------------------------


def test_attention_dropout_is_unbiased_in_training_and_off_in_eval():
    cfg = ling.preset("tiny", attention_dropout=0.5)
    torch.manual_seed(4)
    attn = Attention(cfg, layer_idx=0)
    plain = Attention(ling.preset("tiny"), layer_idx=0)
    with torch.no_grad():
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.3)
    plain.load_state_dict(attn.state_dict())
    B, T = 1, 6
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(T).expand(B, T), torch.float32)
    with torch.no_grad():
        reference = plain(x, cos, sin)
        assert torch.equal(attn.eval()(x, cos, sin), reference)
        attn.train()
        assert not torch.allclose(attn(x, cos, sin), reference)
        # Dropout rescales the kept probabilities by 1 / (1 - p): the mean output is the plain one.
        mean = torch.stack([attn(x, cos, sin) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, reference, atol=0.05 * reference.abs().max().item(), rtol=0)


def test_attention_dropout_refused_with_a_flex_block_mask_in_training():
    cfg = ling.preset("tiny", attention_dropout=0.1)
    attn = Attention(cfg, layer_idx=0).train()
    x = torch.randn(1, 4, cfg.hidden_size)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(4).expand(1, 4), torch.float32)
    mask = document_mask(torch.tensor([[0, 0, 1, 1]]), backend="flex")
    with pytest.raises(ValueError, match=re.escape("attention_dropout=0.1 cannot be applied")):
        attn(x, cos, sin, attn_mask=mask)


# ---- rejected values, round trip, counts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "sentence"),
    [
        ("use_rmsnorm", False, "use_rmsnorm=False is not supported; every Ling 2.0 norm is an RMSNorm"),
        ("router_dtype", "bf16", "router_dtype='bf16' is not supported; the router computes in one of"),
        ("router_dtype", None, "router_dtype=None is not supported"),
        ("embedding_dropout", 0.1, "embedding_dropout=0.1 is not supported; the Ling 2.0 model applies no such"),
        ("output_dropout", 0.2, "output_dropout=0.2 is not supported; the Ling 2.0 model applies no such"),
        ("attention_dropout", 1.0, "attention_dropout=1.0 must be a probability in [0, 1)."),
        ("attention_dropout", -0.1, "attention_dropout=-0.1 must be a probability in [0, 1)."),
        ("use_qk_norm", "no", "use_qk_norm='no' must be true or false."),
        ("norm_topk_prob", 1, "norm_topk_prob=1 must be true or false."),
        ("moe_router_enable_expert_bias", None, "moe_router_enable_expert_bias=None must be true or false."),
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported; Ling 2.0 uses 'silu'."),
        ("score_function", "softmax", "score_function='softmax' is not supported; Ling 2.0 uses 'sigmoid'."),
        ("use_qkv_bias", True, "use_qkv_bias=True is not supported; Ling 2.0 linears have no bias."),
        ("use_bias", True, "use_bias=True is not supported; Ling 2.0 linears have no bias."),
        ("tie_word_embeddings", True, "tie_word_embeddings must be false"),
    ],
)
def test_unsupported_values_are_refused_with_a_sentence(field, value, sentence):
    with pytest.raises(ConfigError, match=re.escape(sentence)):
        LingConfig(**{field: value})
    data = LingConfig().to_hf() | {field: value}
    with pytest.raises(ConfigError, match=re.escape(sentence)):
        LingConfig.from_hf(data)


def test_honoured_switches_round_trip_through_config_json(tmp_path):
    cfg = ling.preset(
        "tiny",
        use_qk_norm=False,
        norm_topk_prob=False,
        moe_router_enable_expert_bias=False,
        router_dtype="fp64",
        attention_dropout=0.1,
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["use_qk_norm"] is False and data["norm_topk_prob"] is False
    assert data["moe_router_enable_expert_bias"] is False and data["router_dtype"] == "fp64"
    assert data["attention_dropout"] == 0.1
    assert LingConfig.from_json_file(tmp_path / "config.json") == cfg


def test_parameter_counts_follow_the_switches():
    cfg = ling.preset("tiny")
    base = count_parameters(cfg)["without MTP"]
    no_norm = count_parameters(cfg.replace(use_qk_norm=False))["without MTP"]
    no_bias = count_parameters(cfg.replace(moe_router_enable_expert_bias=False))["without MTP"]
    norms = 2 * cfg.head_dim * cfg.num_hidden_layers
    biases = cfg.num_experts * cfg.num_moe_layers
    assert (base.total - no_norm.total, base.active - no_norm.active) == (norms, norms)
    assert (base.total - no_bias.total, base.active - no_bias.active) == (biases, biases)
