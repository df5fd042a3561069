"""The sigmoid router: group-limited top-k on biased scores, weights from unbiased scores."""

import math

import pytest
import torch

import ling
from ling.model import build_model
from ling.model.moe import Router, group_limited_topk

SCALE = 2.5


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def reference_route(scores, bias, n_group, topk_group, top_k, scaling):
    """One token, plain Python: groups ranked by the sum of their 2 best biased scores, experts by
    biased score inside the kept groups; weights = unbiased scores renormalised, times `scaling`."""
    experts = len(scores)
    per_group = experts // n_group
    biased = [s + b for s, b in zip(scores, bias)]
    group_score = []
    for g in range(n_group):
        members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
        group_score.append(members[0] + members[1])
    kept = sorted(range(n_group), key=lambda g: group_score[g], reverse=True)[:topk_group]
    candidates = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
    chosen = sorted(candidates, key=lambda e: biased[e], reverse=True)[:top_k]
    total = sum(scores[e] for e in chosen)
    return chosen, [scores[e] / total * scaling for e in chosen]


def make_router(hidden=16, **overrides):
    """A Router over the tiny layout (16 experts, 4 groups of 4, keep 2 groups, top-4) whose weight is
    the identity on the first 16 hidden channels, so the router logits are x[:, :16] exactly."""
    cfg = ling.preset("tiny", **overrides)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, : cfg.num_experts].copy_(torch.eye(cfg.num_experts))
    return cfg, router


def inputs_from_probs(rows, hidden):
    x = torch.zeros(len(rows), hidden, dtype=torch.float32)
    for i, probs in enumerate(rows):
        x[i, : len(probs)] = torch.tensor([logit(p) for p in probs], dtype=torch.float64).float()
    return x


# Group scores: max-of-group ranks G0 (.95) and G2 (.85) first, sum-of-top-2 ranks G1 (1.59) and
# G3 (1.38) first; the global top-4 would be experts 0, 8, 4, 5.
HAND_PROBS = [
    0.95, 0.10, 0.10, 0.10,  # G0: max .95, top-2 sum 1.05
    0.80, 0.79, 0.10, 0.10,  # G1: max .80, top-2 sum 1.59
    0.85, 0.30, 0.10, 0.10,  # G2: max .85, top-2 sum 1.15
    0.70, 0.68, 0.05, 0.05,  # G3: max .70, top-2 sum 1.38
]  # fmt: skip


def check_routing(routing, row, chosen, weights):
    got = routing.indices[row].tolist()
    assert sorted(got) == sorted(chosen)
    by_expert = dict(zip(got, routing.weights[row].tolist()))
    for e, w in zip(chosen, weights):
        assert by_expert[e] == pytest.approx(w, rel=1e-5)


