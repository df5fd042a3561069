"""Resuming with changed settings: which settings of a run may differ from its checkpoint's.

A model config field that decides the parameters' shapes or the architecture, or an optimizer setting
that decides its parameter groups, may not change (`check_resume` raises one sentence naming them);
every other change is allowed and reported by `resume_changes`, for one logged line each.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ling.config import OMITTED_FROM_HF, SHAPE_FIELDS, ConfigError, LingConfig
from ling.optim import OptimizerConfig

# Model config fields that may change when resuming (each change is logged); every other field of
# LingConfig decides the parameters' shapes (`SHAPE_FIELDS`) or the architecture (which parameters and
# buffers exist, the routing, the rotary dimension, the activation and norms) and may not (`_FIXED_FIELDS`).
_RESUMABLE_FIELDS = {
    "rope_theta", "rope_scaling", "max_position_embeddings", "rms_norm_eps", "attention_dropout",
    "embedding_dropout", "output_dropout", "router_dtype", "router_z_loss_coeff", "seq_aux_loss_coeff",
    "mtp_loss_scaling_factor", "initializer_range", "pad_token_id", "eos_token_id", "torch_dtype",
}  # fmt: skip
_FIXED_FIELDS = ({f.name for f in dataclasses.fields(LingConfig)} - _RESUMABLE_FIELDS - {"extra"}) | set(SHAPE_FIELDS)
# The optimizer's parameter groups follow from these: the saved optimizer state would not fit others.
_FIXED_OPTIMIZER_FIELDS = ("embedding_weight_decay",)
# Hyper-parameters that only choose the model config, which is compared field by field instead.
_HPARAMS_AS_CONFIG = {"model", "model_overrides"}
# Settings that only decide how the weights are made at the start, which a resumed run loads instead.
_NOT_USED_ON_RESUME = {"initializer_range", "pretrained"}
_NOT_USED_NOTE = "; not used, the weights come from the checkpoint"


def _config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict with the fields to_hf leaves out put back, for comparing two of them."""
    return {**OMITTED_FROM_HF, **{k: v for k, v in hf.items() if k != "architectures"}}


def _note(name: str) -> str:
    return _NOT_USED_NOTE if name in _NOT_USED_ON_RESUME else ""


def _plain(value: Any) -> Any:
    """Tuples as lists (a checkpoint's hyper-parameters come back with lists), for comparing."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_resume(checkpoint: dict[str, Any], config: LingConfig, optimizer_config: OptimizerConfig) -> None:
    """Raise one ConfigError naming every setting of this run that differs from `checkpoint`'s (a
    trainer checkpoint, or the `meta.pt` of a sharded one) and cannot change when resuming: the
    model fields that decide its parameters and architecture (`_FIXED_FIELDS`), and the optimizer
    settings that decide its parameter groups."""
    saved = checkpoint.get("ling")
    if saved is None:
        return
    theirs, ours = _config_fields(saved["config"]), _config_fields(config.to_hf())
    fixed = [k for k in sorted(set(theirs) | set(ours)) if k in _FIXED_FIELDS and theirs.get(k) != ours.get(k)]
    pairs = [(k, theirs.get(k), ours.get(k)) for k in fixed]
    saved_optimizer = (checkpoint.get("hyper_parameters") or {}).get("optimizer") or {}
    for k in _FIXED_OPTIMIZER_FIELDS:
        if k in saved_optimizer and saved_optimizer[k] != getattr(optimizer_config, k):
            pairs.append((f"optimizer.{k}", saved_optimizer[k], getattr(optimizer_config, k)))
    if pairs:
        whose = "this run's model has" if fixed else "this run has"
        raise ConfigError(
            "the checkpoint was trained with " + ", ".join(f"{k}={a!r}" for k, a, _ in pairs)
            + f" but {whose} " + ", ".join(f"{k}={b!r}" for k, _, b in pairs)
            + "; these cannot change when resuming, so resume with the checkpoint's values."
        )  # fmt: skip


def resume_changes(
    checkpoint: dict[str, Any], config_hf: dict[str, Any], hparams: dict[str, Any]
) -> list[tuple[str, Any, Any, str]]:
    """(name, this run's value, the checkpoint's, note) of every setting that this run changes and
    that may change when resuming: model config fields outside `_FIXED_FIELDS` (the rope before
    any stage's), and the saved hyper-parameters (optimizer and schedule settings field by field)."""
    saved = checkpoint["ling"]
    config = {**saved["config"], **saved.get("base_rope", {})}
    theirs = _config_fields(config)
    ours = _config_fields(config_hf)
    changes = [
        (k, ours.get(k), theirs.get(k), _note(k))
        for k in sorted(set(theirs) | set(ours))
        if k not in _FIXED_FIELDS and _plain(theirs.get(k)) != _plain(ours.get(k))
    ]
    saved_hparams = checkpoint.get("hyper_parameters")
    if not saved_hparams:
        return changes
    for key, value in hparams.items():
        if key.startswith("_") or key in _HPARAMS_AS_CONFIG or key not in saved_hparams:
            continue
        old = saved_hparams[key]
        note = _note(key)
        if isinstance(value, dict) and isinstance(old, dict):
            changes += [
                (f"{key}.{k}", v, old[k], note)
                for k, v in value.items()
                if k in old and _plain(v) != _plain(old[k]) and k not in _FIXED_OPTIMIZER_FIELDS
            ]
        elif _plain(value) != _plain(old):
            changes.append((key, value, old, note))
    return changes
