"""`LingDataModule`: named sources, tokenised and cached, mixed and packed per curriculum stage.

sources -> tokenise (cached `datasets.map`) -> token stream per source -> rows of the stage's
seq_len + 1 tokens -> one batch per optimizer step, shaped [micro-batches, rows, seq_len].

Everything a step reads is a pure function of (seed, step): the stage and batch shape come from
the curriculum, the rows drawn from each source from a seeded multinomial per step, and which rows
from a seeded permutation of each source's rows per epoch. So a resumed run continues with the
next unseen batch, also across a stage boundary, and the data position saved in a checkpoint is
the number of optimizer steps taken. The rows of a step are split over the data-parallel ranks,
so ranks never read the same row in a step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ling.data.curriculum import Curriculum, Stage, StepShape, check_curriculum
from ling.data.errors import DataError
from ling.data.packing import SourceRows, document_ids, document_positions
from ling.data.sampling import mixture_counts, permute, stable_key
from ling.data.sources import SourceSpec, load_source
from ling.data.tokenize import TokenStream, tokenize_source
from ling.data.tokenizer import load_tokenizer
from ling.model.model import IGNORE_INDEX
from ling.schedules import BatchRamp, check_ramp

_CHUNK = 1024  # steps of mixture counts drawn at once


def _settings(cls: type, value, what: str):
    """A Stage or SourceSpec from itself or a mapping of its fields (as the Python API may pass)."""
    if isinstance(value, cls):
        return value
    fields = dataclasses.fields(cls)
    names = ", ".join(f.name for f in fields)
    if not isinstance(value, dict):
        raise DataError(f"{what} is {value!r}; give a mapping of {names}.")
    unknown = [key for key in value if key not in {f.name for f in fields}]
    if unknown:
        raise DataError(f"{what}: {unknown[0]!r} is not a setting; valid ones are {names}.")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in value]
    if missing:
        raise DataError(f"{what} needs {missing[0]!r}.")
    return cls(**value)


class MixtureDraws:
    """Rows drawn from each source at each step of each stage, and the draws made before it (seeded,
    stateless: the same counts in every process and every resume)."""

    def __init__(self, curriculum: Curriculum, seed: int):
        self.curriculum, self.seed = curriculum, seed
        self._chunks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (stage, chunk) -> counts, before

    def _chunk(self, stage: int, chunk: int, first_step: int) -> tuple[np.ndarray, np.ndarray]:
        """The counts of one chunk of a stage; the chunks before it are drawn first (in a loop, from the
        last one already known), since each chunk's draws-before start where the previous one ends."""
        known = max((c for s, c in self._chunks if s == stage and c <= chunk), default=-1)
        for missing in range(known + 1, chunk + 1):
            self._draw_chunk(stage, missing, first_step)
        return self._chunks[(stage, chunk)]

    def _draw_chunk(self, stage: int, chunk: int, first_step: int) -> None:
        before = np.zeros(len(self.curriculum.sources), dtype=np.int64)
        if chunk > 0:
            counts, prev = self._chunks[(stage, chunk - 1)]
            before = prev[-1] + counts[-1]
        rows = []
        for u in range(chunk * _CHUNK, (chunk + 1) * _CHUNK):
            shape = self.curriculum.at(first_step + u)
            if shape.stage != stage:
                break
            rows.append(shape.global_rows)
        key = stable_key(self.seed, "mixture", stage, chunk)
        counts = mixture_counts(np.array(rows), np.array(self.curriculum.weights[stage]), key)
        self._chunks[(stage, chunk)] = (counts, before + np.cumsum(counts, axis=0) - counts)

    def at(self, step: StepShape) -> tuple[np.ndarray, np.ndarray]:
        """(rows drawn from each source at this step, draws from each source before it in the stage)."""
        first = step.step - step.step_in_stage
        counts, before = self._chunk(step.stage, step.step_in_stage // _CHUNK, first)
        i = step.step_in_stage % _CHUNK
        return counts[i], before[i]


class StepBatches(IterableDataset):
    """Endless optimizer steps from `start_step` for one data-parallel rank."""

    def __init__(self, data: LingDataModule, rank: int, start_step: int):
        self.data, self.rank, self.start_step = data, rank, start_step

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.data.step_batch(step, self.rank)
            step += 1


class _Batches(IterableDataset):
    """Ready-made batches; iterable so that Lightning does not shard them again with a sampler."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LingDataModule(L.LightningDataModule):
    def __init__(
        self,
        sources: dict[str, SourceSpec] | None = None,
        tokenizer: str = "byte",
        eos_token: str | None = None,
        seq_len: int = 128,
        micro_batch_size: int = 8,
        global_batch_size: int | None = None,
        batch_ramp: BatchRamp | None = None,
        batch_mode: str = "tokens",
        mixture: dict[str, float] | None = None,
        stages: list[Stage] | None = None,
        eod_mask_loss: bool = True,
        document_isolation: bool = False,
        val_fraction: float = 0.05,
        val_batches: int = 4,
        seed: int = 1234,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ):
        """
        Args:
            sources: named sources (default: the bundled `pydoc` text).
            tokenizer: "byte" (no download) or a local Hugging Face tokenizer folder or tokenizer.json.
            eos_token: the end-of-text token, when the tokenizer does not say.
            seq_len: tokens per row at the base length, the one micro_batch_size and
                global_batch_size are counted at (stages may change the length).
            micro_batch_size: rows per forward pass on one rank, at seq_len.
            global_batch_size: rows per optimizer step over all ranks at seq_len (default: one
                micro-batch per rank); the micro-batches per step follow, as gradient accumulation.
            batch_ramp: grow the global batch from `start` by `increment` over `ramp_samples` rows.
            batch_mode: at another stage length keep the tokens per step ("tokens", rows adjust) or
                the rows per step ("sequences").
            mixture: default source weights for stages that set none, summing to 1 (default: equal).
            stages: the curriculum (default: one open-ended stage at seq_len).
            eod_mask_loss: no loss on predicting the token after a document end (the next document's
                first token, which nothing in the row predicts); the document end itself is a target.
                The document end is the tokenizer's `document_end_id`: `<|endoftext|>` for Ling's chat
                tokenizer, whose EOS `<|role_end|>` ends each turn, so a conversation is one document.
            document_isolation: position ids restart per document and attention stays inside it.
            val_fraction: share of each source's tokens held out (its tail) for validation.
            val_batches: validation micro-batches per rank and source.
            seed: data order seed.
            num_proc: processes for tokenisation.
            cache_dir: where tokenised sources are cached (default: $HF_DATASETS_CACHE/ling-train).
        """
        super().__init__()
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be positive.")
        if global_batch_size is not None and global_batch_size < 1:
            raise DataError(
                f"data.global_batch_size={global_batch_size} must be a positive number of rows per step "
                "(or null for one micro-batch per rank)."
            )
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction} must be between 0 and 1.")
        self.specs = dict(sources) if sources else {"pydoc": SourceSpec(path="pydoc")}
        self.specs = {k: _settings(SourceSpec, v, f"source {k!r}") for k, v in self.specs.items()}
        self.source_names = list(self.specs)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.global_batch_size, self.batch_ramp, self.batch_mode = global_batch_size, batch_ramp, batch_mode
        self.default_mixture = mixture
        self.stages = list(stages) if stages is not None else [Stage(name="main", seq_len=seq_len)]  # data.mixture
        self.stages = [_settings(Stage, s, f"stage {i}") for i, s in enumerate(self.stages)]
        # Everything about the curriculum that needs no rank count is checked now, before any data is read;
        # `setup` builds it for the run's ranks and checks the batch shapes.
        check_curriculum(self.stages, self.source_names, batch_mode, mixture)
        if batch_ramp is not None and global_batch_size is not None:
            check_ramp(batch_ramp, global_batch_size)
        self.eod_mask_loss, self.document_isolation = eod_mask_loss, document_isolation
        self.val_fraction, self.val_batches, self.seed = val_fraction, val_batches, seed
        self.num_proc, self.cache_dir = num_proc, cache_dir
        self.tokenizer = load_tokenizer(tokenizer, eos_token=eos_token)
        # Recorded in checkpoints, so that an exported checkpoint carries the tokenizer it was trained with.
        name = tokenizer if tokenizer == "byte" else str(Path(tokenizer).resolve())
        self.tokenizer_spec = {"name": name, "eos_token": eos_token}
        self.curriculum: Curriculum | None = None
        self.mixture_draws: MixtureDraws | None = None
        self.train_rows: list[SourceRows] = []
        self.val_streams: list[tuple[TokenStream, int]] = []
        self._streams: list[TokenStream] | None = None
        self._start = 0

    # ---- preparation ----------------------------------------------------------------------------
    def _tokenized(self) -> list[TokenStream]:
        if self._streams is not None:  # prepared in this process already (prepare_data, then setup)
            return self._streams
        streams = []
        for name, spec in self.specs.items():
            raw = load_source(name, spec)
            field = spec.messages_field or spec.text_field
            chat = spec.messages_field is not None
            tokenized = tokenize_source(
                name, raw, self.tokenizer, field, chat, self.cache_dir, self.num_proc, loss=spec.loss
            )
            streams.append(TokenStream(tokenized, name))
        self._streams = streams
        return streams

    def prepare_data(self) -> None:
        # Runs on one process per node before `setup`: the other ranks then read the cache.
        self._tokenized()

    def setup(self, stage: str | None = None) -> None:
        ranks = self.trainer.world_size if self.trainer is not None else 1
        self.curriculum = Curriculum(
            self.stages,
            self.source_names,
            self.seq_len,
            self.micro_batch_size,
            self.global_batch_size or self.micro_batch_size * ranks,
            self.batch_ramp,
            ranks,
            self.batch_mode,
            self.default_mixture,
        )
        self.mixture_draws = MixtureDraws(self.curriculum, self.seed)
        if self.train_rows:
            return
        for stream in self._tokenized():
            split = int(len(stream) * (1 - self.val_fraction))
            self.train_rows.append(SourceRows(stream.name, stream, split))
            self.val_streams.append((stream, split))
        self._check_lengths()

    def _check_lengths(self) -> None:
        for index, stage in enumerate(self.stages):
            seq_len = stage.seq_len or self.seq_len
            for rows, weight in zip(self.train_rows, self.curriculum.weights[index]):
                if weight > 0 and rows.count(seq_len) < 1:
                    raise DataError(
                        f"source {rows.name!r} has {rows.end} training tokens, fewer than the "
                        f"{seq_len + 1} one row of stage {stage.name!r} needs; add data or shorten the stage's seq_len."
                    )
        for stream, split in self.val_streams:
            if len(stream) - split < self.seq_len + 1:
                raise DataError(
                    f"source {stream.name!r} holds out {len(stream) - split} tokens for validation, fewer than "
                    f"seq_len + 1 = {self.seq_len + 1}; raise val_fraction or add data."
                )

    # ---- batches --------------------------------------------------------------------------------
    def _finish(self, windows: torch.Tensor, trained: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Inputs, labels (and document ids/positions) from rows of seq_len + 1 tokens; tokens that
        `trained` (the rows' loss mask) marks False are no labels."""
        inputs, labels = windows[..., :-1], windows[..., 1:].clone()
        eos = self.tokenizer.document_end_id
        if trained is not None:
            labels[~trained[..., 1:]] = IGNORE_INDEX
        if self.eod_mask_loss:
            labels[inputs == eos] = IGNORE_INDEX
        batch = {"input_ids": inputs, "labels": labels}
        if self.document_isolation:
            flat = inputs.reshape(-1, inputs.shape[-1])
            doc = document_ids(flat, eos)
            batch["doc_ids"] = doc.view_as(inputs)
            batch["position_ids"] = document_positions(doc).view_as(inputs)
        return batch

    def step_batch(self, step: int, rank: int) -> dict:
        """Rank `rank`'s micro-batches of optimizer step `step`: [micro-batches, rows, seq_len]."""
        shape = self.curriculum.at(step)
        counts, before = self.mixture_draws.at(shape)
        sources = np.repeat(np.arange(len(counts)), counts)
        draws = np.concatenate([np.arange(b, b + c) for b, c in zip(before, counts)])
        # Interleave the sources over the step's row slots; slot = (micro-batch, rank, row).
        order = permute(np.arange(shape.global_rows), shape.global_rows, stable_key(self.seed, "slots", step))
        slots = np.arange(shape.micro_batches * shape.rows)
        micro, row = slots // shape.rows, slots % shape.rows
        mine = order[micro * (self.curriculum.ranks * shape.rows) + rank * shape.rows + row]
        windows = np.empty((len(mine), shape.seq_len + 1), dtype=np.int64)
        trained = np.ones(windows.shape, dtype=bool)
        key = stable_key(self.seed, "rows", shape.stage)
        for j, source in enumerate(self.train_rows):
            at = np.flatnonzero(sources[mine] == j)
            if at.size:
                windows[at], trained[at] = source.rows(draws[mine[at]], shape.seq_len, key)
        dims = (shape.micro_batches, shape.rows, shape.seq_len + 1)
        batch = self._finish(torch.from_numpy(windows).view(dims), torch.from_numpy(trained).view(dims))
        batch["stage"] = shape.stage
        batch["source_rows"] = torch.from_numpy(counts.copy())
        return batch

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Everything but `source_rows` to the device: those counts are only read on the host (for the
        data-share logs), and reading them back from a GPU would make the step wait for it."""
        if not isinstance(batch, dict) or "source_rows" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        rest = {k: v for k, v in batch.items() if k != "source_rows"}
        return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "source_rows": batch["source_rows"]}

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepBatches(self, self._rank(), self._start), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Each source's held-out tail as consecutive windows at the base seq_len, split across ranks."""
        world, rank, T = (self.trainer.world_size if self.trainer is not None else 1), self._rank(), self.seq_len
        batches = []
        for index, (stream, split) in enumerate(self.val_streams):
            rows = min((len(stream) - split - 1) // T, self.val_batches * self.micro_batch_size * world)
            rows -= rows % world  # every rank gets the same number of batches
            if rows == 0:
                continue
            window = torch.from_numpy(stream.read(split, rows * T + 1))
            windows = window.unfold(0, T + 1, T)[rank::world]
            trained = torch.from_numpy(stream.read_loss(split, rows * T + 1)).unfold(0, T + 1, T)[rank::world]
            for i in range(0, len(windows), self.micro_batch_size):
                part = slice(i, i + self.micro_batch_size)
                batch = self._finish(windows[part], trained[part])
                batch["source"] = index
                batches.append(batch)
        return DataLoader(_Batches(batches), batch_size=None)

    # ---- reporting and state ----------------------------------------------------------------------
    @property
    def unigram_entropy(self) -> float:
        """Entropy (nats) of the first stage's token distribution: the loss of a model ignoring context."""
        probs = np.zeros(self.tokenizer.vocab_size)
        for rows, weight in zip(self.train_rows, self.curriculum.weights[0]):
            if weight > 0:  # the first 4M tokens of each source stand for it
                sample = rows.stream.read(0, min(rows.end, 4_000_000))
                probs += np.bincount(sample, minlength=probs.size) / sample.size * weight
        probs = probs[probs > 0] / probs.sum()
        return float(-(probs * np.log(probs)).sum())

    def state_dict(self) -> dict:
        # One batch is one optimizer step, so the steps taken are the batches consumed.
        steps = self.trainer.global_step if self.trainer is not None else self._start
        stage = self.stages[self.curriculum.at(steps).stage].name if self.curriculum else None
        return {"steps": steps, "seed": self.seed, "stage": stage}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state["steps"])
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"the checkpoint's data seed {state['seed']} differs from data.seed={self.seed}.")


def ling_data(trainer: L.Trainer) -> LingDataModule | None:
    """The trainer's LingDataModule; None when the batches come from elsewhere (plain dataloaders or
    another data module), which then bring no tokenizer, curriculum or named sources."""
    datamodule = trainer.datamodule
    return datamodule if isinstance(datamodule, LingDataModule) else None
