"""Grouped experts vs per-expert loops, and the full MoE block vs a dense per-token oracle."""

import math

import pytest
import torch
import torch.nn.functional as F

import ling
from ling.model.moe import GroupedExperts, MoE

ATOL = 1e-5


def swiglu(x, gate_w, up_w, down_w):
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def oracle_experts(x, counts, gate, up, down):
    """Rows of x are sorted by expert; expert e takes the next counts[e] rows (written independently)."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=x.dtype)
    row = 0
    for e in range(gate.shape[0]):
        for _ in range(int(counts[e])):
            out[row] = swiglu(x[row : row + 1], gate[e], up[e], down[e])[0]
            row += 1
    return out


def make_experts(num_experts=6, hidden=16, inter=8, seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(num_experts, hidden, inter)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


def grads(fn, experts, x, probe):
    x = x.clone().requires_grad_(True)
    experts.zero_grad()
    y = fn(x)
    (y * probe).sum().backward()
    return y.detach(), x.grad.clone(), [p.grad.clone() for p in (experts.gate_proj, experts.up_proj, experts.down_proj)]


@pytest.mark.parametrize("counts", [[3, 1, 4, 2, 5, 1], [0, 4, 0, 0, 7, 2], [10, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 3]])
def test_grouped_matches_loops_forward_and_backward(counts):
    experts = make_experts()
    counts_t = torch.tensor(counts, dtype=torch.int64)
    torch.manual_seed(1)
    x = torch.randn(sum(counts), 16)
    probe = torch.randn(sum(counts), 16)

    y_grouped, gx_grouped, gw_grouped = grads(lambda t: experts(t, counts_t), experts, x, probe)
    y_loop, gx_loop, gw_loop = grads(lambda t: experts.forward_loop(t, counts_t), experts, x, probe)
    y_ref, gx_ref, gw_ref = grads(
        lambda t: oracle_experts(t, counts, experts.gate_proj, experts.up_proj, experts.down_proj), experts, x, probe
    )
    for y in (y_grouped, y_loop):
        assert torch.allclose(y, y_ref, atol=ATOL, rtol=ATOL)
    for gx in (gx_grouped, gx_loop):
        assert torch.allclose(gx, gx_ref, atol=ATOL, rtol=ATOL)
    for gws in (gw_grouped, gw_loop):
        for gw, ref in zip(gws, gw_ref):
            assert torch.allclose(gw, ref, atol=ATOL, rtol=ATOL)
    # Experts that received no rows get exactly zero gradient.
    for e, n in enumerate(counts):
        if n == 0:
            for gw in gw_grouped:
                assert torch.count_nonzero(gw[e]) == 0


# ---- full MoE block --------------------------------------------------------------------------


def reference_routing(x, weight, bias, n_group, topk_group, top_k, scaling):
    """Per-token routing with Python lists in float64: groups by sum of their 2 best biased scores."""
    logits = x.detach().double() @ weight.detach().double().T
    experts = weight.shape[0]
    per_group = experts // n_group
    chosen_all, weights_all = [], []
    for n in range(x.shape[0]):
        scores = [1.0 / (1.0 + math.exp(-float(v))) for v in logits[n]]
        biased = [s + float(b) for s, b in zip(scores, bias)]
        group_score = [
            sum(sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)[:2]) for g in range(n_group)
        ]
        kept = sorted(range(n_group), key=lambda g: group_score[g], reverse=True)[:topk_group]
        candidates = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: biased[e], reverse=True)[:top_k]
        total = sum(scores[e] for e in chosen)
        chosen_all.append(chosen)
        weights_all.append([scores[e] / total * scaling for e in chosen])
    return chosen_all, weights_all


def dense_oracle(moe, x, cfg):
    """For each token: sum over its chosen experts of weight * SwiGLU_e(x) + shared(x)."""
    flat = x.reshape(-1, x.shape[-1])
    chosen, weights = reference_routing(
        flat, moe.gate.weight, moe.gate.expert_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
        cfg.routed_scaling_factor,
    )  # fmt: skip
    sh = moe.shared_experts
    rows = []
    for n in range(flat.shape[0]):
        tok = flat[n : n + 1]
        acc = swiglu(tok, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
        for e, w in zip(chosen[n], weights[n]):
            acc = acc + w * swiglu(tok, moe.experts.gate_proj[e], moe.experts.up_proj[e], moe.experts.down_proj[e])
        rows.append(acc)
    return torch.cat(rows).view_as(x), chosen


def make_moe(seed=0, **overrides):
    cfg = ling.preset("tiny", **overrides)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.2)
        moe.gate.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.1)
    return cfg, moe


def test_moe_matches_dense_oracle():
    cfg, moe = make_moe()
    torch.manual_seed(2)
    x = torch.randn(2, 7, cfg.hidden_size)
    y, stats = moe(x)
    ref, chosen = dense_oracle(moe, x, cfg)
    assert y.shape == x.shape
    assert torch.allclose(y, ref.float(), atol=ATOL, rtol=ATOL)
    # tokens_per_expert is the hand count of the oracle's assignments.
    hand = [0] * cfg.num_experts
    for row in chosen:
        for e in row:
            hand[e] += 1
    assert stats.tokens_per_expert.tolist() == hand
    assert int(stats.tokens_per_expert.sum()) == 2 * 7 * cfg.num_experts_per_tok
    assert stats.aux_loss is None


def test_tokens_per_expert_is_bincount_of_router_indices():
    cfg, moe = make_moe(seed=3)
    captured = []
    moe.gate.register_forward_hook(lambda mod, inp, out: captured.append(out.indices.clone()))
    torch.manual_seed(4)
    x = torch.randn(3, 5, cfg.hidden_size)
    _, stats = moe(x)
    hand = [0] * cfg.num_experts
    for e in captured[0].flatten().tolist():
        hand[e] += 1
    assert stats.tokens_per_expert.tolist() == hand
    assert sum(hand) == 15 * cfg.num_experts_per_tok


def test_moe_with_idle_experts_matches_oracle():
    # A strong bias on experts 0..3 (group 0) and 4..7 (group 1) routes every token there: 8 idle experts.
    cfg, moe = make_moe(seed=5)
    with torch.no_grad():
        moe.gate.expert_bias.zero_()
        moe.gate.expert_bias[:8] = 5.0
    torch.manual_seed(6)
    x = torch.randn(1, 6, cfg.hidden_size)
    y, stats = moe(x)
    ref, _ = dense_oracle(moe, x, cfg)
    assert (stats.tokens_per_expert[8:] == 0).all()
    assert torch.allclose(y, ref.float(), atol=ATOL, rtol=ATOL)


def run_with_grads(moe, x, probe):
    x = x.clone().requires_grad_(True)
    moe.zero_grad()
    y, _ = moe(x)
    (y * probe).sum().backward()
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()}


def test_grouped_and_loop_paths_agree_with_grads():
    cfg, moe = make_moe(seed=7)
    torch.manual_seed(8)
    x = torch.randn(2, 9, cfg.hidden_size)
    probe = torch.randn_like(x)
    moe.use_loop = False
    y_g, gx_g, gw_g = run_with_grads(moe, x, probe)
    moe.use_loop = True
    y_l, gx_l, gw_l = run_with_grads(moe, x, probe)
    assert torch.allclose(y_g, y_l, atol=ATOL, rtol=ATOL)
    assert torch.allclose(gx_g, gx_l, atol=ATOL, rtol=ATOL)
    assert set(gw_g) == set(gw_l)
    for name in gw_g:
        assert torch.allclose(gw_g[name], gw_l[name], atol=ATOL, rtol=ATOL), name
    # The router weight learns through the combine weights.
    assert gw_g["gate.weight"].abs().sum() > 0


def test_moe_gradients_match_dense_oracle():
    cfg, moe = make_moe(seed=9)
    torch.manual_seed(10)
    x = torch.randn(1, 6, cfg.hidden_size)
    probe = torch.randn_like(x)
    _, gx, gw = run_with_grads(moe, x, probe)

    xr = x.clone().requires_grad_(True)
    moe.zero_grad()
    ref, _ = dense_oracle(moe, xr, cfg)
    # The oracle's combine weights are Python floats (no router gradient): compare the other grads.
    (ref * probe).sum().backward()
    for name in ("experts.gate_proj", "experts.up_proj", "experts.down_proj", "shared_experts.gate_proj.weight"):
        assert torch.allclose(gw[name], dict(moe.named_parameters())[name].grad, atol=ATOL, rtol=ATOL), name


def test_router_z_loss():
    coeff = 1e-3
    cfg, moe = make_moe(seed=11, router_z_loss_coeff=coeff)
    torch.manual_seed(12)
    x = torch.randn(2, 5, cfg.hidden_size)
    _, stats = moe(x)
    logits = x.reshape(-1, cfg.hidden_size).double() @ moe.gate.weight.double().T
    total = 0.0
    for row in logits.tolist():
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse * lse
    expected = coeff * total / logits.shape[0]
    assert stats.aux_loss is not None
    assert stats.aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_sequence_balance_loss():
    alpha = 1e-2
    cfg, moe = make_moe(seed=13, seq_aux_loss_coeff=alpha)
    B, T = 2, 6
    torch.manual_seed(14)
    x = torch.randn(B, T, cfg.hidden_size)
    _, stats = moe(x)
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    chosen, _ = reference_routing(
        x.reshape(-1, cfg.hidden_size), moe.gate.weight, moe.gate.expert_bias, cfg.n_group, cfg.topk_group, K, 1.0
    )
    logits = x.reshape(-1, cfg.hidden_size).double() @ moe.gate.weight.double().T
    scores = torch.sigmoid(logits).tolist()
    per_seq = []
    for b in range(B):
        toks = range(b * T, (b + 1) * T)
        f = [E / (K * T) * sum(e in chosen[t] for t in toks) for e in range(E)]
        p = [sum(scores[t][e] / sum(scores[t]) for t in toks) / T for e in range(E)]
        per_seq.append(sum(fi * pi for fi, pi in zip(f, p)))
    expected = alpha * sum(per_seq) / B
    assert stats.aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_moe_without_shared_expert():
    cfg, moe = make_moe(seed=15, num_shared_experts=0)
    assert moe.shared_experts is None
    torch.manual_seed(16)
    x = torch.randn(1, 4, cfg.hidden_size)
    y, _ = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    chosen, weights = reference_routing(
        flat, moe.gate.weight, moe.gate.expert_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
        cfg.routed_scaling_factor,
    )  # fmt: skip
    for n in range(flat.shape[0]):
        ref = sum(
            w * swiglu(flat[n], moe.experts.gate_proj[e], moe.experts.up_proj[e], moe.experts.down_proj[e])
            for e, w in zip(chosen[n], weights[n])
        )
        assert torch.allclose(y.reshape(-1, cfg.hidden_size)[n], ref, atol=ATOL, rtol=ATOL)


def test_weighted_slot_sum_gradients_match_autograd_in_float64():
    from ling.model.moe import WeightedSlotSum

    torch.manual_seed(0)
    w = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(WeightedSlotSum.apply, (w, x))
    expected = (w[:, :, None] * x).sum(1)
    torch.testing.assert_close(WeightedSlotSum.apply(w, x), expected)


def test_weighted_slot_sum_accumulates_bf16_inputs_in_fp32():
    from ling.model.moe import WeightedSlotSum

    torch.manual_seed(1)
    w = torch.rand(64, 8) * 0.37  # not representable in bf16
    x = torch.randn(64, 8, 32).to(torch.bfloat16)
    reference = (w[:, :, None] * x.float()).sum(1).to(torch.bfloat16)
    assert torch.equal(WeightedSlotSum.apply(w, x), reference)
