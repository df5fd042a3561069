"""Parameter counts from the meta-device model against the published and hand-computed figures."""

from ling.params import count_parameters, main
from ling.presets import preset


def hand_count(cfg):
    """Total parameters from the layer formula (no MTP), counting the fp32 expert biases."""
    H, hd, E = cfg.hidden_size, cfg.head_dim, cfg.num_experts
    attn = H * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd + cfg.num_attention_heads * hd * H + 2 * hd
    norms = 2 * H
    dense = 3 * H * cfg.intermediate_size
    moe = E * 3 * H * cfg.moe_intermediate_size + 3 * H * cfg.moe_intermediate_size + E * H + E
    layers = cfg.num_hidden_layers
    k = cfg.first_k_dense_replace
    return 2 * cfg.vocab_size * H + H + layers * (attn + norms) + k * dense + (layers - k) * moe


def test_published_totals_are_exact():
    assert count_parameters(preset("mini"))["without MTP"].total == 16_255_643_392
    assert count_parameters(preset("flash"))["without MTP"].total == 102_889_705_216
    assert count_parameters(preset("1t"))["without MTP"].total == 999_705_328_640
    for name in ("tiny", "mini", "flash", "1t"):
        assert count_parameters(preset(name))["without MTP"].total == hand_count(preset(name))


def test_mini_active_counts():
    counts = count_parameters(preset("mini"))["without MTP"]
    assert round(counts.active / 1e9, 3) == 1.433
    assert round(counts.non_embedding_active / 1e9, 3) == 0.789
    # Every preset: the inactive routed experts are exactly (E - K) experts per MoE layer.
    for name in ("tiny", "mini", "flash", "1t"):
        cfg = preset(name)
        inactive = cfg.num_moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size
        inactive *= cfg.moe_intermediate_size
        assert count_parameters(cfg)["without MTP"].active == hand_count(cfg) - inactive


def test_mtp_layer_adds_one_moe_block_and_eh_proj():
    cfg = preset("mini")
    counts = count_parameters(cfg)
    added = counts["with MTP (1 layer)"].total - counts["without MTP"].total
    H = cfg.hidden_size
    moe_block = hand_count(cfg.replace(num_hidden_layers=2, first_k_dense_replace=1)) - hand_count(
        cfg.replace(num_hidden_layers=1, first_k_dense_replace=1)
    )
    assert added == moe_block + 2 * H * H + 3 * H  # eh_proj, enorm, hnorm, final_layernorm


def test_cli_prints_table(capsys):
    main(["mini"])
    out = capsys.readouterr().out
    assert "16,255,643,392" in out and "789,147,392" in out
