"""The token-weighted validation loss over uneven batches, on CPU/gloo under LingParallelStrategy;
launched by tests/test_mfu_metrics.py with torchrun (2 ranks). Every rank checks the logged values
against a hand computation over all ranks' target tokens; rank 0 writes both."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ling.data.datamodule import LingDataModule  # noqa: E402
from ling.model.model import IGNORE_INDEX  # noqa: E402

SOURCES = ["web", "code"]
SEQ_LEN = 16
# Rows per batch on each rank: uneven, a short last batch, and a different split on each rank (every
# rank runs the same number of batches, as the sharded model's forward needs).
ROWS = {0: [3, 3, 2], 1: [2, 4, 1]}


def make_batches(rank: int, vocab_size: int) -> list[dict]:
    """Batches whose rows have different numbers of ignored labels; sources alternate."""
    g = torch.Generator().manual_seed(100 + rank)
    batches = []
    for i, rows in enumerate(ROWS[rank]):
        ids = torch.randint(0, vocab_size, (rows, SEQ_LEN), generator=g)
        labels = torch.randint(0, vocab_size, (rows, SEQ_LEN), generator=g)
        for r in range(rows):
            labels[r, : (3 * r + i + rank) % SEQ_LEN] = IGNORE_INDEX  # 0 to 15 ignored per row
        batches.append({"input_ids": ids, "labels": labels, "source": i % len(SOURCES)})
    return batches


class ValData(LingDataModule):
    """A LingDataModule whose validation batches of two named sources are the fixed ones above (no
    source is read)."""

    def __init__(self, vocab_size: int):
        super().__init__(seq_len=SEQ_LEN)
        self.source_names = SOURCES
        self.vocab_size = vocab_size

    def prepare_data(self):
        pass

    def setup(self, stage=None):
        pass

    def val_dataloader(self):
        return DataLoader(make_batches(self.trainer.global_rank, self.vocab_size), batch_size=None)


@torch.no_grad()
def hand_losses(model: torch.nn.Module, batches: list[dict], world: int = 1) -> dict[str, float]:
    """Sum of the per-token fp32 losses over number of target tokens, overall and per source, over
    all ranks."""
    sums = torch.zeros(len(SOURCES), 2, dtype=torch.float64)
    model.eval()
    for batch in batches:
        logits = model(batch["input_ids"]).logits.float()
        total = F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        sums[batch["source"]] += torch.stack([total.double(), (batch["labels"] != IGNORE_INDEX).sum().double()])
    if world > 1:
        torch.distributed.all_reduce(sums)
    out = {"val/loss": float(sums[:, 0].sum() / sums[:, 1].sum())}
    out.update({f"val/loss/{name}": float(sums[j, 0] / sums[j, 1]) for j, name in enumerate(SOURCES)})
    out["val/ppl"] = float(torch.exp(torch.tensor(out["val/loss"], dtype=torch.float64)))
    return out


def main() -> None:
    from ling.lightning_module import LingModule
    from ling.parallel.strategy import LingParallelStrategy
    from tests.parallel_setup import finish

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = LingModule(model="tiny")
    strategy = LingParallelStrategy(1, 2, 1, param_dtype=None, reduce_dtype=None)
    trainer = L.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=args.out + ".root",
    )  # fmt: skip
    data = ValData(module.config.vocab_size)
    trainer.validate(module, datamodule=data, verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    hand = hand_losses(module.model, make_batches(trainer.global_rank, data.vocab_size), trainer.world_size)
    for name, value in hand.items():
        assert abs(logged[name] - value) <= 1e-6 * max(1.0, abs(value)), (
            trainer.global_rank,
            name,
            logged[name],
            value,
        )
    if trainer.is_global_zero:
        torch.save({"logged": logged, "hand": hand}, args.out)
    finish()


if __name__ == "__main__":
    main()
