"""`LingConfig`: the Ling 2.0 (BailingMoeV2) hyper-parameters under their Hugging Face names.

Field names are exactly the keys of a released `config.json`, so a config read from a checkpoint
and written back is the same file. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("bailing_moe", "bailing_moe_v2")
ARCHITECTURE = "BailingMoeV2ForCausalLM"
ROPE_TYPES = ("default", "yarn")
# config.json's `router_dtype` (released configs say "fp32", Megatron's `--moe-router-dtype` spelling;
# torch's names are accepted too) -> the torch dtype the router computes in. Never bf16.
ROUTER_DTYPES = {"fp32": "float32", "float32": "float32", "fp64": "float64", "float64": "float64"}
YARN_KEYS = {
    "type",
    "rope_type",
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
}


# The fields that decide the parameters' shapes, each with the least value it may take (null is allowed
# where the field's type says so). A checkpoint's weights fit only a model with the same values, so
# `ling.resume` refuses to change any of them when resuming.
SHAPE_FIELDS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
    "moe_shared_expert_intermediate_size": 0, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "num_experts": 1, "num_shared_experts": 0,
    "first_k_dense_replace": 0, "num_nextn_predict_layers": 0,
}  # fmt: skip
# The other fields that must be positive integers.
POSITIVE_COUNTS = ("num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings")
# Fields that `LingConfig.to_hf` leaves out at these values (the released configs do not have them).
OMITTED_FROM_HF = {
    "partial_rotary_factor": None, "rotary_dim": None, "moe_shared_expert_intermediate_size": None,
    "router_z_loss_coeff": 0.0, "seq_aux_loss_coeff": 0.0,
}  # fmt: skip


class ConfigError(ValueError):
    """A configuration that cannot describe a working Ling model."""


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rope_scaling(rope_scaling: Any) -> None:
    """A `rope_scaling` setting in full: null, {type: default}, or YaRN with a number factor >= 1, an
    integer original_max_position_embeddings and only YaRN's own keys, each of the right kind."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"rope_scaling={rope_scaling!r} must be null or a mapping.")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; use one of {ROPE_TYPES}.")
    if rope_type == "default":
        ignored = sorted(set(rope_scaling) - {"type", "rope_type"})
        if ignored:
            raise ConfigError(
                f"rope_scaling={rope_scaling!r} has type 'default', which would ignore {ignored}; "
                "set type: yarn to scale the rope."
            )
        return
    unknown = set(rope_scaling) - YARN_KEYS
    if unknown:
        raise ConfigError(f"rope_scaling has unknown keys {sorted(unknown)}; YaRN accepts {sorted(YARN_KEYS)}.")
    factor = rope_scaling.get("factor")
    if not is_number(factor) or factor < 1:
        raise ConfigError(f"rope_scaling factor={factor!r} must be a number >= 1 for YaRN.")
    original = rope_scaling.get("original_max_position_embeddings", 1)
    if not _is_id(original) or original == 0:
        raise ConfigError(f"rope_scaling original_max_position_embeddings={original!r} must be a positive integer.")
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = rope_scaling.get(key)
        if value is not None and (not is_number(value) or value <= 0):
            raise ConfigError(f"rope_scaling {key}={value!r} must be a positive number or null.")
    if not isinstance(rope_scaling.get("truncate", True), bool):
        raise ConfigError(f"rope_scaling truncate={rope_scaling['truncate']!r} must be true or false.")


def check_fields(names: Any) -> None:
    """Every name is a LingConfig field (a config.json key); a misspelt one is named with the closest fields."""
    valid = [f.name for f in dataclasses.fields(LingConfig) if f.name != "extra"]
    for name in names:
        if name not in valid and name != "extra":
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(valid)}."
            raise ConfigError(f"{name!r} is not a Ling config field (model_overrides takes config.json keys); {hint}")


