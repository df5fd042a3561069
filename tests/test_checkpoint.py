"""HF checkpoint layout in and out, checked against the key names of the released checkpoints."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ling import ConfigError
from ling.checkpoint import CheckpointError, load_pretrained, save_pretrained
from ling.checkpoint.export import ModelSource, hf_stream
from ling.model import build_model


def released_key_shapes(cfg):
    """Every tensor name and shape of a HF Ling checkpoint, written out from the documented layout."""
    H, hd, E = cfg.hidden_size, cfg.head_dim, cfg.num_experts
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    keys = {
        "model.word_embeddings.weight": (cfg.vocab_size, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (cfg.vocab_size, H),
    }

    def block(prefix, moe):
        keys[f"{prefix}.input_layernorm.weight"] = (H,)
        keys[f"{prefix}.attention.query_key_value.weight"] = (qkv, H)
        keys[f"{prefix}.attention.query_layernorm.weight"] = (hd,)
        keys[f"{prefix}.attention.key_layernorm.weight"] = (hd,)
        keys[f"{prefix}.attention.dense.weight"] = (H, cfg.num_attention_heads * hd)
        keys[f"{prefix}.post_attention_layernorm.weight"] = (H,)
        if not moe:
            for proj, shape in (
                ("gate", (cfg.intermediate_size, H)),
                ("up", (cfg.intermediate_size, H)),
                ("down", (H, cfg.intermediate_size)),
            ):
                keys[f"{prefix}.mlp.{proj}_proj.weight"] = shape
            return
        keys[f"{prefix}.mlp.gate.weight"] = (E, H)
        keys[f"{prefix}.mlp.gate.expert_bias"] = (E,)
        I = cfg.moe_intermediate_size  # noqa: E741
        for e in range(E):
            keys[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = (I, H)
            keys[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = (I, H)
            keys[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = (H, I)
        S = cfg.moe_intermediate_size * cfg.num_shared_experts
        keys[f"{prefix}.mlp.shared_experts.gate_proj.weight"] = (S, H)
        keys[f"{prefix}.mlp.shared_experts.up_proj.weight"] = (S, H)
        keys[f"{prefix}.mlp.shared_experts.down_proj.weight"] = (H, S)

    for i in range(cfg.num_hidden_layers):
        block(f"model.layers.{i}", moe=i >= cfg.first_k_dense_replace)
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        block(prefix, moe=True)
        keys[f"{prefix}.enorm.weight"] = (H,)
        keys[f"{prefix}.hnorm.weight"] = (H,)
        keys[f"{prefix}.eh_proj.weight"] = (H, 2 * H)
        keys[f"{prefix}.final_layernorm.weight"] = (H,)
    return keys


@pytest.fixture
def trained_like(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    for moe in model.moe_layers():
        moe.gate.expert_bias.normal_(0, 0.01)
    return model


def logits(model, seed=1):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def all_keys(folder):
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: (file.name, tuple(f.get_slice(k).get_shape())) for k in f.keys()})
    return out


def test_saved_keys_are_the_released_layout(trained_like, tmp_path):
    save_pretrained(trained_like, tmp_path)
    keys = all_keys(tmp_path)
    expected = released_key_shapes(trained_like.config)
    assert {k: shape for k, (_, shape) in keys.items()} == expected
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BailingMoeV2ForCausalLM"]
    assert config["model_type"] == "bailing_moe"
    assert config["num_nextn_predict_layers"] == 1


def test_round_trip_identical_logits_single_and_sharded(trained_like, tmp_path):
    reference = logits(trained_like)
    save_pretrained(trained_like, tmp_path / "one")
    save_pretrained(trained_like, tmp_path / "many", max_shard_size="60KB")
    assert (tmp_path / "one" / "model.safetensors").exists()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    # Every key sits in the shard the index names.
    assert {k: f for k, (f, _) in all_keys(tmp_path / "many").items()} == index["weight_map"]
    for folder in ("one", "many"):
        loaded = load_pretrained(tmp_path / folder)
        assert torch.equal(logits(loaded), reference)
        for a, b in zip(loaded.moe_layers(), trained_like.moe_layers(), strict=True):
            assert torch.equal(a.gate.expert_bias, b.gate.expert_bias)


def test_bf16_save_keeps_expert_bias_fp32(trained_like, tmp_path):
    save_pretrained(trained_like, tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.expert_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.moe_layers()[0].gate.expert_bias.dtype == torch.float32


def test_hand_written_per_expert_file_loads_into_stacked_weights(tiny_config, tmp_path):
    """A checkpoint written key by key (no save_pretrained) with index-coded values lands in place."""
    shapes = released_key_shapes(tiny_config)
    tensors = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        tensors[key] = torch.full(shape, float(i)) + torch.arange(shape[-1]) * 1e-3
    # Two shards with arbitrary names, tied together by an index.
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(tmp_path / "first.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(tmp_path / "second.safetensors"))
    weight_map = {k: "first.safetensors" if j < half else "second.safetensors" for j, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_hf()))

    model = load_pretrained(tmp_path)
    L = tiny_config.num_hidden_layers
    for e in (0, 5, tiny_config.num_experts - 1):
        experts = model.model.layers[2].mlp.experts
        assert torch.equal(experts.gate_proj[e], tensors[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(experts.up_proj[e], tensors[f"model.layers.2.mlp.experts.{e}.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], tensors[f"model.layers.2.mlp.experts.{e}.down_proj.weight"])
        mtp_experts = model.model.mtp_layers[0].mlp.experts
        assert torch.equal(mtp_experts.down_proj[e], tensors[f"model.layers.{L}.mlp.experts.{e}.down_proj.weight"])
    assert torch.equal(model.model.mtp_layers[0].eh_proj.weight, tensors[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, tensors["model.layers.0.mlp.gate_proj.weight"])
    # And written back out, the same tensors come out under the same names.
    out = dict(hf_stream(ModelSource(model)))
    assert out.keys() == tensors.keys()
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_missing_mtp_is_initialised_and_reported(tiny_config, tmp_path, caplog):
    torch.manual_seed(0)
    no_mtp = build_model(tiny_config.replace(num_nextn_predict_layers=0))
    save_pretrained(no_mtp, tmp_path)
    with caplog.at_level(logging.WARNING, logger="ling.checkpoint"):
        model = load_pretrained(tmp_path, num_nextn_predict_layers=1)
    assert "no MTP weights" in caplog.text
    assert len(model.model.mtp_layers) == 1
    eh = model.model.mtp_layers[0].eh_proj.weight
    assert (
        torch.isfinite(eh).all() and 0.5 * tiny_config.initializer_range < eh.std() < 2 * tiny_config.initializer_range
    )
    assert torch.equal(logits(model), logits(no_mtp))
    ids = torch.randint(0, 256, (2, 16))
    assert len(model(ids, labels=ids).mtp_losses) == 1


def test_config_counting_mtp_inside_num_hidden_layers(trained_like, tmp_path):
    save_pretrained(trained_like, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] += config["num_nextn_predict_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(tmp_path)
    assert loaded.config.num_hidden_layers == trained_like.config.num_hidden_layers
    assert torch.equal(logits(loaded), logits(trained_like))


def test_missing_tensor_names_key_and_shape(trained_like, tmp_path):
    tensors = dict(hf_stream(ModelSource(trained_like)))
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(trained_like.config.to_hf()))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight.*\(32, 64\)"):
        load_pretrained(tmp_path)


def test_misshaped_tensor_names_both_shapes(trained_like, tmp_path):
    save_pretrained(trained_like, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"experts\.\d+\.\w+_proj\.weight' .* shape \((32, 64|64, 32)\) .* expects \((48, 64|64, 48)\)",
    ):
        load_pretrained(tmp_path)


def test_unexpected_expert_index(trained_like, tmp_path):
    save_pretrained(trained_like, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_experts"] = 8
    config["n_group"] = 4
    config["num_experts_per_tok"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="only 8 experts|shape"):
        load_pretrained(tmp_path)


def test_corrupt_and_incomplete_folders(trained_like, tmp_path):
    save_pretrained(trained_like, tmp_path / "ok")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(corrupt)

    (corrupt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_pretrained(corrupt)
    (corrupt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "x.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="lists shard 'x.safetensors'"):
        load_pretrained(corrupt)
    (corrupt / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_pretrained(corrupt)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_pretrained(tmp_path / "absent")


def test_resave_removes_stale_shards_and_leaves_no_temporaries(trained_like, tmp_path):
    save_pretrained(trained_like, tmp_path, max_shard_size="60KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    save_pretrained(trained_like, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert torch.equal(logits(load_pretrained(tmp_path)), logits(trained_like))