def test_hand_case_group_score_is_sum_of_top_two():
    cfg, router = make_router(hidden_size=64)
    assert (cfg.num_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (16, 4, 2, 4)
    routing = router(inputs_from_probs([HAND_PROBS], 64))
    # Hand result: groups G1 and G3, then their four best experts.
    expected = [4, 5, 12, 13]
    total = 0.80 + 0.79 + 0.70 + 0.68
    expected_w = [0.80 / total * SCALE, 0.79 / total * SCALE, 0.70 / total * SCALE, 0.68 / total * SCALE]
    check_routing(routing, 0, expected, expected_w)
    # The loop reference agrees with the hand result.
    chosen, weights = reference_route(HAND_PROBS, [0.0] * 16, 4, 2, 4, SCALE)
    assert sorted(chosen) == expected
    assert weights == pytest.approx([0.80 / total * SCALE, 0.79 / total * SCALE, 0.70 / total * SCALE,
                                     0.68 / total * SCALE])  # fmt: skip
    # A "max of group" rule would have chosen experts from G0 and G2 instead.
    assert not set(routing.indices[0].tolist()) & {0, 8}
    # Weights sum to the scaling factor; logits and scores are returned unbiased.
    assert routing.weights[0].sum().item() == pytest.approx(SCALE, rel=1e-6)
    assert torch.allclose(routing.scores[0].double(), torch.tensor(HAND_PROBS, dtype=torch.float64), rtol=1e-6)


def test_expert_bias_changes_group_choice_but_not_weights():
    _, router = make_router(hidden_size=64)
    bias = [0.0] * 16
    bias[1] = 0.6  # G0 biased top-2 becomes .95 + .70 = 1.65 > G1's 1.59
    router.expert_bias.copy_(torch.tensor(bias))
    routing = router(inputs_from_probs([HAND_PROBS], 64))
    # Hand result: groups G0, G1; biased scores .95 (e0), .80 (e4), .79 (e5), .70 (e1).
    expected = [0, 4, 5, 1]
    total = 0.95 + 0.80 + 0.79 + 0.10  # unbiased score of expert 1 is 0.10
    check_routing(routing, 0, expected, [p / total * SCALE for p in (0.95, 0.80, 0.79, 0.10)])
    chosen, weights = reference_route(HAND_PROBS, bias, 4, 2, 4, SCALE)
    assert chosen == expected
    check_routing(routing, 0, chosen, weights)
    # The weight of expert 1 comes from its unbiased score (0.10), not the biased 0.70.
    w1 = dict(zip(routing.indices[0].tolist(), routing.weights[0].tolist()))[1]
    assert w1 == pytest.approx(0.10 / total * SCALE, rel=1e-5)
    assert w1 < 0.2


def test_expert_bias_changes_expert_choice_inside_kept_groups():
    _, router = make_router(hidden_size=64)
    bias = [0.0] * 16
    bias[14] = 0.9  # expert 14 (unbiased .05) jumps to .95 inside G3; groups stay G1, G3
    router.expert_bias.copy_(torch.tensor(bias))
    routing = router(inputs_from_probs([HAND_PROBS], 64))
    expected = [14, 4, 5, 12]
    total = 0.05 + 0.80 + 0.79 + 0.70
    check_routing(routing, 0, expected, [p / total * SCALE for p in (0.05, 0.80, 0.79, 0.70)])
    assert 13 not in routing.indices[0].tolist()


def test_random_tokens_match_reference_loop():
    torch.manual_seed(0)
    cfg, router = make_router(hidden_size=64)
    x = torch.randn(32, 64) * 2.0
    bias = (torch.randn(16) * 0.3).tolist()
    router.expert_bias.copy_(torch.tensor(bias))
    routing = router(x)
    for n in range(x.shape[0]):
        scores = [sigmoid(float(v)) for v in x[n, :16].double()]
        chosen, weights = reference_route(scores, bias, 4, 2, 4, cfg.routed_scaling_factor)
        check_routing(routing, n, chosen, weights)


def test_router_logits_are_fp32_linear():
    torch.manual_seed(1)
    cfg = ling.preset("tiny")
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(5, cfg.hidden_size).to(torch.bfloat16)
    routing = router(x)
    assert routing.logits.dtype == torch.float32 and routing.weights.dtype == torch.float32
    ref = x.double() @ router.weight.double().T
    assert torch.allclose(routing.logits.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(routing.scores.double(), torch.sigmoid(ref), rtol=1e-5, atol=1e-6)


def test_group_limited_topk_without_groups_is_plain_topk():
    biased = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]])
    assert sorted(group_limited_topk(biased, 1, 1, 3)[0].tolist()) == [1, 3, 5]
    # Three groups of two: sums .1+.9=1.0, .3+.8=1.1, .2+.7=0.9 -> keep groups 1 and 0.
    assert sorted(group_limited_topk(biased, 3, 2, 3)[0].tolist()) == [1, 2, 3]


def test_expert_bias_is_an_fp32_buffer_without_grad(tiny_model):
    routers = [moe.gate for moe in tiny_model.moe_layers()]
    assert len(routers) == 3  # two decoder MoE layers + the MTP layer
    param_names = {name for name, _ in tiny_model.named_parameters()}
    buffer_names = {name for name, _ in tiny_model.named_buffers()}
    assert not any(name.endswith("expert_bias") for name in param_names)
    assert "model.layers.1.mlp.gate.expert_bias" in buffer_names
    assert "model.layers.1.mlp.gate.expert_bias" in tiny_model.state_dict()
    for router in routers:
        router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 16))
        assert not router.expert_bias.requires_grad
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 8))
    out = tiny_model(ids, labels=torch.randint(0, 512, (2, 8)))
    out.loss.backward()
    for router in routers:
        assert router.expert_bias.grad is None
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_expert_bias_stays_fp32_after_bf16_cast(tiny_model):
    tiny_model.to(torch.bfloat16)
    for moe in tiny_model.moe_layers():
        assert moe.gate.expert_bias.dtype == torch.float32
        assert moe.gate.weight.dtype == torch.bfloat16


def test_expert_bias_values_survive_bf16_cast():
    torch.manual_seed(0)
    model = build_model(ling.preset("tiny"))
    bias = torch.tensor([0.1 + 1e-5 * i for i in range(16)], dtype=torch.float32)
    for moe in model.moe_layers():
        moe.gate.expert_bias.copy_(bias)
    model.to(torch.bfloat16)
    for moe in model.moe_layers():
        assert torch.equal(moe.gate.expert_bias, bias)
