"""Training FLOPs per token against a hand computation from the published Ling-mini-2.0 dims."""

import pytest

from ling.flops import H100_SXM_BF16_PEAK_FLOPS, attention_flops_per_token, mfu, training_flops_per_token
from ling.params import count_parameters
from ling.presets import PRESETS, preset


def test_mini_flops_per_token_by_hand():
    # Ling-mini-2.0 as published (reference/ling-architecture.md §1): vocabulary, hidden, layers, dense
    # layers, heads, KV heads, head_dim, dense FFN, experts, top-k, expert and shared-expert widths.
    V, H, L, k_dense = 157184, 2048, 20, 1
    n_h, n_kv, d = 16, 4, 128
    I, E, K, I_e, I_s = 5120, 256, 8, 512, 512
    T = 4096
    cfg = preset("mini")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.first_k_dense_replace) == (V, H, L, k_dense)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (n_h, n_kv, d)
    assert (cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok) == (I, E, K)
    assert (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (I_e, I_s)

    attention = H * (n_h + 2 * n_kv) * d + n_h * d * H  # fused qkv 6,291,456 + dense 4,194,304
    assert attention == 10_485_760
    dense_ffn = 3 * H * I
    assert dense_ffn == 31_457_280
    moe = E * H + K * 3 * H * I_e + 3 * H * I_s  # router 524,288 + 8 experts 25,165,824 + shared 3,145,728
    assert moe == 28_835_840
    head = V * H
    assert head == 321_912_832
    matmul = L * attention + k_dense * dense_ffn + (L - k_dense) * moe + head
    assert matmul == 1_110_966_272
    scores = 6 * T * n_h * d * L  # causal QK^T and PV, forward + backward
    assert scores == 1_006_632_960
    assert 6 * matmul + scores == 7_672_430_592
    assert training_flops_per_token(cfg, T, include_mtp=False) == 7_672_430_592

    # The MTP layer: one more MoE decoder layer, eh_proj [H, 2H], one more lm_head pass.
    mtp = attention + moe + 2 * H * H + head
    assert mtp == 369_623_040
    expected = 6 * (matmul + mtp) + 6 * T * n_h * d * (L + 1)
    assert expected == 9_940_500_480
    assert training_flops_per_token(cfg, T) == 9_940_500_480


@pytest.mark.parametrize("name", list(PRESETS))
def test_matmul_part_is_six_times_active_params_less_norms_and_biases(name):
    cfg = preset(name)
    H, V, d, E = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.num_experts
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    counts = count_parameters(cfg)
    for include_mtp, key, depth in ((False, "without MTP", 0), (True, "with MTP (1 layer)", D)):
        matmul_flops = training_flops_per_token(cfg, 4096, include_mtp) - attention_flops_per_token(
            cfg, 4096, include_mtp
        )
        # ling.params' non-embedding active count leaves out the embedding and the untied head (V*H each):
        # add the head back, since it is a matmul. It includes what does no matmul work: the RMSNorm
        # weights (2 per block + q/k norms, the final norm; MTP adds enorm, hnorm, final_layernorm) and the
        # fp32 expert_bias buffers (E per MoE layer), which only enter element-wise ops.
        norms = (L + depth) * (2 * H + 2 * d) + H + depth * 3 * H
        biases = E * (cfg.num_moe_layers + depth)
        # The MTP layer runs the shared lm_head a second time: FLOPs, but no extra parameters.
        active = counts[key].non_embedding_active + V * H + depth * V * H
        assert 6 * (active - norms - biases) == matmul_flops


def test_attention_term_grows_linearly_with_seq_len():
    cfg = preset("mini")
    extra = training_flops_per_token(cfg, 8192) - training_flops_per_token(cfg, 4096)
    assert extra == 6 * 4096 * 16 * 128 * (20 + 1)


def test_mfu():
    # Ling-mini-2.0 with MTP, 109,532 tokens/s on 8 x 80G (report README): per GPU at bf16 peak.
    per_gpu = 109_532 / 8
    flops = training_flops_per_token(preset("mini"), 4096)
    assert mfu(per_gpu, flops, H100_SXM_BF16_PEAK_FLOPS) == pytest.approx(per_gpu * 9_940_500_480 / 989.4e12)
    assert mfu(109_532, flops, 8 * H100_SXM_BF16_PEAK_FLOPS) == pytest.approx(mfu(per_gpu, flops, 989.4e12))
    assert mfu(0.0, flops, 1.0) == 0.0
    with pytest.raises(ValueError, match="peak_flops=0"):
        mfu(1.0, flops, 0)
    with pytest.raises(ValueError, match="seq_len=0"):
        training_flops_per_token(preset("mini"), 0)


def test_config_without_mtp_layer_has_no_mtp_term():
    cfg = preset("mini", num_nextn_predict_layers=0)
    assert training_flops_per_token(cfg, 4096) == training_flops_per_token(cfg, 4096, include_mtp=False)
    assert training_flops_per_token(cfg, 4096) == 7_672_430_592
