"""From tokenized conversations to micro-batches: padded or padding-free (packed) collation, the token-aware batch
sampler that tags each micro-batch with the trained tokens of its whole optimizer step, the dataset that serves
the tags, and the batch sampler of planned generation batches. Plain PyTorch; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from capyft.chat import IGNORE_INDEX


class ChatCollator:
    """Pads a list of examples into a batch.

    Args:
        pad_id: the id written at padded positions of ``input_ids`` (never read by the loss: padding is masked by
            the attention mask and ``IGNORE_INDEX`` labels, not by the pad id, so pad may equal end-of-turn).
        padding_free: concatenate the sequences into one row with ``position_ids`` restarting at each conversation
            (and no attention mask); the model then keeps attention inside each conversation.
        pad_to_multiple_of: round the padded length up, for kernels that like multiples of 8 or 64.
    """

    def __init__(self, pad_id: int, padding_free: bool = False, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._packed(examples) if self.padding_free else self._padded(examples)
        if "step_tokens" in examples[0]:
            batch["step_tokens"] = torch.tensor(examples[0]["step_tokens"], dtype=torch.long)
        return batch

    def _padded(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _packed(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for e in examples:
            n = len(e["input_ids"])
            ids += e["input_ids"]
            # The first token of a conversation is never a target: it would be predicted from the one before.
            labels += [IGNORE_INDEX, *e["labels"][1:]]
            positions += range(n)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }


class StepBatchSampler:
    """Yields micro-batches of example indices, each tagged with the trained tokens of its optimizer step.

    Indices come out as ``(index, step_tokens)`` pairs; :class:`TaggedDataset` attaches ``step_tokens`` to the
    example, so the loss of every micro-batch can be divided by the trained tokens of the whole optimizer step
    (all accumulated micro-batches on all ranks): batch 4 x accumulation 1 and batch 1 x accumulation 4 then give the
    same gradient. The order is a pure function of ``seed`` and the epoch, which makes resuming reproducible.

    Args:
        lengths: sequence length of every example.
        trained: trained (label) tokens of every example.
        batch_size: examples per micro-batch and rank.
        accumulate: micro-batches per optimizer step.
        shuffle: shuffle each epoch (seeded); else stored order.
        seed: the base seed.
        group_by_length: sort each window of ``50 x batch x accumulate x ranks`` shuffled examples by length, so a
            micro-batch holds similar lengths and little padding.
        num_replicas: data-parallel ranks.
        rank: this rank.
    """

    def __init__(
        self,
        lengths: list[int],
        trained: list[int],
        batch_size: int,
        accumulate: int = 1,
        shuffle: bool = True,
        seed: int = 42,
        group_by_length: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be >= 1, got {batch_size} and {accumulate}")
        self.lengths, self.trained = lengths, trained
        self.batch_size, self.accumulate = batch_size, accumulate
        self.shuffle, self.seed, self.group_by_length = shuffle, seed, group_by_length
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0  # micro-batches of the current epoch already trained (set when resuming)
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler``, not on the batch sampler itself.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def _order(self) -> list[int]:
        n = len(self.lengths)
        if not self.shuffle:
            return list(range(n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        if self.group_by_length:
            window = 50 * self.batch_size * self.accumulate * self.num_replicas
            order = [
                i
                for start in range(0, n, window)
                for i in sorted(order[start : start + window], key=lambda j: -self.lengths[j])
            ]
        return order

    def _micro_batches(self) -> list[list[tuple[int, int]]]:
        order = self._order()
        per_step = self.batch_size * self.accumulate * self.num_replicas
        # Drop the tail that cannot fill one micro-batch on every rank, so all ranks run the same number of steps.
        usable = len(order) - len(order) % (self.batch_size * self.num_replicas)
        batches = []
        for start in range(0, usable, per_step):
            step = order[start : min(start + per_step, usable)]
            tokens = max(1, sum(self.trained[i] for i in step))
            per_rank = len(step) // self.num_replicas
            mine = step[self.rank * per_rank : (self.rank + 1) * per_rank]
            batches += [
                [(i, tokens) for i in mine[b : b + self.batch_size]] for b in range(0, len(mine), self.batch_size)
            ]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self._micro_batches()
        skip, self.skip = self.skip, 0
        yield from batches[skip:]

    def __len__(self) -> int:
        usable = len(self.lengths) - len(self.lengths) % (self.batch_size * self.num_replicas)
        return usable // (self.batch_size * self.num_replicas)


class TaggedDataset(torch.utils.data.Dataset):
    """Serves examples of a tokenized split; an ``(index, step_tokens)`` key adds ``step_tokens`` to the example.

    A negative index ``-1 - i`` serves row ``i`` with every label ignored: padding that adds no trained token (used
    to give every rank the same number of validation batches).
    """

    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, step_tokens = key if isinstance(key, tuple) else (key, None)
        padding = int(index) < 0
        row = self.split[-1 - int(index) if padding else int(index)]
        labels = [IGNORE_INDEX] * len(row["labels"]) if padding else row["labels"]
        example = {"input_ids": row["input_ids"], "labels": labels, "row": row["row"]}
        if step_tokens is not None:
            example["step_tokens"] = step_tokens
        return example


class GenerationBatches(torch.utils.data.Sampler[list[int]]):
    """A DataLoader ``batch_sampler`` that yields fixed batches of dataset indices, of any sizes, in order."""

    def __init__(self, batches: list[list[int]]) -> None:
        super().__init__()
        self.batches = [list(batch) for batch in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return (list(batch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)
