"""`LingDataModule`: windows of a tokenized corpus, delivered one optimizer step at a time.

Each training batch holds all micro-batches of one optimizer step for this rank, shaped
[micro-batches, rows, seq_len], so the global batch can ramp up (more micro-batches per step)
while Lightning sees one batch per step. Micro-batch k of rank r is a pure function of
(seed, k, r): a resumed run continues with the next unseen batch, and the data position saved in
a checkpoint is just the number of optimizer steps taken.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ling.data.corpus import DataError, load_text
from ling.data.tokenizer import ByteTokenizer
from ling.schedules import BatchRamp, ramp_global_batch


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of a model that ignores context."""
    probs = torch.bincount(tokens).double()
    probs = probs[probs > 0] / tokens.numel()
    return float(-(probs * probs.log()).sum())


def _rng(seed: int, index: int, rank: int) -> torch.Generator:
    # hash() of a tuple of ints is deterministic across processes (only str/bytes hashing is salted).
    return torch.Generator().manual_seed(hash((seed, index, rank)) & 0x7FFF_FFFF_FFFF_FFFF)


def random_windows(tokens: torch.Tensor, seq_len: int, rows: int, seed: int, index: int, rank: int) -> torch.Tensor:
    """Micro-batch `index` of `rank`: `rows` windows of seq_len + 1 tokens at seeded random offsets."""
    offsets = torch.randint(0, tokens.numel() - seq_len, (rows,), generator=_rng(seed, index, rank))
    return torch.stack([tokens[o : o + seq_len + 1] for o in offsets.tolist()])


class StepBatches(IterableDataset):
    """Endless optimizer steps from `start_step`; step s stacks `per_step[s]` micro-batches."""

    def __init__(self, tokens, seq_len: int, rows: int, seed: int, rank: int, start_step: int, schedule):
        self.tokens, self.seq_len, self.rows, self.seed, self.rank = tokens, seq_len, rows, seed, rank
        self.start_step, self.schedule = start_step, schedule

    def __iter__(self):
        step = self.start_step
        index = self.schedule.micro_batches_before(step)
        while True:
            count = self.schedule.micro_batches_at(step)
            windows = torch.stack(
                [random_windows(self.tokens, self.seq_len, self.rows, self.seed, index + i, self.rank)
                 for i in range(count)]
            )  # fmt: skip
            yield {"input_ids": windows[..., :-1], "labels": windows[..., 1:]}
            index += count
            step += 1


class BatchSchedule:
    """Micro-batches per rank at each optimizer step, from the (possibly ramped) global batch."""

    def __init__(self, global_batch: int, ramp: BatchRamp | None, ranks: int, rows: int):
        self.global_batch, self.ramp, self.per_micro_batch = global_batch, ramp, ranks * rows
        self._consumed = [0]  # sequences consumed before step s, filled lazily
        for batch in {global_batch, *([ramp.start] if ramp else [])}:
            if batch % self.per_micro_batch:
                raise DataError(
                    f"a global batch of {batch} sequences is not a whole number of micro-batches of "
                    f"{rows} rows on {ranks} rank(s); make it a multiple of {self.per_micro_batch}."
                )
        if ramp is not None and ramp.increment % self.per_micro_batch:
            raise DataError(
                f"batch_ramp.increment={ramp.increment} must be a multiple of {self.per_micro_batch} "
                f"({ranks} rank(s) x {rows} rows) so every step is whole micro-batches."
            )
        ramp_global_batch(ramp, global_batch, 0)  # validates the ramp against the target

    def batch_at(self, step: int) -> int:
        while len(self._consumed) <= step:
            self._consumed.append(
                self._consumed[-1] + ramp_global_batch(self.ramp, self.global_batch, self._consumed[-1])
            )
        return ramp_global_batch(self.ramp, self.global_batch, self._consumed[step])

    def micro_batches_at(self, step: int) -> int:
        return self.batch_at(step) // self.per_micro_batch

    def micro_batches_before(self, step: int) -> int:
        self.batch_at(step)
        return self._consumed[step] // self.per_micro_batch


class LingDataModule(L.LightningDataModule):
    def __init__(
        self,
        corpus: str = "pydoc",
        seq_len: int = 128,
        micro_batch_size: int = 8,
        global_batch_size: int | None = None,
        batch_ramp: BatchRamp | None = None,
        val_fraction: float = 0.05,
        val_batches: int = 4,
        seed: int = 1234,
    ):
        """
        Args:
            corpus: a bundled corpus name or a UTF-8 text file.
            seq_len: tokens per row.
            micro_batch_size: rows per forward pass on one rank.
            global_batch_size: rows per optimizer step over all ranks (default: one micro-batch per
                rank); the micro-batches per step follow from it, as gradient accumulation.
            batch_ramp: grow the global batch from `start` by `increment` over `ramp_samples` rows.
            val_fraction: share of the corpus held out for validation.
            val_batches: validation micro-batches per rank.
            seed: data order seed.
        """
        super().__init__()
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be positive.")
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction} must be between 0 and 1.")
        self.corpus, self.seq_len, self.micro_batch_size = corpus, seq_len, micro_batch_size
        self.val_fraction, self.val_batches, self.seed = val_fraction, val_batches, seed
        self.global_batch_size, self.batch_ramp = global_batch_size, batch_ramp
        self.tokenizer = ByteTokenizer()
        self.schedule: BatchSchedule | None = None
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None
        self._start = 0

    def setup(self, stage: str | None = None) -> None:
        ranks = self.trainer.world_size if self.trainer is not None else 1
        target = self.global_batch_size or self.micro_batch_size * ranks
        self.schedule = BatchSchedule(target, self.batch_ramp, ranks, self.micro_batch_size)
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
        dataset = StepBatches(
            self.train_tokens, self.seq_len, self.micro_batch_size, self.seed, self._rank(), self._start, self.schedule
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
        # One batch is one optimizer step, so the steps taken are the batches consumed.
        return {"steps": self.trainer.global_step if self.trainer is not None else self._start, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state["steps"])
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"the checkpoint's data seed {state['seed']} differs from data.seed={self.seed}.")