@dataclass
class LingConfig:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = None
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    # Honoured: norm_topk_prob false keeps the chosen sigmoid scores unnormalised; no expert bias means
    # selection on the plain scores (and no `expert_bias` tensor); the router runs in fp32 or fp64.
    norm_topk_prob: bool = True
    router_dtype: str = "fp32"
    moe_router_enable_expert_bias: bool = True
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    partial_rotary_factor: float | None = 0.5
    rotary_dim: int | None = None
    rope_theta: float = 600000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 156892
    # Released configs list several end-of-text ids (e.g. [156892, 156895]); a list is kept as given.
    eos_token_id: int | list[int] | None = 156892
    initializer_range: float = 0.02
    # attention_dropout drops attention probabilities in training; the reference model has no embedding
    # or output dropout, so those two must stay 0.
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    use_rmsnorm: bool = True
    torch_dtype: str = "bfloat16"
    model_type: str = "bailing_moe"
    # Router regularisers (Megatron's `--moe-z-loss-coeff`, DeepSeek-V3's sequence-wise balance
    # loss). Not part of the released configs; zero means the term is not computed.
    router_z_loss_coeff: float = 0.0
    seq_aux_loss_coeff: float = 0.0
    # Keys of a loaded config.json that this class does not model (auto_map, ...), written back.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def rope_dim(self) -> int:
        """Channels of each head that RoPE rotates (the rest pass through unchanged)."""
        if self.partial_rotary_factor is not None:
            return int(self.head_dim * self.partial_rotary_factor)
        if self.rotary_dim is not None:
            return self.rotary_dim
        return self.head_dim

    @property
    def shared_expert_intermediate_size(self) -> int:
        if self.moe_shared_expert_intermediate_size is not None:
            return self.moe_shared_expert_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def context_length(self) -> int:
        """How many positions this model reaches, the one rule for training, generation and evaluation:
        max_position_embeddings, or with YaRN its factor times the window it extends
        (original_max_position_embeddings, by default max_position_embeddings) where that is longer.

        YaRN slows only the rotations that would not complete within the original window, so it never
        takes away a position the unscaled rope reaches. For a curriculum stage's rope, ask
        `config.replace(rope_theta=..., rope_scaling=...).context_length`."""
        if self.rope_type == "yarn":
            original = self.rope_scaling.get("original_max_position_embeddings", self.max_position_embeddings)
            return max(self.max_position_embeddings, int(original * self.rope_scaling["factor"]))
        return self.max_position_embeddings

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        for name, least in {**SHAPE_FIELDS, **dict.fromkeys(POSITIVE_COUNTS, 1)}.items():
            value = getattr(self, name)
            if value is None and name == "moe_shared_expert_intermediate_size":
                continue  # null: moe_intermediate_size x num_shared_experts
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                what = "a positive integer" if least else "0 or a positive integer"
                raise ConfigError(f"{name}={value!r} must be {what}.")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={self.model_type!r} is not a Ling 2.0 model; expected one of {MODEL_TYPES}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} for grouped-query attention."
            )
        rope_dim = self.rope_dim
        if rope_dim <= 0 or rope_dim > self.head_dim or rope_dim % 2:
            raise ConfigError(
                f"the rotary dimension {rope_dim} (from partial_rotary_factor={self.partial_rotary_factor}, "
                f"rotary_dim={self.rotary_dim}) must be even and within 1..head_dim={self.head_dim}."
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace={self.first_k_dense_replace} must be between 0 and "
                f"num_hidden_layers={self.num_hidden_layers}."
            )
        if self.num_experts % self.n_group:
            raise ConfigError(f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}.")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} must not exceed n_group={self.n_group}.")
        per_group = self.num_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(
                f"each of the n_group={self.n_group} groups needs at least 2 experts (the group score sums its "
                f"top 2), but num_experts={self.num_experts} gives {per_group}."
            )
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} cannot be chosen from topk_group={self.topk_group} "
                f"groups of {per_group} experts; use at most {self.topk_group * per_group}."
            )
        if self.score_function != "sigmoid":
            raise ConfigError(f"score_function={self.score_function!r} is not supported; Ling 2.0 uses 'sigmoid'.")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; Ling 2.0 uses 'silu'.")
        for name in ("use_qkv_bias", "use_bias"):
            if getattr(self, name):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; Ling 2.0 linears have no bias.")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings must be false: Ling 2.0 has an untied output head.")
        self._validate_switches()
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            tokens = value if name == "eos_token_id" and isinstance(value, list) else [value]
            if not tokens or not all(_is_id(t) and t < self.vocab_size for t in tokens):
                what = "a token id or a non-empty list of them" if name == "eos_token_id" else "a token id"
                raise ConfigError(f"{name}={value!r} must be {what} within the vocabulary 0..{self.vocab_size - 1}.")
        check_rope_scaling(self.rope_scaling)

    def _validate_switches(self) -> None:
        """The on/off and dtype fields the model honours, and the ones it cannot honour."""
        for name in ("use_qk_norm", "norm_topk_prob", "moe_router_enable_expert_bias", "use_rmsnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false.")
        if not self.use_rmsnorm:
            raise ConfigError(
                "use_rmsnorm=False is not supported; every Ling 2.0 norm is an RMSNorm, so set it to true."
            )
        if not isinstance(self.router_dtype, str) or self.router_dtype not in ROUTER_DTYPES:
            raise ConfigError(
                f"router_dtype={self.router_dtype!r} is not supported; the router computes in one of "
                f"{', '.join(ROUTER_DTYPES)}."
            )
        for name in ("embedding_dropout", "attention_dropout", "output_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ConfigError(f"{name}={value!r} must be a probability in [0, 1).")
        # The reference BailingMoeV2 model reads attention_dropout (inside attention) and neither of these.
        for name in ("embedding_dropout", "output_dropout"):
            if getattr(self, name):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not supported; the Ling 2.0 model applies no such dropout, "
                    "so set it to 0.0 (attention_dropout is honoured)."
                )

    # ---- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> LingConfig:
        data = dict(data)
        architectures = data.pop("architectures", None)
        if architectures and architectures[0] != ARCHITECTURE:
            raise ConfigError(f"architectures={architectures} is not a Ling 2.0 checkpoint; expected {[ARCHITECTURE]}.")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        # The released Ling-1T config states partial RoPE as `rotary_dim`; mini/flash use
        # `partial_rotary_factor`. Absent from a config means neither was given.
        if "partial_rotary_factor" not in data:
            kwargs["partial_rotary_factor"] = None if "rotary_dim" in data else 1.0
        # A few configs store head_dim as null meaning hidden/heads.
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = data.get("hidden_size", cls.hidden_size) // data.get(
                "num_attention_heads", cls.num_attention_heads
            )
        return cls(**kwargs, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [ARCHITECTURE]}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in OMITTED_FROM_HF and value == OMITTED_FROM_HF[f.name]:
                continue
            out[f.name] = value
        out.update({k: v for k, v in self.extra.items() if k not in out and k != "quantization_config"})
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LingConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {os.fspath(path)!r}; a Ling checkpoint folder needs one.") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{os.fspath(path)!r} is not valid JSON ({err.msg} at line {err.lineno}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)!r} must hold a JSON object, not {type(data).__name__}.")
        return cls.from_hf(data)

    def replace(self, **changes: Any) -> LingConfig:
        check_fields(changes)
        return dataclasses.replace(self, **changes)
