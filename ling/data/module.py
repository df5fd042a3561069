"""`LingDataModule`: windows of a tokenized corpus as (input_ids, labels) micro-batches.

Micro-batch k of rank r is a pure function of (seed, k, r), so a resumed run continues with the
next unseen batch: the data position saved in a checkpoint is just the micro-batch count.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ling.data.corpus import DataError, load_text
from ling.data.tokenizer import ByteTokenizer


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of a model that ignores context."""
    probs = torch.bincount(tokens).double()
    probs = probs[probs > 0] / tokens.numel()
    return float(-(probs * probs.log()).sum())


def _rng(seed: int, index: int, rank: int) -> torch.Generator:
    # hash() of a tuple of ints is deterministic across processes (only str/bytes hashing is salted).
    return torch.Generator().manual_seed(hash((seed, index, rank)) & 0x7FFF_FFFF_FFFF_FFFF)


class RandomWindows(IterableDataset):
    """Endless micro-batches of random windows; batch k of a rank depends on (seed, k, rank) only."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, rows: int, seed: int, start: int, rank: int):
        self.tokens, self.seq_len, self.rows = tokens, seq_len, rows
        self.seed, self.start, self.rank = seed, start, rank

    def __iter__(self):
        k = self.start
        span = self.tokens.numel() - self.seq_len - 1
        while True:
            offsets = torch.randint(0, span + 1, (self.rows,), generator=_rng(self.seed, k, self.rank))
            rows = torch.stack([self.tokens[o : o + self.seq_len + 1] for o in offsets.tolist()])
            yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
            k += 1


class LingDataModule(L.LightningDataModule):
    def __init__(
        self,
        corpus: str = "pydoc",
        seq_len: int = 128,
        micro_batch_size: int = 8,
        val_fraction: float = 0.05,
        val_batches: int = 4,
        seed: int = 1234,
    ):
        super().__init__()
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be positive.")
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction} must be between 0 and 1.")
        self.corpus, self.seq_len, self.micro_batch_size = corpus, seq_len, micro_batch_size
        self.val_fraction, self.val_batches, self.seed = val_fraction, val_batches, seed
        self.tokenizer = ByteTokenizer()
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None
        self._start = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return
        tokens = torch.tensor(self.tokenizer.encode(load_text(self.corpus)), dtype=torch.long)
        split = int(tokens.numel() * (1 - self.val_fraction))
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        for name, part in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if part.numel() < self.seq_len + 1:
                raise DataError(
                    f"the {name} split of corpus {self.corpus!r} has {part.numel()} tokens, fewer than "
                    f"seq_len + 1 = {self.seq_len + 1}; use a longer corpus or a shorter seq_len."
                )

    @property
    def unigram_entropy(self) -> float:
        return unigram_entropy(self.train_tokens)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        dataset = RandomWindows(
            self.train_tokens, self.seq_len, self.micro_batch_size, self.seed, self._start, self._rank()
        )
        return DataLoader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Fixed, non-overlapping held-out windows, split across ranks."""
        rows = (self.val_tokens.numel() - 1) // self.seq_len
        world = self.trainer.world_size if self.trainer is not None else 1
        rows = min(rows, self.val_batches * self.micro_batch_size * world)
        window = self.val_tokens[: rows * self.seq_len + 1]
        inputs, labels = window[:-1].view(rows, self.seq_len), window[1:].view(rows, self.seq_len)
        mine = list(range(self._rank(), rows, world))
        batches = [
            {
                "input_ids": inputs[mine[i : i + self.micro_batch_size]],
                "labels": labels[mine[i : i + self.micro_batch_size]],
            }
            for i in range(0, len(mine), self.micro_batch_size)
        ]
        return DataLoader(batches, batch_size=None)

    def state_dict(self) -> dict:
        # Checkpoints are written at optimizer-step boundaries, so every micro-batch of the steps
        # taken so far has been consumed, and none of the next step's.
        consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else self._start
        return {"micro_batches": consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state["micro_batches"])
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"the checkpoint's data seed {state['seed']} differs from data.seed={self.seed}.")
