"""LingConfig: HF config.json round trip, validation, and the released preset shapes."""

import json

import pytest

import ling
from ling.config import ConfigError, LingConfig
from ling.presets import PRESETS

# A config.json as released for Ling-mini-2.0 (field values from the reference table, §1), with the
# remote-code keys the class does not model (auto_map, max_window_layers, use_cache, ...).
MINI_JSON = {
    "architectures": ["BailingMoeV2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
        "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
        "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM",
    },
    "model_type": "bailing_moe",
    "vocab_size": 157184,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "moe_intermediate_size": 512,
    "moe_shared_expert_intermediate_size": 512,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 256,
    "num_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "score_function": "sigmoid",
    "norm_topk_prob": True,
    "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True,
    "use_qk_norm": True,
    "use_qkv_bias": False,
    "use_bias": False,
    "partial_rotary_factor": 0.5,
    "rope_theta": 600000,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "num_nextn_predict_layers": 0,
    "mtp_loss_scaling_factor": 0,
    "tie_word_embeddings": False,
    "pad_token_id": 156892,
    "eos_token_id": 156892,
    "initializer_range": 0.02,
    "embedding_dropout": 0.0,
    "attention_dropout": 0.0,
    "output_dropout": 0.0,
    "use_rmsnorm": True,
    "torch_dtype": "bfloat16",
    "max_window_layers": 20,
    "use_cache": True,
    "output_router_logits": False,
    "transformers_version": "4.52.3",
}


def _ling_1t_json():
    data = dict(MINI_JSON)
    data.update(
        hidden_size=8192, intermediate_size=18432, moe_intermediate_size=2048,
        moe_shared_expert_intermediate_size=2048, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, first_k_dense_replace=4, rotary_dim=64,
    )  # fmt: skip
    del data["partial_rotary_factor"]
    return data


# ---- HF round trip -----------------------------------------------------------------------------


def test_round_trip_keeps_every_key_and_value():
    out = LingConfig.from_hf(MINI_JSON).to_hf()
    for key, value in MINI_JSON.items():
        assert key in out, key
        assert out[key] == value, (key, out[key], value)
    assert out["architectures"] == ["BailingMoeV2ForCausalLM"]


def test_unknown_keys_survive_round_trip():
    data = dict(MINI_JSON, my_custom_key={"a": [1, 2]})
    cfg = LingConfig.from_hf(data)
    assert cfg.extra["auto_map"] == MINI_JSON["auto_map"]
    assert cfg.extra["my_custom_key"] == {"a": [1, 2]}
    out = cfg.to_hf()
    assert out["auto_map"] == MINI_JSON["auto_map"]
    assert out["my_custom_key"] == {"a": [1, 2]}
    assert out["max_window_layers"] == 20


def test_round_trip_through_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_ling_1t_json()))
    cfg = LingConfig.from_json_file(path)
    (tmp_path / "out.json").write_text(json.dumps(cfg.to_hf()))
    again = json.loads((tmp_path / "out.json").read_text())
    for key, value in _ling_1t_json().items():
        assert again[key] == value, key
    assert LingConfig.from_hf(again).rope_dim == 64


def test_architectures_written_even_when_absent():
    data = {k: v for k, v in MINI_JSON.items() if k != "architectures"}
    assert LingConfig.from_hf(data).to_hf()["architectures"] == ["BailingMoeV2ForCausalLM"]


@pytest.mark.parametrize("model_type", ["bailing_moe", "bailing_moe_v2"])
def test_accepts_both_model_types(model_type):
    cfg = LingConfig.from_hf(dict(MINI_JSON, model_type=model_type))
    assert cfg.model_type == model_type
    assert cfg.to_hf()["model_type"] == model_type


def test_rejects_other_model_type():
    with pytest.raises(ConfigError, match="deepseek_v3"):
        LingConfig.from_hf(dict(MINI_JSON, model_type="deepseek_v3"))


def test_rejects_other_architecture():
    with pytest.raises(ConfigError, match="Qwen3MoeForCausalLM"):
        LingConfig.from_hf(dict(MINI_JSON, architectures=["Qwen3MoeForCausalLM"]))


# ---- partial rope keys -----------------------------------------------------------------------


def test_ling_1t_rotary_dim_key():
    cfg = LingConfig.from_hf(_ling_1t_json())
    assert cfg.rope_dim == 64
    assert cfg.partial_rotary_factor is None
    out = cfg.to_hf()
    assert out["rotary_dim"] == 64
    assert "partial_rotary_factor" not in out


def test_partial_rotary_factor_half_of_128():
    cfg = LingConfig.from_hf(dict(MINI_JSON, partial_rotary_factor=0.5, head_dim=128))
    assert cfg.rope_dim == 64


def test_no_rope_keys_means_full_rotation():
    # The HF modeling file defaults partial_rotary_factor to 1.0 when the key is absent.
    data = {k: v for k, v in MINI_JSON.items() if k != "partial_rotary_factor"}
    assert LingConfig.from_hf(data).rope_dim == 128


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(num_experts=10, n_group=4), "num_experts=10"),
        (dict(topk_group=5, n_group=4), "topk_group=5"),
        # 16 experts in 4 groups of 4; 1 group allowed -> at most 4 experts per token.
        (dict(topk_group=1, num_experts_per_tok=5), "num_experts_per_tok=5"),
        (dict(first_k_dense_replace=4, num_hidden_layers=3), "first_k_dense_replace=4"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6"),
        (dict(partial_rotary_factor=None, rotary_dim=7), "rotary dimension 7 "),
        (dict(head_dim=10, partial_rotary_factor=0.5), "rotary dimension 5 "),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "bogus_key": 1}), "bogus_key"),
        (dict(rope_scaling={"type": "yarn", "factor": 0.5}), "factor=0.5"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(num_shared_experts=-1), "num_shared_experts=-1 must be 0 or a positive integer."),
        (dict(num_nextn_predict_layers=1.5), "num_nextn_predict_layers=1.5 must be 0 or a positive integer."),
        (dict(moe_shared_expert_intermediate_size=-8), "moe_shared_expert_intermediate_size=-8 must be 0 or a"),
        (dict(head_dim=0), "head_dim=0 must be a positive integer."),
    ],
)
def test_validation_errors_name_the_bad_value(overrides, needle):
    with pytest.raises(ConfigError) as info:
        ling.preset("tiny", **overrides)
    assert needle in str(info.value)


