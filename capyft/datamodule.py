"""``ChatDataModule``: Capybara-style chat data, split, tokenized and batched for Lightning."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from capyft.batching import ChatCollator, GenerationBatches, StepBatchSampler, TaggedDataset
from capyft.chat import encode_prompt, split_prompt_reference
from capyft.data import (
    BadRow,
    load_source,
    split_source,
    split_stats,
    tokenize_split,
    trained_token_counts,
    truncation_message,
)
from capyft.generation import GenerationSettings
from capyft.modeling import load_tokenizer
from capyft.sizing import (
    GENERATION_HEADROOM,
    GenerationMemory,
    generation_batches,
    micro_batch_split,
    token_budget_from_memory,
    usable_gpu_memory,
)

log = logging.getLogger(__name__)

# Prompts per generation batch with ``eval_batch_size: auto`` where there is no GPU model to size batches for: CPU
# runs are tests and the demo, where a batch's memory does not matter. 8 was the fixed default before ``auto``.
CPU_EVAL_BATCH_SIZE = 8


class ChatDataModule(L.LightningDataModule):
    """Multi-turn chat data for fine-tuning and for the generation test.

    Args:
        tokenizer_name_or_path: hub id or local dir of the tokenizer (linked to ``model.model_name_or_path`` by the
            CLI); the loaded tokenizer is ``self.tokenizer``.
        source: hub id (e.g. ``trl-lib/Capybara``) or a local ``.jsonl``/``.json``/``.parquet`` file or
            ``save_to_disk`` dir; rows in trl's ``messages`` or LDJnr's ``conversation`` schema.
        train_size: training conversations, the first of the training split (None: all not carved off).
        val_size: validation conversations, the ones right after the training rows (disjoint from them).
        test_size: test conversations: the source's test split if it has one, else carved after ``val``.
        shuffle: shuffle the training split (seeded) before carving; default False keeps the stored order, so
            ``train_size: 500`` is the reference's first 500 rows. Training batches are shuffled every epoch.
        seed: seed of the carving shuffle and of the per-epoch batch order.
        max_length: truncate train and val conversations to this many tokens (labels stay aligned); test prompts
            are kept whole.
        train_on: ``all`` assistant messages or only the ``last``.
        system_prompt: a system message for conversations that have none (None: the template's default).
        on_bad_row: ``error`` stops at the first bad row, naming it; ``skip`` drops bad rows and logs how many.
        batch_size: conversations per micro-batch per device, or ``auto``: split each optimizer step of
            ``step_size`` conversations into as few micro-batches as fit (:func:`capyft.sizing.micro_batch_split`)
            and set the trainer's gradient accumulation to match, so the step, and its token-weighted gradient, stay the
            same on every GPU.
        step_size: conversations per optimizer step and device with ``batch_size: auto`` (then leave
            ``trainer.accumulate_grad_batches`` at 1: it is derived).
        micro_batch_tokens: token budget of one micro-batch with ``batch_size: auto``; None: estimated from the GPU
            memory left once the model is loaded (:func:`capyft.sizing.token_budget_from_memory`), or the whole step
            on a CPU.
        eval_batch_size: prompts per generation batch in ``test`` and ``predict``, and conversations per validation
            batch (never more than the training micro-batch); or ``auto``: generation batches of consecutive prompts
            sized to the GPU memory left once the model is loaded (see :func:`capyft.sizing.generation_batches`;
            ``CPU_EVAL_BATCH_SIZE`` prompts on a CPU), and validation batches of the training micro-batch.
        padding_free: pack each micro-batch into one row with per-conversation positions (no padding computed).
        group_by_length: batch conversations of similar length together (less padding).
        pad_to_multiple_of: round padded lengths up to a multiple of this.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        source: str = "trl-lib/Capybara",
        train_size: int | None = 500,
        val_size: int = 20,
        test_size: int = 200,
        shuffle: bool = False,
        seed: int = 42,
        max_length: int | None = 2048,
        train_on: str = "all",
        system_prompt: str | None = None,
        on_bad_row: BadRow = "error",
        batch_size: int | Literal["auto"] = 1,
        step_size: int | None = None,
        micro_batch_tokens: int | None = None,
        eval_batch_size: int | Literal["auto"] = 8,
        padding_free: bool = False,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if train_on not in ("all", "last"):
            raise ValueError(f"data.train_on must be 'all' or 'last', got {train_on!r}")
        if batch_size == "auto" and (step_size is None or max_length is None):
            raise ValueError("data.batch_size auto needs data.step_size (conversations per step) and data.max_length")
        whole = isinstance(eval_batch_size, int) and not isinstance(eval_batch_size, bool)
        if eval_batch_size != "auto" and not (whole and eval_batch_size >= 1):
            raise ValueError(
                f"data.eval_batch_size must be >= 1 prompt (or conversation) per batch, or auto; got "
                f"{eval_batch_size!r}"
            )
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.splits: dict[str, Any] = {}
        self.bad_rows: dict[str, list[tuple[int, str]]] = {}  # per split, (row, error) of each bad row
        self.stats: dict[str, dict[str, Any]] = {}  # per split, data.split_stats

    def setup(self, stage: str) -> None:
        """Loads, splits and tokenizes (cached by ``datasets``) the splits this stage needs."""
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer_name_or_path)
        if self.splits:
            return
        raw = split_source(load_source(hp.source), hp.train_size, hp.val_size, hp.test_size, hp.shuffle, hp.seed)
        for name, split in raw.items():
            if len(split):
                # test rows are only prompted (whole, as in the seed); a cut meant for training must not drop them
                max_length = None if name == "test" else hp.max_length
                bad = self.bad_rows.setdefault(name, [])
                self.splits[name] = tokenize_split(
                    split, self.tokenizer, name, max_length, hp.train_on, hp.system_prompt, hp.on_bad_row, bad
                )
                self.stats[name] = split_stats(self.splits[name])
                message = truncation_message(name, self.stats[name], max_length)
                if message:
                    log.warning("%s", message)
        sizes = ", ".join(f"{name} {len(split)}" for name, split in self.splits.items())
        log.info("data from %s: %s conversations", hp.source, sizes)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _generator(self) -> torch.Generator:
        # A DataLoader draws its base seed from the global RNG each time it is iterated unless it has its own
        # generator; that would shift dropout masks between an uninterrupted and a resumed run.
        return torch.Generator().manual_seed(self.hparams.seed)

    def _collator(self) -> ChatCollator:
        return ChatCollator(self.pad_id, self.hparams.padding_free, self.hparams.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.splits:
            raise ValueError("no training conversations: set data.train_size > 0 (or None for all that remain)")
        split = self.splits["train"]
        trainer = self.trainer
        batch_size = self._micro_batch_size()
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = StepBatchSampler(
            lengths=[len(ids) for ids in split["input_ids"]],
            trained=trained_token_counts(split["labels"]),
            batch_size=batch_size,
            accumulate=accumulate,
            shuffle=True,
            seed=self.hparams.seed,
            group_by_length=self.hparams.group_by_length,
            num_replicas=replicas,
            rank=rank,
        )
        if len(sampler) == 0:
            raise ValueError(
                f"{len(split)} training conversations cannot fill one batch of {batch_size} on "
                f"{replicas} device(s); lower data.batch_size or raise data.train_size"
            )
        if trainer is not None and trainer.fit_loop.restarting:
            # Resuming mid-epoch: the order is a function of (seed, epoch), so skip what was already trained.
            # `processed`, not `completed`: a checkpoint written at the end of a training batch (every_n_train_steps)
            # has run that batch's optimizer step but not yet counted it as completed.
            sampler.epoch = trainer.current_epoch
            sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return DataLoader(
            TaggedDataset(split),
            batch_sampler=sampler,
            collate_fn=self._collator(),
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=self._generator(),
        )

    def planned_steps(self, accumulate: int, replicas: int, epochs: int | None, max_steps: int = -1) -> int | None:
        """Optimizer steps a fit will take, before the micro-batch is known: ``ceil(rows / conversations a step)``
        per epoch (a step is ``step_size`` conversations a device with ``batch_size: auto``, else ``batch_size x
        accumulate``), capped by ``max_steps``; None when neither bounds the fit or the data is not set up."""
        if "train" not in self.splits:
            return None
        per_step = self.hparams.step_size if self.hparams.batch_size == "auto" else self.hparams.batch_size * accumulate
        total = -(-len(self.splits["train"]) // (per_step * replicas)) * epochs if epochs and epochs > 0 else None
        if max_steps is not None and max_steps > 0:
            return max_steps if total is None else min(total, max_steps)
        return total

    def micro_batch_token_bound(self) -> int | None:
        """Most tokens a training micro-batch can hold: its conversations x the longest training conversation (a
        packed row holds at most that, a padded one is that long). None before the data is set up."""
        if "train" not in self.splits or len(self.splits["train"]) == 0:
            return None
        longest = max(len(ids) for ids in self.splits["train"]["input_ids"])
        multiple = self.hparams.pad_to_multiple_of or 1
        return self._micro_batch_size() * -(-longest // multiple) * multiple

    def _micro_batch_size(self) -> int:
        """Training conversations per micro-batch: ``batch_size``, or what ``auto`` picks (once per fit)."""
        if self.hparams.batch_size != "auto":
            return self.hparams.batch_size
        if getattr(self, "_auto_batch", None) is None:
            self._auto_batch = self._auto_split()
        return self._auto_batch

    def _auto_split(self) -> int:
        """Picks the micro-batch for ``batch_size: auto`` and sets the trainer's accumulation to match."""
        hp, trainer = self.hparams, self.trainer
        if trainer is not None and trainer.accumulate_grad_batches not in (1, getattr(self, "_derived_accumulate", 1)):
            raise ValueError(
                "data.batch_size auto derives trainer.accumulate_grad_batches from data.step_size: "
                "leave accumulate_grad_batches at 1 and set data.step_size to the conversations per step"
            )
        budget = hp.micro_batch_tokens
        model = getattr(trainer.lightning_module, "model", None) if trainer is not None else None
        if budget is None and model is not None and torch.cuda.is_available():
            budget = token_budget_from_memory(model.config, trainer.strategy.root_device)
        batch, accumulate = micro_batch_split(hp.step_size, hp.max_length, budget)
        if trainer is not None:
            # Lightning reads this attribute at every batch and in estimated_stepping_batches (after this call)
            trainer.accumulate_grad_batches = self._derived_accumulate = accumulate
        log.info("data.batch_size auto: %d x %d conversations per step (token budget %s)", batch, accumulate, budget)
        return batch

    def val_dataloader(self) -> DataLoader:
        if "val" not in self.splits:
            return []
        # Each rank validates every world_size-th row; ranks short of a row get a copy with no trained token, so
        # all run the same number of batches and the token-weighted loss is exactly one process's.
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        rows = list(range(len(self.splits["val"])))
        per_rank = -(-len(rows) // replicas)
        mine = rows[rank::replicas]
        mine += [-1 - row for row in rows[: per_rank - len(mine)]]  # negative: a padding copy of that row
        # No more conversations per validation batch than per training micro-batch: a no-grad pass over the same
        # tokens needs less memory than training, so validation cannot raise the run's peak. At eval_batch_size 16,
        # a packed validation row of Capybara is ~15k tokens, several times a training micro-batch on an 8 GB card.
        # `auto` sizes generation batches only; validation keeps to the training micro-batch.
        batch_size = self._micro_batch_size()
        if self.hparams.eval_batch_size != "auto":
            batch_size = min(self.hparams.eval_batch_size, batch_size)
        return DataLoader(
            TaggedDataset(self.splits["val"]),
            sampler=mine,
            batch_size=batch_size,
            collate_fn=self._collator(),
            num_workers=self.hparams.num_workers,
            generator=self._generator(),
        )

    def test_dataloader(self) -> DataLoader:
        return self._prompt_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._prompt_loader("test")

    def sample_prompts(self, count: int) -> dict[str, Any] | None:
        """The first ``count`` validation conversations as one left-padded prompt batch (None without any)."""
        if "val" not in self.splits or count < 1:
            return None
        dataset = PromptDataset(self.splits["val"], self.tokenizer, self.hparams.system_prompt)
        return PromptCollator(self.pad_id)([dataset[i] for i in range(min(count, len(dataset)))])

    def _prompt_loader(self, name: str) -> DataLoader:
        if name not in self.splits:
            raise ValueError(f"no {name} conversations: set data.test_size > 0")
        dataset = PromptDataset(self.splits[name], self.tokenizer, self.hparams.system_prompt)
        # Longest prompts first, so each generation batch holds similar lengths (little left padding); each rank
        # takes every world_size-th prompt. The test hook gathers the answers and restores the row order.
        lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        by_length = sorted(range(len(dataset)), key=lambda i: -lengths[i])
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        mine = by_length[rank::replicas]
        loader_args = {
            "collate_fn": PromptCollator(self.pad_id),
            "num_workers": self.hparams.num_workers,
            "generator": self._generator(),
        }
        size = self.hparams.eval_batch_size
        if size == "auto":
            batches = self._generation_plan([lengths[i] for i in mine], mine)
            if batches is not None:
                # Lightning's predict loop wraps a batch sampler other than torch's BatchSampler to record its indices
                # and warns that it cannot tell whether it returns every index; GenerationBatches does.
                warnings.filterwarnings("ignore", message="You are using a custom batch sampler `GenerationBatches`")
                return DataLoader(dataset, batch_sampler=GenerationBatches(batches), **loader_args)
            size = CPU_EVAL_BATCH_SIZE
        return DataLoader(dataset, sampler=mine, batch_size=size, **loader_args)

    def _generation_plan(self, lengths: list[int], indices: list[int]) -> list[list[int]] | None:
        """This rank's generation batches for ``eval_batch_size: auto`` (dataset indices, in the given order), sized
        to its GPU's memory left once the model is loaded; None without a model on a CUDA device (the caller then
        batches ``CPU_EVAL_BATCH_SIZE`` prompts).

        Lightning builds the model (``configure_model``) before it asks for the test or predict dataloader, so the
        memory read here is what generation has.

        Args:
            lengths: the prompts' token counts, longest first.
            indices: their dataset indices.
        """
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        model = getattr(module, "model", None)
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        if model is None or device is None or device.type != "cuda":
            log.info(
                "data.eval_batch_size auto: no model on a CUDA device to size generation batches for; "
                "%d prompts per batch",
                CPU_EVAL_BATCH_SIZE,
            )
            return None
        max_new_tokens = getattr(getattr(module, "generation", None), "max_new_tokens", None)
        if max_new_tokens is None:
            max_new_tokens = GenerationSettings.max_new_tokens
        memory = GenerationMemory.from_config(model.config)
        budget = int(GENERATION_HEADROOM * usable_gpu_memory(device))
        plan = generation_batches(lengths, max_new_tokens, memory, budget)
        where = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
        if lengths and memory.batch_bytes(1, max(lengths), max_new_tokens) > budget:
            log.warning(
                "data.eval_batch_size auto%s: the longest prompt (%d tokens + %d new) needs about %.2f GiB to "
                "generate, more than the %.2f GiB budget of free GPU memory; it runs alone and may run out of "
                "memory (lower model.generation.max_new_tokens or free GPU memory)",
                where,
                max(lengths),
                max_new_tokens,
                memory.batch_bytes(1, max(lengths), max_new_tokens) / 2**30,
                budget / 2**30,
            )
        log.info(
            "data.eval_batch_size auto%s: %d prompts in %d generation batches of at most %d (memory budget %.1f GiB, "
            "%s tokens of KV cache at %d KiB a token; %d new tokens a prompt)",
            where,
            len(lengths),
            len(plan),
            max((len(batch) for batch in plan), default=0),
            budget / 2**30,
            f"{budget // memory.kv_per_token:,}",
            memory.kv_per_token // 1024,
            max_new_tokens,
        )
        return [[indices[position] for position in batch] for batch in plan]


class PromptDataset(torch.utils.data.Dataset):
    """Test examples: the turns before the last assistant message as the prompt, that message as the reference."""

    def __init__(self, split: Any, tokenizer: Any, system_prompt: str | None) -> None:
        self.split, self.tokenizer, self.system_prompt = split, tokenizer, system_prompt

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.split[index]
        prompt, reference = split_prompt_reference(row["messages"])
        ids = encode_prompt(prompt, self.tokenizer, self.system_prompt)
        return {"row": row["row"], "prompt": prompt, "reference": reference, "input_ids": ids}


class PromptCollator:
    """Left-pads prompts for batched generation; keeps ids, prompts and references as lists, in order."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, length - n :] = torch.tensor(e["input_ids"])
            attention_mask[i, length - n :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "row": [e["row"] for e in examples],
            "prompt": [e["prompt"] for e in examples],
            "reference": [e["reference"] for e in examples],
        }
