"""Model-size presets: the released Ling 2.0 shapes plus a CPU-sized `tiny` with every feature on.

Presets describe the architecture as trained in the Ling 2.0 report: one MTP layer with loss
weight 0.1 and init std 0.006. The released chat checkpoints ship without the MTP layer; their
own config.json says so and wins when a checkpoint is loaded.
"""

from __future__ import annotations

from ling.config import ConfigError, LingConfig, check_fields

_TRAINING = dict(num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.1, initializer_range=0.006)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        pad_token_id=256,
        eos_token_id=256,
        torch_dtype="float32",
        **_TRAINING,
    ),
    "mini": dict(
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=512,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        **_TRAINING,
    ),
    "flash": dict(
        hidden_size=4096,
        intermediate_size=9216,
        moe_intermediate_size=1024,
        moe_shared_expert_intermediate_size=1024,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        **_TRAINING,
    ),
    "1t": dict(
        hidden_size=8192,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        moe_shared_expert_intermediate_size=2048,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        first_k_dense_replace=4,
        partial_rotary_factor=None,
        rotary_dim=64,
        **_TRAINING,
    ),
}


def preset(name: str, **overrides) -> LingConfig:
    """The config of a named size, with optional field overrides (HF field names)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    check_fields(overrides)
    return LingConfig(**{**PRESETS[key], **overrides})
