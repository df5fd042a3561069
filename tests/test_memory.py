"""The FSDP2 + EP memory estimate against hand computations."""

import pytest

from ling.config import ConfigError
from ling.memory import (
    GB,
    activation_bytes,
    estimate_memory,
    format_estimate,
    parameter_breakdown,
    peak_activation_bytes,
)
from ling.parallel.layout import ParallelDims
from ling.params import count_parameters
from ling.presets import PRESETS, preset
from recipes import get_recipe

# One 4,096-token row per micro-batch, full checkpointing, the loss in 2,048-token chunks, 80 GB GPUs.
RUN = dict(activation_checkpointing="full", micro_batch=1, seq_len=4096, loss_chunk_tokens=2048, gpu_memory_gb=80.0)


def estimate(config, nodes, ep, dp_replicate=1, **run):
    """The estimate on `nodes` x 8 GPUs, all of them data parallel."""
    return estimate_memory(config, ParallelDims.for_world(nodes * 8, dp_replicate, ep=ep), **{**RUN, **run})


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_arithmetic_matches_the_model(name):
    cfg = preset(name)
    assert parameter_breakdown(cfg).total == count_parameters(cfg)["with MTP (1 layer)"].total


def test_mini_model_states_by_hand():
    # 16,255,643,392 published parameters without MTP; the recipe trains one MTP layer:
    H, d, E, I_e, I_s, n_h, n_kv = 2048, 128, 256, 512, 512, 16, 4
    attention = H * (n_h + 2 * n_kv) * d + n_h * d * H + 2 * d + 2 * H  # incl. q/k norms, block norms
    mtp = attention + E * H + 3 * H * I_s + E * 3 * H * I_e + E + 2 * H * H + 3 * H  # + bias, eh_proj, 3 norms
    total = 16_255_643_392 + mtp
    assert total == 17_083_504_896
    biases = (19 + 1) * E  # fp32 expert_bias of 19 MoE layers + the MTP layer: buffers, not trained
    trainable = total - biases
    dp_shard = 16  # 2 nodes x 8 GPUs, no replication
    result = estimate(preset("mini"), nodes=2, ep=8)
    assert result.params.trainable == trainable and result.params.buffers == biases
    assert result.parameters == pytest.approx(trainable * 4 / dp_shard + biases * 4, abs=1)
    assert result.gradients == pytest.approx(trainable * 4 / dp_shard, abs=1)
    assert result.optimizer == pytest.approx(trainable * 8 / dp_shard, abs=1)
    assert result.gradients == 4_270_874_944  # 17,083,499,776 * 4 / 16
    # The largest FSDP unit is the final norm + lm_head (V*H + H), bigger than an MoE block with 32 local experts.
    assert result.largest_unit == "final norm + lm_head"
    assert result.gathered_params == 2 * (157184 * H + H) * 2
    assert result.gradient_buffers == (157184 * H + H) * (2 + 4)
    # HSDP: two replicas of an 8-way shard hold twice the states per GPU.
    hsdp = estimate(preset("mini"), nodes=2, ep=8, dp_replicate=2)
    assert hsdp.optimizer == pytest.approx(2 * result.optimizer)


def test_experts_are_gathered_per_expert_parallel_rank():
    cfg = preset("1t")
    H, d, E, I_e = 8192, 128, 256, 2048
    attention = H * (64 + 2 * 8) * d + 64 * d * H + 2 * d + 2 * H
    mtp_non_expert = attention + E * H + 3 * H * 2048 + 2 * H * H + 3 * H
    routed = E * 3 * H * I_e
    # ep=1: the MTP block gathers all 256 experts and is the largest unit.
    result = estimate(cfg, nodes=128, ep=1)
    assert result.largest_unit == "MTP layer 0"
    assert result.gathered_params == 2 * (mtp_non_expert + routed) * 2
    # ep=16: a rank gathers only its 16 experts; the lm_head is then the largest unit.
    result = estimate(cfg, nodes=128, ep=16)
    assert mtp_non_expert + routed // 16 < 157184 * H + H
    assert result.largest_unit == "final norm + lm_head"


