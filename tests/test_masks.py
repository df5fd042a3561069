"""Document isolation through flex attention's BlockMask agrees with the SDPA boolean mask and a hand-written
reference. Flex attention has no backward on CPU, so everything here runs forward only under no_grad."""

import math

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import ling
from ling.data.packing import document_ids, document_positions
from ling.model import KVCache, build_model
from ling.model.attention import Attention
from ling.model.masks import document_causal_mask, document_mask
from ling.model.rope import RotaryEmbedding, apply_partial_rope

# Unfused eager flex attention is what CPU tests want; the advice to compile it is for real runs.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

EOS = 256
T = 300  # not a multiple of flex attention's 128-token blocks, and spanning three of them


def packed_rows(seed: int) -> torch.Tensor:
    """Three rows: several documents (one of a single token, and 128-blocks that see nothing of each other),
    two documents, and one document (so the BlockMask has a full block, where mask_mod is skipped)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EOS, (3, T), generator=gen)
    ids[0, [17, 40, 41, 90, 131]] = EOS
    ids[1, 70] = EOS
    ids[2, T - 1] = EOS
    return ids


def reference_attention(attn: Attention, x, cos, sin, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v by hand, -inf where `allowed` [B, T, T] is False, kv heads repeated for GQA."""
    B, T, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.query_key_value(x).view(B, T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)
    q = apply_partial_rope(attn.query_layernorm(q), cos, sin).transpose(1, 2)
    k = apply_partial_rope(attn.key_layernorm(k), cos, sin).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    v = v.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return attn.dense(out.transpose(1, 2).reshape(B, T, Hq * D))


@torch.no_grad()
def test_flex_block_mask_matches_sdpa_and_reference(tiny_config):
    cfg = tiny_config
    torch.manual_seed(3)
    attn = Attention(cfg, layer_idx=0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)  # sharp attention, so a leak across documents would show
    docs = document_ids(packed_rows(seed=1), EOS)
    assert docs.max().item() == 5
    cos, sin = RotaryEmbedding(cfg)(document_positions(docs), torch.float32)
    x = torch.randn(docs.shape[0], T, cfg.hidden_size)

    block_mask = document_mask(docs, "flex")
    assert isinstance(block_mask, BlockMask)
    assert block_mask.BLOCK_SIZE == (128, 128) and block_mask.seq_lengths == (T, T)
    assert block_mask.full_kv_num_blocks[2, 0, 1].item() == 1
    bool_mask = document_mask(docs, "sdpa")
    assert torch.equal(bool_mask, document_causal_mask(docs))
    assert torch.equal(document_mask(docs), bool_mask)  # "auto" on CPU

    flex = attn(x, cos, sin, attn_mask=block_mask)
    sdpa = attn(x, cos, sin, attn_mask=bool_mask)
    reference = reference_attention(attn, x, cos, sin, bool_mask[:, 0])
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)
    torch.testing.assert_close(flex, reference, rtol=0, atol=1e-5)
    # The mask matters: plain causal attention differs.
    assert not torch.allclose(flex, attn(x, cos, sin), atol=1e-3)


@torch.no_grad()
def test_whole_model_flex_and_sdpa_masks_agree():
    config = ling.preset("tiny")
    assert config.eos_token_id == EOS
    torch.manual_seed(0)
    model = build_model(config).eval()
    ids = packed_rows(seed=2)
    docs = document_ids(ids, config.eos_token_id)
    positions = document_positions(docs)
    flex = model(ids, position_ids=positions, attn_mask=document_mask(docs, "flex")).logits
    sdpa = model(ids, position_ids=positions, attn_mask=document_mask(docs, "sdpa")).logits
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)


@torch.no_grad()
def test_block_mask_refuses_a_kv_cache(tiny_config):
    cfg = tiny_config
    attn = Attention(cfg, layer_idx=0)
    docs = torch.zeros(1, 4, dtype=torch.long)
    cos, sin = RotaryEmbedding(cfg)(document_positions(docs), torch.float32)
    cache = KVCache(1, 8)
    with pytest.raises(ValueError, match="kv_cache"):
        attn(torch.randn(1, 4, cfg.hidden_size), cos, sin, attn_mask=document_mask(docs, "flex"), kv_cache=cache)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'xformers'.*auto, sdpa, flex"):
        document_mask(torch.zeros(1, 4, dtype=torch.long), "xformers")
