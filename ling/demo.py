"""The CPU smoke job: a tiny Ling MoE learns a little English prose, is exported and reloaded as a HF
checkpoint, and writes a sample.

Text: CPython's own `pydoc_data.topics` (English prose that ships with every Python), as raw bytes
(ids 0..255, the tiny preset's EOS is 256).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch

from ling.checkpoint import load_pretrained, save_pretrained
from ling.generate import generate
from ling.model import build_model
from ling.params import count_parameters
from ling.presets import preset


def corpus_bytes() -> torch.Tensor:
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def unigram_entropy(tokens: torch.Tensor) -> float:
    probs = torch.bincount(tokens).float()
    probs = probs[probs > 0] / tokens.numel()
    return float(-(probs * probs.log()).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = preset("tiny")
    model = build_model(config)
    counts = count_parameters(config)
    print(
        f"tiny Ling MoE: {counts['with MTP (1 layer)'].total:,} parameters "
        f"({counts['with MTP (1 layer)'].active:,} active), {config.num_experts} experts, "
        f"{config.num_moe_layers} MoE layers + {config.num_nextn_predict_layers} MTP layer"
    )

    data = corpus_bytes()
    split = int(0.95 * data.numel())
    train, held_out = data[:split], data[split:]
    print(f"data: {data.numel():,} bytes of pydoc_data.topics; unigram entropy {unigram_entropy(train):.3f} nats")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), generator=generator)
        rows = torch.stack([train[o : o + args.seq + 1] for o in offsets.tolist()])
        out = model(rows[:, :-1], labels=rows[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step == 1 or step % 25 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(
                f"step {step:4d}  loss {out.main_loss.item():.3f}  mtp {out.mtp_losses[0].item():.3f}  "
                f"{step * args.batch * args.seq / elapsed:,.0f} tok/s"
            )

    model.eval()
    with torch.no_grad():
        rows = held_out[: (held_out.numel() - 1) // (args.seq + 1) * (args.seq + 1)].view(-1, args.seq + 1)
        held_loss = model(rows[:, :-1], labels=rows[:, 1:]).main_loss.item()
    print(f"held-out loss {held_loss:.3f} nats/byte (perplexity {math.exp(held_loss):.2f})")

    out_dir = save_pretrained(model, Path(args.out) / "hf")
    reloaded = load_pretrained(out_dir)
    with torch.no_grad():
        same = torch.equal(model(rows[:2, :-1]).logits, reloaded(rows[:2, :-1]).logits)
    print(f"HF export: {out_dir} (reloaded logits identical: {same})")

    prompt = torch.tensor(list(b"The "))
    sample = generate(
        reloaded,
        prompt,
        120,
        temperature=0.8,
        top_k=40,
        stop_tokens=[config.eos_token_id],
        generator=torch.Generator().manual_seed(args.seed),
    )[0]
    text = bytes(t for t in prompt.tolist() + sample if t < 256).decode("utf-8", errors="replace")
    print(f"sample: {text!r}")


if __name__ == "__main__":
    main()
