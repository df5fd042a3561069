"""The chunked training loss: the same losses and gradients as the whole-logits loss, without keeping
logits for backward."""

import pytest
import torch
from activation_probe import probe_model, saved_bytes

from ling.memory import activation_bytes
from ling.model import IGNORE_INDEX


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_chunked_loss_equals_the_whole_logits_loss(tiny_model, chunk):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    labels[0, 5:9] = IGNORE_INDEX
    whole = tiny_model(ids, labels=labels)
    whole.loss.backward()
    expected = grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)
    chunked = tiny_model(ids, labels=labels, loss_chunk=chunk)
    chunked.loss.backward()
    assert chunked.logits is None and chunked.mtp_logits == []
    torch.testing.assert_close(chunked.main_loss, whole.main_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack(chunked.mtp_losses), torch.stack(whole.mtp_losses), rtol=0, atol=1e-6)
    got = grads(tiny_model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)  # sums in another order


def test_chunked_loss_keeps_no_logits_for_backward():
    """What autograd saves (distinct non-parameter storages), measured: with the whole-logits loss it
    holds every head's logits and fp32 log-softmax; chunked, only the memory estimate's `stored` figure."""
    cfg, model = probe_model()
    B, T = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    chunked, _ = saved_bytes(model, ids, loss_chunk=16)
    whole, _ = saved_bytes(model, ids)
    estimate = activation_bytes(cfg, B, T, "none", loss_chunk=16)
    assert chunked == pytest.approx(estimate["stored"], rel=0.03)
    whole_logits = 2 * B * T * cfg.vocab_size * 4  # the fp32 log-softmax of the main and MTP heads
    assert whole - chunked >= whole_logits
