"""Multi-token prediction: per-row label shift, embedding-first input, loss composition."""

import math

import pytest
import torch

import ling
from ling.model import IGNORE_INDEX, build_model

B, T, V = 2, 7, 512


def ce_rows(logits, targets):
    """Per-position CE in float64 with explicit log-sum-exp; targets: list of (row, t, label)."""
    losses = []
    for b, t, label in targets:
        row = logits[b, t].double().tolist()
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        losses.append(lse - row[label])
    return losses


def mean(values):
    return sum(values) / len(values)


def make_batch(seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, V, (B, T))
    labels = torch.randint(0, V, (B, T))
    labels[1] = (labels[0] + 1 + torch.arange(T)) % V  # rows have distinct labels everywhere
    return ids, labels


def test_mtp_loss_uses_next_label_of_the_same_row(tiny_model):
    ids, labels = make_batch()
    with torch.no_grad():
        out = tiny_model(ids, labels=labels)
    assert len(out.mtp_logits) == 1 and len(out.mtp_losses) == 1
    mtp_logits = out.mtp_logits[0]
    assert mtp_logits.shape == (B, T, V)
    targets = [(b, t, int(labels[b, t + 1])) for b in range(B) for t in range(T - 1)]
    expected = mean(ce_rows(mtp_logits, targets))
    assert out.mtp_losses[0].item() == pytest.approx(expected, rel=1e-5)
    # A flattened shift would also score row 0's last position against row 1's first label.
    leaked = mean(ce_rows(mtp_logits, targets + [(0, T - 1, int(labels[1, 0]))]))
    assert abs(leaked - expected) > 1e-3
    assert out.mtp_losses[0].item() != pytest.approx(leaked, rel=1e-5)


def test_mtp_loss_sees_exactly_the_shifted_labels(tiny_model, monkeypatch):
    import ling.model.model as model_module

    seen = []
    original = model_module.cross_entropy

    def spy(logits, labels):
        seen.append(labels.clone())
        return original(logits, labels)

    monkeypatch.setattr(model_module, "cross_entropy", spy)
    ids, labels = make_batch(1)
    with torch.no_grad():
        tiny_model(ids, labels=labels)
    assert len(seen) == 2
    assert torch.equal(seen[0], labels)
    expected = torch.full((B, T), IGNORE_INDEX)
    for b in range(B):
        for t in range(T - 1):
            expected[b, t] = labels[b, t + 1]
    assert torch.equal(seen[1], expected)


def per_row_losses(out, labels):
    main = [
        mean(ce_rows(out.logits, [(b, t, int(labels[b, t])) for t in range(T)])) for b in range(out.logits.shape[0])
    ]
    mtp = [
        mean(ce_rows(out.mtp_logits[0], [(b, t, int(labels[b, t + 1])) for t in range(T - 1)]))
        for b in range(out.logits.shape[0])
    ]
    return main, mtp


def test_rows_are_independent(tiny_model):
    ids, labels = make_batch(2)
    with torch.no_grad():
        together = tiny_model(ids, labels=labels)
        alone = tiny_model(ids[:1], labels=labels[:1])
        ids2, labels2 = ids.clone(), labels.clone()
        ids2[1] = torch.randint(0, V, (T,))
        labels2[1] = torch.randint(0, V, (T,))
        changed = tiny_model(ids2, labels=labels2)
    main_t, mtp_t = per_row_losses(together, labels)
    main_a, mtp_a = per_row_losses(alone, labels[:1])
    main_c, mtp_c = per_row_losses(changed, labels2)
    for value in (main_a[0], main_c[0]):
        assert value == pytest.approx(main_t[0], abs=1e-5)
    for value in (mtp_a[0], mtp_c[0]):
        assert value == pytest.approx(mtp_t[0], abs=1e-5)
    assert torch.allclose(alone.logits[0], together.logits[0], atol=1e-5)
    assert torch.allclose(alone.mtp_logits[0][0], together.mtp_logits[0][0], atol=1e-5)
    assert torch.allclose(changed.mtp_logits[0][0], together.mtp_logits[0][0], atol=1e-5)
    # The single-row run's losses are that row's own averages.
    assert alone.main_loss.item() == pytest.approx(main_a[0], rel=1e-5)
    assert alone.mtp_losses[0].item() == pytest.approx(mtp_a[0], rel=1e-5)