def test_activation_estimate_by_hand():
    cfg = preset("tiny")  # V 512, H 64, 3 layers (1 dense), 4 heads / 2 KV of 16, I 192, 16 experts top-4 of 32
    V, H, n_h, n_kv, d, I, E, K, I_e, I_s = 512, 64, 4, 2, 16, 192, 16, 4, 32, 32
    N = 1 * 8  # micro_batch 1, seq_len 8
    norm = N * H * (4 + 2) + N * 4  # fp32 input copy, bf16 normed, fp32 rstd
    attention = (
        norm + N * H * 2  # input norm and its output (the qkv input)
        + N * (n_h + 2 * n_kv) * d * 2  # qkv
        + N * (n_h + n_kv) * d * (4 + 2) + N * (n_h + n_kv) * 4  # q/k norms
        + N * (n_h + n_kv) * d * 2  # rotated q, k
        + N * n_h * d * 2 + N * n_h * 4  # SDPA output + logsumexp
        + N * n_h * d * 2  # dense input
        + norm + N * H * 2  # post-attention norm and its output
    )  # fmt: skip
    assert attention == 18_816
    dense = attention + 4 * N * I * 2
    # router fp32 input + scores, routing indices/weights, sorted rows, expert hidden, expert output, combine input
    moe_internals = N * H * 4 + N * E * 4 + N * K * 32 + K * N * H * 2 + 4 * K * N * I_e * 2 + 2 * K * N * H * 2
    moe_internals += 4 * N * I_s * 2  # shared expert hidden
    moe = attention + moe_internals
    mtp_extra = 2 * norm + N * 2 * H * 2 + norm
    mtp = moe + mtp_extra
    head_inputs = norm + N * H * 2 + N * H * 2  # final norm + its output, MTP head input
    logits = 2 * N * V * (2 + 4)  # whole logits of both heads: bf16 + the fp32 log-softmax
    loss_bwd = N * V * (4 + 4)
    assert (dense, moe, mtp) == (31_104, 44_928, 56_288)

    # Full checkpointing keeps the 3 decoder blocks' inputs and the MTP layer's token embeddings (its
    # hidden input is the final norm's output, a head input already); the whole logits stay held
    # while the MTP block, the largest, is recomputed.
    full = activation_bytes(cfg, 1, 8, "full")
    assert full == {"stored": 3 * N * H * 2 + N * H * 2 + head_inputs, "loss": logits + loss_bwd,
                    "recompute": mtp + logits}  # fmt: skip
    assert peak_activation_bytes(full) == 3 * N * H * 2 + N * H * 2 + head_inputs + logits + mtp == 114_688
    none = activation_bytes(cfg, 1, 8, "none")
    assert none == {"stored": dense + 2 * moe + mtp + head_inputs, "loss": logits + loss_bwd, "recompute": logits}
    assert peak_activation_bytes(none) == 264_320
    selective = activation_bytes(cfg, 1, 8, "moe")
    stored = dense + 2 * attention + attention + mtp_extra + head_inputs
    assert selective == {"stored": stored, "loss": logits + loss_bwd, "recompute": moe_internals + logits}
    # Chunked loss (4 tokens): one chunk's logits, log-softmax and gradients exist only while that
    # chunk runs backward, never while a block is recomputed, so the peak is the larger of the two.
    chunk_loss = 4 * V * (2 + 4) + 4 * V * (4 + 4)
    chunked = activation_bytes(cfg, 1, 8, "full", loss_chunk=4)
    assert chunked == {"stored": full["stored"], "loss": chunk_loss, "recompute": mtp}
    assert chunk_loss < mtp and peak_activation_bytes(chunked) == full["stored"] + mtp
    assert activation_bytes(cfg, 1, 8, "none", loss_chunk=4)["recompute"] == 0
    # Activations scale with tokens; micro_batch and seq_len enter only as their product here.
    assert activation_bytes(cfg, 2, 8, "none") == activation_bytes(cfg, 1, 16, "none")


def test_one_t_long_row_by_hand():
    """One 32,768-token row of Ling-1T under full checkpointing: what is kept and what is recomputed."""
    cfg = preset("1t")
    N, H, V, L = 32768, 8192, 157184, 80
    stored = L * N * H * 2 + N * H * 2  # 80 block inputs + the MTP layer's token embeddings
    stored += N * H * (4 + 2) + 4 * N + N * H * 2 + N * H * 2  # final norm, its output, the MTP head input
    detail = activation_bytes(cfg, 1, N, "full", loss_chunk=2048)
    assert detail["stored"] == stored == 172 * N * H + 4 * N == 46_171_029_504
    assert detail["loss"] == 2048 * V * (2 + 4 + 4 + 4)  # one chunk of one head, not a whole row's logits
    # The MTP block's recompute: the MoE block's 4 sorted/expert-output/combine copies of K*N = 8N rows
    # of H bf16 values alone are 17.2 GB.
    assert detail["recompute"] > 4 * 8 * N * H * 2 > 17e9
    assert estimate(cfg, nodes=126, ep=16, seq_len=N).activations == stored + detail["recompute"] > 79 * GB


def test_headroom_and_total():
    result = estimate(preset("mini"), nodes=2, ep=8)
    items = result.model_states + result.gathered_params + result.gradient_buffers + result.activations
    assert result.total == pytest.approx(items * 1.10 + 2 * GB)
    detail = result.activation_detail
    assert result.activations == detail["stored"] + max(detail["loss"], detail["recompute"])


