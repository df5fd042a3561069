"""What autograd really keeps for backward, measured on CPU, to check the memory estimate's activation figures."""

import torch

from ling import preset
from ling.model import build_model


def probe_model():
    """A bf16 model large enough that activations dwarf bookkeeping (hidden 256, vocab 4096)."""
    cfg = preset("tiny", hidden_size=256, vocab_size=4096, pad_token_id=0, eos_token_id=0, head_dim=32)
    cfg = cfg.replace(num_attention_heads=8, intermediate_size=512, moe_intermediate_size=64)
    torch.manual_seed(0)
    return cfg, build_model(cfg, dtype=torch.bfloat16)


def saved_bytes(model, ids: torch.Tensor, **kwargs):
    """(bytes of every distinct non-parameter storage passed to autograd's saved-tensor hook, the output)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids, **kwargs)
    return sum(saved.values()), out
