"""AdamW parameter groups on the tiny Ling model against a rule and counts written out here."""

import pytest
import torch
from torch import nn

from ling.optim import OptimizerConfig, build_optimizer, param_groups

EMBEDDING = "model.word_embeddings.weight"


def by_group(groups):
    return {g["name"]: {id(p) for p in g["params"]} for g in groups}


def expected_split(model, embedding_weight_decay):
    """The rule, independently: decay iff a matrix, and not the embedding unless asked."""
    decay, no_decay = set(), set()
    for name, p in model.named_parameters():
        wanted = p.ndim >= 2 and (embedding_weight_decay or name != EMBEDDING)
        (decay if wanted else no_decay).add(id(p))
    return decay, no_decay


@pytest.mark.parametrize("embedding_weight_decay", [False, True])
def test_tiny_model_groups(tiny_model, embedding_weight_decay):
    groups = param_groups(tiny_model, 0.1, embedding_weight_decay)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    split = by_group(groups)
    decay, no_decay = expected_split(tiny_model, embedding_weight_decay)
    assert split["decay"] == decay and split["no_decay"] == no_decay
    # Counted by hand from the tiny preset (3 layers, the first dense, one MTP layer), in tensors:
    # decay: dense layer qkv, dense, gate/up/down = 5; two MoE layers qkv, dense, router, 3 expert stacks,
    # 3 shared = 18; MTP 9 + eh_proj = 10; lm_head 1 -> 34 (+1 embedding).
    # no_decay: 4 norms x 3 layers = 12; final norm 1; MTP 4 + enorm, hnorm, final_layernorm = 7 -> 20.
    counts = [len(g["params"]) for g in groups]
    assert counts == ([35, 20] if embedding_weight_decay else [34, 21])
    # Every parameter exactly once; buffers (expert_bias, rope inv_freq) nowhere.
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == len(list(tiny_model.parameters()))
    buffers = {id(b) for _, b in tiny_model.named_buffers()}
    assert any("expert_bias" in name for name, _ in tiny_model.named_buffers())
    assert not buffers & set(listed)
    embedding = id(tiny_model.model.word_embeddings.weight)
    assert embedding in split["decay" if embedding_weight_decay else "no_decay"]


def test_embedding_found_by_type_and_tied_weights_listed_once():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=True)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"tok": emb, "out": head, "frozen": nn.Linear(4, 4)})
    model["frozen"].requires_grad_(False)
    split = by_group(param_groups(model, 0.1, embedding_weight_decay=False))
    assert split == {"no_decay": {id(emb.weight), id(head.bias)}}
    split = by_group(param_groups(model, 0.1, embedding_weight_decay=True))
    assert split == {"decay": {id(emb.weight)}, "no_decay": {id(head.bias)}}


def test_decay_only_step_shrinks_matrices_and_spares_norms(tiny_model):
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.1, embedding_weight_decay=False)
    optimizer = build_optimizer(tiny_model, cfg)
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    for p in tiny_model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in tiny_model.named_parameters():
        if p.ndim >= 2 and name != EMBEDDING:
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.1), rtol=1e-6, atol=0)
            assert not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), name


def test_build_optimizer_settings():
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, OptimizerConfig())
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"] is None
    assert build_optimizer(model, OptimizerConfig(fused=False)).defaults["fused"] is False
    # jsonargparse passes betas as a list; the config keeps a tuple.
    assert OptimizerConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(lr=float("nan")), "lr must be > 0, got nan"),
        (dict(betas=(0.9, 1.0)), r"betas must be two values in \[0, 1\), got \(0.9, 1.0\)"),
        (dict(betas=(-0.1, 0.95)), r"betas must be two values in \[0, 1\), got \(-0.1, 0.95\)"),
        (dict(weight_decay=-0.01), "weight_decay must be >= 0, got -0.01"),
        (dict(eps=-1.0), "eps must be >= 0, got -1.0"),
    ],
)
def test_optimizer_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)
