"""Parameter counts computed from the model itself, built on the meta device (nothing is allocated).

`python -m ling.params mini` prints total, active and non-embedding active counts with and
without the MTP layer. Active counts take num_experts_per_tok of num_experts routed experts;
embeddings and the untied head count as active, as in the Ling 2.0 report; the fp32 expert
biases are counted because they are stored in the checkpoint.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ling.config import ConfigError, LingConfig
from ling.model import LingForCausalLM, build_model
from ling.model.moe import GroupedExperts
from ling.presets import PRESETS, preset


@dataclass
class ParamCounts:
    total: int
    active: int
    non_embedding_active: int


def _counts(model: LingForCausalLM, include_mtp: bool) -> ParamCounts:
    config = model.config
    routed_share = config.num_experts_per_tok / config.num_experts
    routed = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    embedding = {id(model.model.word_embeddings.weight), id(model.lm_head.weight)}
    total = active = embed = 0
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith("expert_bias")]
    for name, tensor in tensors:
        if not include_mtp and name.startswith("model.mtp_layers."):
            continue
        n = tensor.numel()
        total += n
        if id(tensor) in routed:
            # Stacked routed-expert weights: each expert's share is n / E, K of them are active.
            active += round(n * routed_share)
        else:
            active += n
        if id(tensor) in embedding:
            embed += n
    return ParamCounts(total, active, active - embed)


def count_parameters(config: LingConfig) -> dict[str, ParamCounts]:
    """Counts for the config without MTP and with its MTP layers (one if the config has none)."""
    depth = max(1, config.num_nextn_predict_layers)
    model = build_model(config.replace(num_nextn_predict_layers=depth), device="meta")
    return {"without MTP": _counts(model, False), f"with MTP ({depth} layer)": _counts(model, True)}


def format_table(name: str, counts: dict[str, ParamCounts]) -> str:
    rows = [f"{name:<22}{'total':>20}{'active':>18}{'non-emb active':>18}"]
    for label, c in counts.items():
        rows.append(f"{label:<22}{c.total:>20,}{c.active:>18,}{c.non_embedding_active:>18,}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parameter counts of a Ling preset or config.json.")
    parser.add_argument("model", nargs="+", help=f"a preset ({', '.join(PRESETS)}), a config.json or its folder")
    args = parser.parse_args(argv)
    for name in args.model:
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        try:
            config = LingConfig.from_json_file(path) if path.suffix == ".json" else preset(name)
        except ConfigError as err:
            parser.error(str(err))
        print(format_table(name, count_parameters(config)))
        print()


if __name__ == "__main__":
    main()