def test_one_t_recipe_fits_and_one_node_does_not():
    recipe = get_recipe("1t")
    result = recipe.estimate()
    assert result.fits and result.total < 80 * GB
    assert "fits" in format_estimate(result) and format_estimate(result).rstrip().endswith("yes")
    small = estimate(recipe.config(), nodes=1, ep=8)
    assert not small.fits
    assert small.optimizer > 1000 * GB  # 1.01T parameters x 8 bytes / 8 GPUs
    assert format_estimate(small).rstrip().endswith("no")


def test_no_checkpointing_does_not_fit_one_t():
    recipe = get_recipe("1t")
    assert not recipe.with_args(strategy={"activation_checkpointing": "none"}).estimate().fits


def test_impossible_runs_are_refused():
    """The layout is checked against the model (whole experts per rank), and each number of the run."""
    with pytest.raises(ConfigError, match=r"ep=32 must divide num_experts=16"):
        estimate(preset("tiny"), nodes=4, ep=32)
    with pytest.raises(ConfigError, match=r"activation_checkpointing='some' is not one of none, full, moe"):
        estimate(preset("tiny"), nodes=1, ep=1, activation_checkpointing="some")
    with pytest.raises(ConfigError, match=r"micro_batch=0 must be a positive integer"):
        estimate(preset("tiny"), nodes=1, ep=1, micro_batch=0)
    with pytest.raises(ConfigError, match=r"loss_chunk_tokens=-1 must be a positive integer"):
        estimate(preset("tiny"), nodes=1, ep=1, loss_chunk_tokens=-1)
    with pytest.raises(ConfigError, match=r"gpu_memory_gb=0 must be a positive number of GB"):
        estimate(preset("tiny"), nodes=1, ep=1, gpu_memory_gb=0)
    # HSDP with EP: 2 replicas of a 16-way shard whose experts are split 8 ways, each slice over 2 ranks.
    result = estimate(preset("mini"), nodes=4, ep=8, dp_replicate=2)
    assert (result.dims.world, result.dims.dp_shard, result.dims.efsdp) == (32, 16, 2)


def test_activation_estimate_against_the_tensors_autograd_saves():
    """The no-checkpointing estimate against what the eager model really keeps for backward (CPU, bf16):
    every distinct non-parameter storage passed to autograd's saved-tensor hook, plus the logits the
    output holds. The saved bytes come out 1.3% below the estimate for this shape (SDPA kernels
    differ between CPU and GPU in what they keep); 3% of slack is allowed."""
    torch = pytest.importorskip("torch")
    from activation_probe import probe_model, saved_bytes

    cfg, model = probe_model()
    B, T = 2, 64
    saved, out = saved_bytes(model, torch.randint(0, cfg.vocab_size, (B, T)))
    kept_logits = sum(x.numel() * x.element_size() for x in [out.logits, *out.mtp_logits])
    measured = saved + kept_logits
    estimate = activation_bytes(cfg, B, T, "none")
    logits = 2 * B * T * cfg.vocab_size * (2 + 4)  # bf16 logits of both heads + their fp32 log-softmax
    assert measured == pytest.approx(estimate["stored"] + logits, rel=0.03)


def test_chunk_logits_are_gone_before_any_block_is_recomputed():
    """The estimate's chunked-loss peak is stored + max(loss, recompute): no chunk's log-softmax is
    alive while a checkpointed block runs its forward again in backward, and at most one chunk's is
    alive at a time. Watched on the tiny model with every block checkpointed as `parallelize` does."""
    torch = pytest.importorskip("torch")
    import weakref

    import ling.model.model as model_code
    from ling.model import build_model
    from ling.parallel.parallelize import blocks, checkpoint_blocks

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    alive: list = []  # weak references to each chunk's log-softmax, made when backward recomputes it
    events: list[tuple[str, int]] = []
    in_backward = lambda: torch._C._current_graph_task_id() != -1  # noqa: E731

    def chunk_loss(hidden, weight, labels):  # the same loss as the model's, written out in two steps
        logp = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float(), dim=-1)
        if in_backward():
            events.append(("chunk", sum(r() is not None for r in alive)))
            alive.append(weakref.ref(logp))
        return torch.nn.functional.nll_loss(logp, labels, ignore_index=-100, reduction="sum")

    def watch(module, args):
        if in_backward():
            events.append(("block", sum(r() is not None for r in alive)))

    checkpoint_blocks(model, "full")
    for block in blocks(model):
        block.attention.register_forward_pre_hook(watch)  # runs again when backward recomputes the block
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    original, model_code._chunk_loss_sum = model_code._chunk_loss_sum, chunk_loss
    try:
        model(ids, labels=ids, loss_chunk=8).loss.backward()
    finally:
        model_code._chunk_loss_sum = original
    chunks = 2 * 24 // 8
    assert [kind for kind, _ in events].count("chunk") == 2 * chunks  # main and MTP head
    assert [kind for kind, _ in events].count("block") == cfg.num_hidden_layers + 1
    assert all(live == 0 for kind, live in events if kind == "block")
    assert all(live <= 1 for kind, live in events if kind == "chunk")
