"""Names in a Hugging Face Ling checkpoint <-> names in `LingForCausalLM`.

The two agree except that (1) HF stores each routed expert as its own tensors
(`mlp.experts.{e}.gate_proj.weight`) where the model stacks them (`mlp.experts.gate_proj[e]`), and
(2) HF stores MTP depth k as decoder layer `num_hidden_layers + k`, the model as `mtp_layers.k`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MTP = re.compile(r"model\.mtp_layers\.(\d+)\.(.+)")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_STACKED = re.compile(r"(.*mlp\.experts)\.(gate_proj|up_proj|down_proj)")


def hf_to_internal(key: str, num_hidden_layers: int) -> tuple[str, int | None]:
    """(model state-dict name, expert index or None) for one HF key."""
    match = _LAYER.fullmatch(key)
    if not match:
        return key, None
    layer, rest = int(match.group(1)), match.group(2)
    if layer < num_hidden_layers:
        prefix = f"model.layers.{layer}."
    else:
        prefix = f"model.mtp_layers.{layer - num_hidden_layers}."
    expert = _HF_EXPERT.fullmatch(rest)
    if expert:
        return f"{prefix}mlp.experts.{expert.group(2)}", int(expert.group(1))
    return prefix + rest, None


def is_stacked_expert(name: str) -> bool:
    """Whether a model tensor stacks the routed experts' weights (`...mlp.experts.gate_proj`, `[E, ...]`)."""
    return _STACKED.fullmatch(name) is not None


def internal_to_hf_name(name: str, num_hidden_layers: int, expert: int | None = None) -> str:
    mtp = _MTP.fullmatch(name)
    if mtp:
        name = f"model.layers.{num_hidden_layers + int(mtp.group(1))}.{mtp.group(2)}"
    stacked = _STACKED.fullmatch(name)
    if stacked:
        return f"{stacked.group(1)}.{expert}.{stacked.group(2)}.weight"
    return name


def internal_to_hf(name: str, tensor: torch.Tensor, num_hidden_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (key, tensor) pairs for one model tensor; a stacked expert weight yields one pair per expert."""
    if is_stacked_expert(name):
        for e in range(tensor.shape[0]):
            yield internal_to_hf_name(name, num_hidden_layers, e), tensor[e]
    else:
        yield internal_to_hf_name(name, num_hidden_layers), tensor