def test_total_loss_composition(tiny_model, tiny_config):
    assert tiny_config.mtp_loss_scaling_factor == 0.1
    ids, labels = make_batch(3)
    labels[0, 2] = IGNORE_INDEX
    with torch.no_grad():
        out = tiny_model(ids, labels=labels)
        tiny_model.config = tiny_config.replace(mtp_loss_scaling_factor=0.7)
        out_w = tiny_model(ids, labels=labels)
    main_targets = [(b, t, int(labels[b, t])) for b in range(B) for t in range(T) if labels[b, t] != IGNORE_INDEX]
    mtp_targets = [
        (b, t, int(labels[b, t + 1])) for b in range(B) for t in range(T - 1) if labels[b, t + 1] != IGNORE_INDEX
    ]
    main = mean(ce_rows(out.logits, main_targets))
    mtp = mean(ce_rows(out.mtp_logits[0], mtp_targets))
    assert out.main_loss.item() == pytest.approx(main, rel=1e-5)
    assert out.mtp_losses[0].item() == pytest.approx(mtp, rel=1e-5)
    assert out.aux_loss is None
    assert out.loss.item() == pytest.approx(main + 0.1 * mtp, rel=1e-5)
    assert out_w.loss.item() == pytest.approx(main + 0.7 * mtp, rel=1e-5)


def test_two_mtp_depths_and_aux_loss_in_total():
    coeff = 1e-2
    cfg = ling.preset("tiny", num_nextn_predict_layers=2, router_z_loss_coeff=coeff)
    torch.manual_seed(0)
    model = build_model(cfg)
    router_logits = []
    for moe in model.moe_layers():
        moe.gate.register_forward_hook(lambda mod, inp, out: router_logits.append(out.logits.double()))
    ids, labels = make_batch(4)
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert len(out.mtp_losses) == 2
    assert len(router_logits) == 4  # 2 decoder MoE layers + 2 MTP layers
    assert out.tokens_per_expert.shape == (4, cfg.num_experts)
    main = mean(ce_rows(out.logits, [(b, t, int(labels[b, t])) for b in range(B) for t in range(T)]))
    mtp1 = mean(ce_rows(out.mtp_logits[0], [(b, t, int(labels[b, t + 1])) for b in range(B) for t in range(T - 1)]))
    mtp2 = mean(ce_rows(out.mtp_logits[1], [(b, t, int(labels[b, t + 2])) for b in range(B) for t in range(T - 2)]))
    assert out.mtp_losses[0].item() == pytest.approx(mtp1, rel=1e-5)
    assert out.mtp_losses[1].item() == pytest.approx(mtp2, rel=1e-5)
    aux = sum(coeff * torch.logsumexp(lg, dim=-1).square().mean().item() for lg in router_logits)
    assert out.aux_loss.item() == pytest.approx(aux, rel=1e-5)
    assert out.loss.item() == pytest.approx(main + 0.1 * (mtp1 + mtp2) / 2 + aux, rel=1e-5)


def test_mtp_input_is_embedding_of_next_token_first(tiny_model, tiny_config):
    H = tiny_config.hidden_size
    mtp = tiny_model.model.mtp_layers[0]
    torch.manual_seed(5)
    with torch.no_grad():  # non-trivial norm weights so the check sees them
        mtp.enorm.weight.copy_(torch.rand(H) + 0.5)
        mtp.hnorm.weight.copy_(torch.rand(H) + 0.5)
    captured = {}

    def keep(key, fn):
        def hook(mod, inp, out):
            captured[key] = fn(inp, out).detach().clone()

        return hook

    mtp.eh_proj.register_forward_hook(keep("x", lambda inp, out: inp[0]))
    tiny_model.model.norm.register_forward_hook(keep("h", lambda inp, out: out))
    ids, labels = make_batch(6)
    with torch.no_grad():
        tiny_model(ids, labels=labels)
    x, h = captured["x"], captured["h"]
    assert x.shape == (B, T, 2 * H)

    def rms_norm(v, weight):
        v = v.double()
        return v / torch.sqrt(v.square().mean(-1, keepdim=True) + tiny_config.rms_norm_eps) * weight.double()

    emb = tiny_model.model.word_embeddings.weight.detach()
    for b in range(B):
        for t in range(T - 1):
            want = rms_norm(emb[int(ids[b, t + 1])], mtp.enorm.weight.detach())
            assert torch.allclose(x[b, t, :H].double(), want, atol=1e-5)
            assert torch.allclose(x[b, t, H:].double(), rms_norm(h[b, t], mtp.hnorm.weight.detach()), atol=1e-5)
