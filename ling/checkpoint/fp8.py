"""Blockwise float8 (e4m3) weights in the layout of the released Ling / DeepSeek-V3 fp8 checkpoints.

A quantized 2-D weight `W` is stored as `<key>` (float8_e4m3fn) plus `<key>_scale_inv` (float32,
one value per 128x128 block, edge blocks partial): `W ~= q * scale_inv` blockwise, where each
block's scale maps its largest magnitude to 448, the largest finite e4m3 value.
"""

from __future__ import annotations

import math
import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
# What `config.json` of a released fp8 checkpoint says, so that inference engines pick the fp8 path.
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}

# The linear projections of every decoder and MTP layer. Embeddings, lm_head, the router (its fp32
# sigmoid scores pick the experts), norms, expert_bias and MTP's eh_proj stay high precision, as in
# the released converter's list.
_FP8_WEIGHT = re.compile(
    r"model\.layers\.\d+\.(?:attention\.(?:query_key_value|dense)"
    r"|mlp\.(?:shared_experts\.|experts\.\d+\.)?(?:gate|up|down)_proj)\.weight"
)


def is_fp8_weight(hf_key: str) -> bool:
    """Whether an fp8 export stores this HF tensor as float8 (+ `_scale_inv`)."""
    return _FP8_WEIGHT.fullmatch(hf_key) is not None


def _blocks(block: int | tuple[int, int]) -> tuple[int, int]:
    return (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def scale_shape(shape: torch.Size | tuple[int, int], block: int | tuple[int, int] = BLOCK) -> tuple[int, int]:
    """Shape of the `_scale_inv` tensor of a weight: one entry per (partial) block."""
    br, bc = _blocks(block)
    return math.ceil(shape[0] / br), math.ceil(shape[1] / bc)


def quantize_blockwise(w: torch.Tensor, block: int | tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale_inv float32 [ceil(rows/b), ceil(cols/b)]) with w ~= q * scale_inv per block."""
    if w.dim() != 2:
        raise ValueError(f"blockwise fp8 needs a 2-D weight, got shape {tuple(w.shape)}.")
    br, bc = _blocks(block)
    rows, cols = w.shape
    nr, nc = scale_shape(w.shape, (br, bc))
    # Zero padding up to whole blocks leaves every block's amax unchanged.
    padded = torch.nn.functional.pad(w.float(), (0, nc * bc - cols, 0, nr * br - rows))
    tiles = padded.view(nr, br, nc, bc)
    amax = tiles.abs().amax(dim=(1, 3))
    # An all-zero block gets scale 1: its codes are 0 and the scale stays finite.
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = scaled.to(FP8_DTYPE).view(nr * br, nc * bc)[:rows, :cols].contiguous()
    return q, scale_inv


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = BLOCK, offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """float32 weight `q * scale_inv`, each scale applied to its (partial) block.

    `q` is a whole weight, or a rectangular region of one: then `scale_inv` holds the scales of the blocks
    the region touches and `offset` is where the region starts inside its first block (row, column), so a
    rank can dequantise just the rows of its shard.
    """
    br, bc = _blocks(block)
    if q.dim() != 2:
        raise ValueError(f"blockwise fp8 needs a 2-D weight, got shape {tuple(q.shape)}.")
    (r, c), (rows, cols) = offset, q.shape
    expected = scale_shape((r + rows, c + cols), (br, bc))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv of shape {tuple(scale_inv.shape)} does not match a {tuple(q.shape)} weight in "
            f"{br}x{bc} blocks (expected {expected})."
        )
    scale = scale_inv.float().repeat_interleave(br, dim=0)[r : r + rows].repeat_interleave(bc, dim=1)[:, c : c + cols]
    return q.float() * scale