def test_validation_errors_from_hf():
    with pytest.raises(ConfigError, match="rotary dimension 63"):
        LingConfig.from_hf(dict(_ling_1t_json(), rotary_dim=63))
    with pytest.raises(ConfigError, match="num_experts=255"):
        LingConfig.from_hf(dict(MINI_JSON, num_experts=255))


@pytest.mark.parametrize(
    ("max_positions", "rope_scaling", "reach"),
    [
        (2048, None, 2048),
        (2048, {"type": "default"}, 2048),
        # The tiny demo's last stage: YaRN on a 256-token window inside a 2,048-position config.
        (2048, {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}, 2048),
        (2048, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, 8192),
        (2048, {"rope_type": "yarn", "factor": 3.0}, 6144),  # the original window defaults to max positions
    ],
)
def test_context_length_is_the_longer_of_the_window_and_yarns_reach(max_positions, rope_scaling, reach):
    config = ling.preset("tiny", max_position_embeddings=max_positions)
    assert config.replace(rope_scaling=rope_scaling).context_length == reach


def test_a_training_stage_is_checked_against_the_same_reach():
    from ling.data.curriculum import Stage
    from ling.lightning_module import LingModule

    module = LingModule(model="tiny")
    yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}
    module._check_context(Stage("yarn", seq_len=2048, rope_scaling=yarn), 2048)
    with pytest.raises(ConfigError, match="^stage 'long' trains 4096-token rows but the model reaches 2048 positions"):
        module._check_context(Stage("long", seq_len=4096, rope_scaling=yarn), 4096)
    module._check_context(Stage("longer", rope_scaling={**yarn, "original_max_position_embeddings": 2048}), 4096)


def test_official_yarn_dict_is_accepted():
    scaling = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
    cfg = LingConfig.from_hf(dict(MINI_JSON, rope_scaling=scaling, max_position_embeddings=131072))
    assert cfg.rope_type == "yarn"
    assert cfg.to_hf()["rope_scaling"] == scaling


def test_from_json_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        LingConfig.from_json_file(tmp_path / "nothing_here" / "config.json")


def test_from_json_file_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64,,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        LingConfig.from_json_file(path)


def test_from_json_file_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError):
        LingConfig.from_json_file(path)


# ---- presets ---------------------------------------------------------------------------------

# (hidden, layers, heads, kv heads, first dense, expert width, dense FFN width) from reference §1.
RELEASED = {
    "mini": (2048, 20, 16, 4, 1, 512, 5120),
    "flash": (4096, 32, 32, 4, 1, 1024, 9216),
    "1t": (8192, 80, 64, 8, 4, 2048, 18432),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_presets(name):
    hidden, layers, heads, kv, dense, moe_ffn, ffn = RELEASED[name]
    cfg = ling.preset(name)
    assert cfg.hidden_size == hidden
    assert cfg.num_hidden_layers == layers
    assert cfg.num_attention_heads == heads
    assert cfg.num_key_value_heads == kv
    assert cfg.head_dim == 128
    assert cfg.first_k_dense_replace == dense
    assert cfg.moe_intermediate_size == moe_ffn
    assert cfg.shared_expert_intermediate_size == moe_ffn
    assert cfg.intermediate_size == ffn
    assert cfg.num_experts == 256
    assert cfg.num_shared_experts == 1
    assert cfg.num_experts_per_tok == 8
    assert (cfg.n_group, cfg.topk_group) == (8, 4)
    assert cfg.routed_scaling_factor == 2.5
    assert cfg.vocab_size == 157184
    assert cfg.rope_dim == 64
    assert cfg.rope_theta == 600000
    assert cfg.max_position_embeddings == 32768
    assert cfg.score_function == "sigmoid"
    assert cfg.tie_word_embeddings is False
    assert cfg.model_type == "bailing_moe"
    assert cfg.num_moe_layers == layers - dense


def test_1t_preset_states_rotary_dim():
    cfg = ling.preset("1t")
    assert cfg.rotary_dim == 64
    assert cfg.to_hf()["rotary_dim"] == 64


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        ling.preset("nope")
    message = str(info.value)
    assert "nope" in message
    for name in ("tiny", "mini", "flash", "1t"):
        assert name in message


def test_preset_is_case_insensitive_and_takes_overrides():
    cfg = ling.preset("MINI", rope_theta=10000.0)
    assert cfg.hidden_size == 2048
    assert cfg.rope_theta == 10000.0
    assert PRESETS["mini"].get("rope_theta") is None  # the override did not leak into the table


def test_tiny_has_every_feature():
    cfg = ling.preset("tiny")
    assert cfg.num_moe_layers >= 2
    assert sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) >= 2
    assert cfg.first_k_dense_replace >= 1
    assert cfg.num_experts >= 16
    assert cfg.n_group >= 4
    assert cfg.topk_group < cfg.n_group
    assert cfg.num_nextn_predict_layers >= 1
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.rope_dim < cfg.head_dim
