"""Document-isolation attention masks in the form each attention backend wants.

SDPA takes a dense boolean [B, 1, T, T] mask; flex attention takes a BlockMask, which records which
128x128 tiles are empty, full or partial, so a fused kernel can skip the empty ones entirely. Both
mean the same thing: a query sees earlier positions of its own document only.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

BACKENDS = ("auto", "sdpa", "flex")


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] for SDPA: a query sees earlier positions of its own document only."""
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def document_mask(doc_ids: torch.Tensor, backend: str = "auto") -> torch.Tensor | BlockMask:
    """The `attn_mask` for document isolation of rows with per-position document ids [B, T].

    "auto" picks flex on CUDA and SDPA elsewhere: flex attention has no backward on CPU, so a CPU
    BlockMask only serves inference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention mask backend {backend!r}: expected one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        backend = "flex" if doc_ids.device.type == "cuda" else "sdpa"
    if backend == "sdpa":
        return document_causal_mask(doc_ids)
    B, T = doc_ids.shape

    def same_document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (doc_ids[b, q] == doc_ids[b, kv])

    # H=None: one mask broadcast over all heads. On GPUs the mask is built by a compiled kernel, which
    # never materialises the [B, T, T] grid (32K-token rows would need 1 GB per row).
    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device, _compile=doc_ids.is_cuda)
