from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers [B, kv_heads, max_len, head_dim] for decoding.

    Each layer's buffers are allocated by its first `update`, with the batch size, head shape, dtype
    and device of the keys and values written: a model under FSDP2 mixed precision computes in bf16
    while its stored (sharded) weights are fp32, so only the forward knows the dtype to keep."""

    def __init__(self, num_layers: int, max_len: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions but {end} were requested.")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.values[layer] = v.new_zeros(v.shape[0], v.shape[1], self.max_len, v.shape[3])
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps
