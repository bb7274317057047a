"""The arm corpus as optimizer steps.

One DataLoader item is one optimizer step: the examples of the effective batch that belong to this
rank, cut into micro-batches of similar length (little padding), plus the number of supervised tokens in
the whole step across all ranks, so that the loss is the mean over every supervised token of the step
however the step is split into micro-batches, packed rows or GPUs.

The plan (which examples form which step) depends only on the seed and the corpus: it is the same on
every rank, after a resume, and on CPU or GPU.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lbt.config.rules import ConfigError
from lbt.data.chat import IGNORE_INDEX, ChatFormat, Example
from lbt.data.records import CorpusRecord, load_corpus

log = logging.getLogger(__name__)


def is_validation_scenario(scenario_id: str, fraction: float) -> bool:
    """Hash-based split on scenario_id: the same scenarios are held out in every arm and every seed."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(scenario_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_records(records: list[CorpusRecord], val_fraction: float) -> tuple[list[CorpusRecord], list[CorpusRecord]]:
    val = [r for r in records if is_validation_scenario(r.scenario_id, val_fraction)]
    if val_fraction > 0 and not val and len(records) > 1:
        # Tiny corpora: hold out the scenario that hashes lowest, so a validation loss always exists.
        first = min(records, key=lambda r: hashlib.sha256(r.scenario_id.encode()).digest())
        val = [r for r in records if r.scenario_id == first.scenario_id]
    val_ids = {r.id for r in val}
    return [r for r in records if r.id not in val_ids], val


def step_plan(n_examples: int, effective_batch: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step, epoch after epoch; the last step of an epoch may be short."""
    steps: list[list[int]] = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        steps.extend(order[i:i + effective_batch].tolist() for i in range(0, n_examples, effective_batch))
    return steps


def pad_batch(examples: list[Example], pad_id: int, rows: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch: input_ids, attention_mask, labels (−100 on padding), n_real_tokens.

    rows > len(examples): filler rows up to that many, each one pad token that attends to itself (a row
    with no real token would leave attention nothing to attend to) and no label, so they add nothing to
    the loss or its gradient; n_real_tokens counts the examples' tokens only."""
    n_rows = max(len(examples), int(rows))
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    n_real = mask.sum()
    mask[len(examples):, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "n_real_tokens": n_real}


def pack_batch(examples: list[Example], pad_id: int, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """One row of concatenated examples with restarting position_ids (padding-free).

    The model derives a block-diagonal causal mask from the position_ids restarts (use_cache=False, no
    attention_mask), so attention stays within each example. The loss cannot cross examples either: the
    first token of each example is a prompt token, labelled −100. The row is padded to a multiple of
    pad_multiple with one extra unsupervised segment, to keep the set of shapes small for torch.compile.
    """
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    positions = [p for e in examples for p in range(len(e.input_ids))]
    pad = -len(ids) % pad_multiple
    ids += [pad_id] * pad
    labels += [IGNORE_INDEX] * pad
    positions += list(range(pad))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "n_real_tokens": torch.tensor(len(ids) - pad)}


def micro_batches(examples: list[Example], micro_batch: int, pad_id: int, pack_tokens: int = 0,
                  pad_multiple: int = 128, fill_rows: bool = False) -> list[dict]:
    """Sort by length and cut into padded micro-batches; with pack_tokens > 0, pack rows of at most that
    many tokens instead (first-fit over the length-sorted examples, longest first).

    fill_rows: every padded micro-batch has micro_batch rows, a short one completed with filler rows
    (`pad_batch`). Compiled layers then see one batch size: an epoch's short last step does not compile
    them again (20-24 s on an H100, benchmarks/RESULTS.md)."""
    if pack_tokens <= 0:
        ordered = sorted(examples, key=lambda e: len(e.input_ids))
        rows = micro_batch if fill_rows else 0
        return [pad_batch(ordered[i:i + micro_batch], pad_id, rows) for i in range(0, len(ordered), micro_batch)]
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(pack_tokens)
            slot = len(rows) - 1
        rows[slot].append(example)
        room[slot] -= n
    return [pack_batch(row, pad_id, pad_multiple) for row in rows]


@dataclass
class DataStats:
    n_train: int
    n_val: int
    truncated_records: int
    truncated_tokens: int
    dropped_records: int  # records whose prompt alone filled max_length (data.drop_long_prompts)
    steps_per_epoch: int
    total_steps: int


class StepDataset(Dataset):
    """Item `step` is optimizer step `step` of the plan, as this rank's micro-batches."""

    def __init__(self, examples: list[Example], plan: list[list[int]], micro_batch: int, pad_id: int,
                 rank: int = 0, world_size: int = 1, pack_tokens: int = 0, fill_rows: bool = False):
        self.examples, self.plan = examples, plan
        self.micro_batch, self.pad_id, self.pack_tokens = micro_batch, pad_id, pack_tokens
        self.rank, self.world_size, self.fill_rows = rank, world_size, fill_rows

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> dict[str, Any]:
        members = [self.examples[j] for j in self.plan[step]]
        mine = members[self.rank::self.world_size]
        return {
            "step": step,
            "step_tokens": sum(e.n_supervised for e in members),
            "micro_batches": (micro_batches(mine, self.micro_batch, self.pad_id, self.pack_tokens,
                                            fill_rows=self.fill_rows) if mine else []),
        }


class ResumeSampler(Sampler[int]):
    """Steps start_step .. total−1, while its length stays the whole plan.

    On resume Lightning restores its batch counter (start_step batches already seen) and ends the epoch
    when that counter reaches len(dataloader). A loader shortened to the remaining steps would end the
    epoch start_step batches early; this one yields exactly the remaining steps and is exhausted when the
    counter reaches the plan's length. `LoRAModule.training_step` checks that every batch is the step
    the trainer expects, so a loop that counted otherwise would fail loudly instead of training on
    the wrong data.
    """

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total_steps, self.start_step = int(total_steps), int(start_step)

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self):
        return iter(range(self.start_step, self.total_steps))


def check_supervised(corpus_path: str, records: list[CorpusRecord], examples: list[Example],
                     max_length: int, drop: bool) -> int:
    """The number of records that keep no assistant token within max_length (their prompt alone fills it).
    Unless `drop` (data.drop_long_prompts) allows training without them, any such record is a ConfigError
    naming the key, how many there are and the first of them: dropping them unasked would train an arm on
    fewer scenarios than its corpus holds, and the arms on different ones, while the job looked whole."""
    empty = [r for r, e in zip(records, examples) if e.n_supervised == 0]
    if not empty:
        return 0
    listed = ", ".join(f"line {r.line} (id {r.id})" for r in empty[:3]) + (", …" if len(empty) > 3 else "")
    what = (f"train.max_length={max_length}: {len(empty)} of {len(records)} records of {corpus_path} keep no "
            f"assistant token (the prompt alone fills the length): {listed}")
    if not drop:
        fix = "raise train.max_length, or set data.drop_long_prompts=true to train without them"
        raise ConfigError([f"{what}; {fix}"])
    log.warning("%s; trained without them (data.drop_long_prompts=true)", what)
    return len(empty)


class CorpusDataModule(L.LightningDataModule):
    """Reads and checks the arm corpus at construction time: bad input fails before any model loads."""

    def __init__(self, corpus_path: str, chat: ChatFormat, seed: int, max_length: int,
                 effective_batch: int, micro_batch: int, epochs: int, max_steps: int | None = None,
                 val_fraction: float = 0.05, pack_tokens: int = 0, num_workers: int = 0,
                 fill_rows: bool = False, drop_long_prompts: bool = False):
        super().__init__()
        self.records = load_corpus(corpus_path)
        self.chat, self.seed, self.max_length = chat, int(seed), int(max_length)
        self.effective_batch, self.micro_batch = int(effective_batch), int(micro_batch)
        self.pack_tokens, self.num_workers, self.fill_rows = int(pack_tokens), int(num_workers), bool(fill_rows)
        train_records, val_records = split_records(self.records, val_fraction)
        if not train_records:
            raise ValueError(f"{corpus_path}: no training records left after the validation split")
        self.train_examples = [self._encode(r) for r in train_records]
        self.val_examples = [self._encode(r) for r in val_records]
        examples = self.train_examples + self.val_examples
        dropped = check_supervised(corpus_path, train_records + val_records, examples, self.max_length,
                                   drop_long_prompts)
        self.train_examples = [e for e in self.train_examples if e.n_supervised > 0]
        if not self.train_examples:
            none = f"no training record of {corpus_path} keeps an assistant token; raise train.max_length"
            raise ConfigError([f"train.max_length={self.max_length}: {none}"])
        steps_per_epoch = math.ceil(len(self.train_examples) / self.effective_batch)
        self.plan = step_plan(len(self.train_examples), self.effective_batch, int(epochs), self.seed)
        if max_steps is not None and int(max_steps) > len(self.plan):
            log.warning("train.max_steps=%d caps the steps, and train.epochs=%d gives %d: training %d steps "
                        "(raise train.epochs for more)", int(max_steps), int(epochs), len(self.plan),
                        len(self.plan))
        if max_steps is not None:
            self.plan = self.plan[:int(max_steps)]
        truncated = [e for e in self.train_examples + self.val_examples if e.truncated_tokens]
        self.stats = DataStats(
            n_train=len(self.train_examples), n_val=len(self.val_examples),
            truncated_records=len(truncated), truncated_tokens=sum(e.truncated_tokens for e in truncated),
            dropped_records=dropped,
            steps_per_epoch=steps_per_epoch, total_steps=len(self.plan))
        if truncated:
            log.warning("%d records truncated to max_length=%d (%d tokens cut)", len(truncated),
                        self.max_length, self.stats.truncated_tokens)
        self.start_step = 0

    def _encode(self, record: CorpusRecord) -> Example:
        return self.chat.example(record.id, record.user, record.assistant, self.max_length)

    @property
    def pad_id(self) -> int:
        return int(self.chat.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            # After a resume the trainer has restored global_step: continue the plan where it stopped.
            self.start_step = self.trainer.global_step
        dataset = StepDataset(self.train_examples, self.plan, self.micro_batch, self.pad_id, rank, world,
                              self.pack_tokens, self.fill_rows)
        return DataLoader(dataset, sampler=ResumeSampler(len(self.plan), self.start_step), batch_size=None,
                          num_workers=self.num_workers, persistent_workers=False)

    def val_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        return micro_batches(self.val_examples, self.micro_batch, self.pad_id) if self.val_examples else []
