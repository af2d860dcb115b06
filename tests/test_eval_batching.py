"""``data.eval_batch_size``: a number, or ``auto`` (generation batches sized to the GPU memory left once the model is
loaded, a fixed size on a CPU). The GPU path runs here with a stand-in trainer and a stubbed memory reading."""

from __future__ import annotations

import logging
import random
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from capyft import assets, checks, datamodule, preview
from capyft.checks import ConfigError
from capyft.cli import main
from capyft.data import SAMPLE_DATA
from capyft.datamodule import CPU_EVAL_BATCH_SIZE, ChatDataModule, PromptDataset
from capyft.generation import PREFILL_TOKENS, GenerationSettings
from capyft.sizing import GENERATION_HEADROOM, MAX_GENERATION_ROWS, GenerationMemory, generation_batches

GiB = 2**30
# Llama-3.1-8B's shape in 16 bits: 128 KiB of KV cache a token
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def llama_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_8B, dtype="float16")


MEMORY = GenerationMemory.from_config(llama_8b_config())


def prompt_lengths(count: int = 200, seed: int = 0) -> list[int]:
    """Prompt token counts, longest first, as the prompt loader orders them."""
    rng = random.Random(seed)
    return sorted((rng.randint(20, 4000) for _ in range(count)), reverse=True)


# ---- the plan ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, GiB, 8 * GiB, 80 * GiB, 10**15])
def test_plan_covers_every_prompt_once_in_order_and_fits_the_budget(budget):
    lengths = prompt_lengths()
    plan = generation_batches(lengths, 100, MEMORY, budget)
    assert [position for batch in plan for position in batch] == list(range(len(lengths)))
    for batch, following in zip(plan, [*plan[1:], None]):
        assert 1 <= len(batch) <= MAX_GENERATION_ROWS
        longest = max(lengths[p] for p in batch)
        assert len(batch) == 1 or MEMORY.batch_bytes(len(batch), longest, 100) <= budget
        if following:  # as few batches as fit: the next prompt would have broken the budget or the cap
            grown = MEMORY.batch_bytes(len(batch) + 1, max(longest, lengths[following[0]]), 100)
            assert grown > budget or len(batch) == MAX_GENERATION_ROWS
    sizes = [len(batch) for batch in plan]
    assert sizes[:-1] == sorted(sizes[:-1])  # longest prompts first: batches grow as the prompts shorten


def test_a_larger_budget_gives_fewer_larger_batches():
    lengths = prompt_lengths()
    plans = [generation_batches(lengths, 100, MEMORY, budget) for budget in (2 * GiB, 8 * GiB, 40 * GiB)]
    counts = [len(plan) for plan in plans]
    largest = [max(len(batch) for batch in plan) for plan in plans]
    assert counts[0] > counts[1] > counts[2] and largest[0] < largest[1] < largest[2]
    # more new tokens per answer: more KV cache per row, so more batches
    assert len(generation_batches(lengths, 1000, MEMORY, 8 * GiB)) > counts[1]


def test_a_budget_smaller_than_one_prompt_gives_one_prompt_per_batch():
    lengths = prompt_lengths(20)
    assert generation_batches(lengths, 100, MEMORY, 1) == [[i] for i in range(20)]
    # a budget that holds the two shortest prompts but not the longest one: that one still runs, alone
    budget = MEMORY.batch_bytes(2, lengths[-2], 100)
    assert MEMORY.batch_bytes(1, lengths[0], 100) > budget
    plan = generation_batches(lengths, 100, MEMORY, budget)
    assert plan[0] == [0] and plan[-1] == [18, 19]


def test_rows_per_batch_are_capped():
    assert [len(b) for b in generation_batches([50] * 600, 100, MEMORY, 10**15)] == [256, 256, 88]
    assert generation_batches([50] * 3, 100, MEMORY, 10**15, max_rows=1) == [[0], [1], [2]]
    assert generation_batches([], 100, MEMORY, GiB) == []
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        generation_batches([50], 100, MEMORY, GiB, max_rows=0)


def test_memory_estimate_from_the_model_config():
    kv, activations = 2 * 32 * 8 * 128 * 2, (4 * 14336 + 4 * 4096) * 2
    assert GenerationMemory.from_config(llama_8b_config()) == GenerationMemory(kv, activations, 128256 * 6, 5)
    assert (kv, activations) == (128 * 1024, 144 * 1024)
    # per row: the cache of prompt and answer, the logits; once: a prefill pass of every row (20 tokens here)
    per_row = (10 + 3) * kv + 128256 * 6
    assert MEMORY.batch_bytes(2, 10, 3) == 2 * per_row + 20 * (activations + 10 * 5)
    # the prefill runs in passes of at most PREFILL_TOKENS tokens: its transients stop growing with the rows
    per_row = (1000 + 3) * kv + 128256 * 6
    assert MEMORY.batch_bytes(100, 1000, 3) == 100 * per_row + PREFILL_TOKENS * (activations + 1000 * 5)
    # ... or one prompt, when it is longer than that
    per_row = (20000 + 3) * kv + 128256 * 6
    assert MEMORY.batch_bytes(3, 20000, 3) == 3 * per_row + 20000 * (activations + 20000 * 5)
    # no head_dim, no num_key_value_heads, no intermediate_size: hidden // heads, every head, 4 x hidden
    bare = SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)
    assert GenerationMemory.from_config(bare) == GenerationMemory(2 * 2 * 4 * 16 * 4, (4 * 256 + 4 * 64) * 4, 800, 9)
    bare.dtype = torch.bfloat16  # no dtype read above: float32, the widest; bfloat16 halves the cache
    assert GenerationMemory.from_config(bare).kv_per_token == 2 * 2 * 4 * 16 * 2
    # a multimodal config: the sizes come from its text config
    wrapper = SimpleNamespace(dtype="float16", get_text_config=lambda: llama_8b_config())
    assert GenerationMemory.from_config(wrapper) == MEMORY
    with pytest.raises(ValueError, match="config has no num_hidden_layers; set data.eval_batch_size to a number"):
        GenerationMemory.from_config(SimpleNamespace(hidden_size=64, num_attention_heads=4, vocab_size=100))


# ---- the prompt loader ---------------------------------------------------------------------------------------
class StandInTrainer:
    """What the data module reads of a trainer: rank, world size, device and the LightningModule's model."""

    def __init__(self, device="cuda", rank=0, world_size=1, model=True, generation=None):
        self.global_rank, self.world_size = rank, world_size
        self.strategy = SimpleNamespace(root_device=torch.device(device))
        self.lightning_module = SimpleNamespace(model=SimpleNamespace(config=llama_8b_config()) if model else None)
        if generation is not None:
            self.lightning_module.generation = generation


def make(tokenizer, **kwargs):
    """A set-up data module over the bundled rows: 2 train, 2 val, 12 test prompts (329-997 SmolLM2 tokens)."""
    args = {"source": str(SAMPLE_DATA), "train_size": 2, "val_size": 2, "test_size": 12, "max_length": None}
    data = ChatDataModule(tokenizer_name_or_path=str(assets.smollm2_dir()), **(args | kwargs))
    data.tokenizer = tokenizer
    data.setup("test")
    return data


def rows_and_lengths(data):
    """The test rows, longest prompt first (the loader's order), and their prompt lengths."""
    dataset = PromptDataset(data.splits["test"], data.tokenizer, None)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    return [data.splits["test"]["row"][i] for i in order], [lengths[i] for i in order]


def loader_rows(data, trainer=None):
    data.trainer = trainer
    try:
        return [batch["row"] for batch in data.test_dataloader()]
    finally:
        data.trainer = None


@pytest.fixture(scope="module")
def auto_data(smollm2_tokenizer):
    return make(smollm2_tokenizer, eval_batch_size="auto")


@pytest.fixture
def free_memory(monkeypatch):
    """Sets the GPU memory the prompt loader reads as usable (bytes)."""

    def set_free(free):
        monkeypatch.setattr(datamodule, "usable_gpu_memory", lambda device: free)

    return set_free


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_number_batches_as_before(smollm2_tokenizer, world_size):
    data = make(smollm2_tokenizer, eval_batch_size=5)
    rows, _ = rows_and_lengths(data)
    for rank in range(world_size):
        mine = rows[rank::world_size]
        expected = [mine[i : i + 5] for i in range(0, len(mine), 5)]
        for trainer in (StandInTrainer("cpu", rank, world_size), StandInTrainer("cuda", rank, world_size)):
            assert loader_rows(data, trainer) == expected  # a GPU model changes nothing
            data.trainer = trainer
            loader = data.test_dataloader()
            data.trainer = None
            assert loader.batch_size == 5 and loader.batch_sampler.batch_size == 5 and not loader.drop_last


def test_auto_on_a_cpu_batches_a_fixed_size(auto_data, caplog):
    rows, _ = rows_and_lengths(auto_data)
    expected = [rows[:CPU_EVAL_BATCH_SIZE], rows[CPU_EVAL_BATCH_SIZE:]]
    assert CPU_EVAL_BATCH_SIZE == 8
    with caplog.at_level(logging.INFO, logger="capyft.datamodule"):
        assert loader_rows(auto_data) == expected  # no trainer
        assert loader_rows(auto_data, StandInTrainer("cpu")) == expected
        assert loader_rows(auto_data, StandInTrainer("cuda", model=False)) == expected
    assert "no model on a CUDA device to size generation batches for; 8 prompts per batch" in caplog.text


@pytest.mark.parametrize("generation", [None, GenerationSettings(max_new_tokens=300)])
def test_auto_on_a_gpu_sizes_batches_to_its_free_memory(auto_data, free_memory, caplog, generation):
    rows, lengths = rows_and_lengths(auto_data)
    new = 100 if generation is None else 300  # without the module's settings: GenerationSettings' default
    counts = []
    for free in (1.25 * GiB, 2.5 * GiB, 5 * GiB):
        free_memory(int(free))
        budget = int(GENERATION_HEADROOM * int(free))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="capyft.datamodule"):
            batches = loader_rows(auto_data, StandInTrainer("cuda", generation=generation))
        assert [row for batch in batches for row in batch] == rows  # every prompt once, longest first
        start = 0
        for batch in batches:
            longest = max(lengths[start : start + len(batch)])
            assert len(batch) == 1 or MEMORY.batch_bytes(len(batch), longest, new) <= budget
            start += len(batch)
        plan = generation_batches(lengths, new, MEMORY, budget)
        assert [len(b) for b in batches] == [len(b) for b in plan]
        message = f"12 prompts in {len(plan)} generation batches of at most {max(len(b) for b in plan)}"
        assert message in caplog.text and f"{new} new tokens a prompt" in caplog.text
        counts.append(len(batches))
    assert counts[0] > counts[1] > counts[2] >= 1


def test_auto_shards_the_sorted_prompts_across_ranks(auto_data, free_memory):
    rows, _ = rows_and_lengths(auto_data)
    free_memory(2 * GiB)
    for rank in range(3):
        batches = loader_rows(auto_data, StandInTrainer("cuda", rank, 3))
        assert [row for batch in batches for row in batch] == rows[rank::3]


def test_auto_warns_when_one_prompt_needs_more_than_the_budget(auto_data, free_memory, caplog):
    free_memory(100 * 2**20)
    with caplog.at_level(logging.INFO, logger="capyft.datamodule"):
        batches = loader_rows(auto_data, StandInTrainer("cuda"))
    assert [len(batch) for batch in batches] == [1] * 12
    assert "the longest prompt (997 tokens + 100 new) needs about" in caplog.text
    assert "more than the 0.08 GiB budget of free GPU memory; it runs alone" in caplog.text


def test_predict_runs_every_planned_batch_without_a_warning(auto_data, free_memory):
    """Lightning's predict loop re-wraps the batch sampler to record indices: the plan must survive it, quietly."""

    class Rows(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return batch["row"]

    free_memory(int(2.5 * GiB))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto_data.trainer = StandInTrainer("cuda")
        loader = auto_data.test_dataloader()
        auto_data.trainer = None
        planned = [list(auto_data.splits["test"]["row"][i] for i in batch) for batch in loader.batch_sampler]
        predicted = trainer.predict(Rows(), dataloaders=loader)
    assert predicted == planned and len(planned) > 1
    assert not [w for w in caught if "batch sampler" in str(w.message)], [str(w.message) for w in caught]


def test_validation_with_auto_uses_the_training_micro_batch(smollm2_tokenizer):
    def val_sizes(**kwargs):
        data = make(smollm2_tokenizer, val_size=4, test_size=10, batch_size=4, **kwargs)
        data.setup("fit")
        return [len(batch["input_ids"]) for batch in data.val_dataloader()]

    assert val_sizes(eval_batch_size="auto") == [4]
    assert val_sizes(eval_batch_size=3) == [3, 1]  # a number: as before, never above the micro-batch
    assert val_sizes(eval_batch_size=16) == [4]


# ---- parsing and checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["big", 0, -1, True, 2.5])
def test_impossible_eval_batch_sizes(value):
    with pytest.raises(ConfigError) as raised:
        checks.check_data_values({"eval_batch_size": value})
    assert str(raised.value) == (
        f"data.eval_batch_size: {value!r} must be >= 1 conversation (or prompt) per batch, or auto (sized to the GPU "
        "memory)"
    )
    with pytest.raises(ValueError, match=r"data.eval_batch_size must be >= 1 prompt .* or auto; got"):
        ChatDataModule(tokenizer_name_or_path="unused", eval_batch_size=value)


def test_usable_eval_batch_sizes_pass():
    for value in ("auto", 1, 16):
        checks.check_data_values({"eval_batch_size": value})
        ChatDataModule(tokenizer_name_or_path="unused", eval_batch_size=value)


def printed_config(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *args, "--print_config"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_cli_reads_auto_and_numbers(capsys, tmp_path):
    assert "  eval_batch_size: auto\n" in printed_config(capsys, "--config", "configs/llama31-8b-capybara.yaml")
    out = printed_config(capsys, "--config", "configs/llama31-8b-capybara.yaml", "--data.eval_batch_size=16")
    assert "  eval_batch_size: 16\n" in out
    override = tmp_path / "auto.yaml"
    override.write_text("data:\n  eval_batch_size: auto\n", encoding="utf-8")
    out = printed_config(capsys, "--config", "configs/demo.yaml", "--config", str(override))
    assert "  eval_batch_size: auto\n" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "configs/demo.yaml", "--data.eval_batch_size=big"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and 'Parser key "data.eval_batch_size"' in err[0] and "Given value: big" in err[0], err


@pytest.mark.parametrize("value", ["auto", "16"])
def test_the_data_command_reads_auto_and_numbers(tiny_model, capsys, value):
    args = ["--config", "configs/demo.yaml", "--model.model_name_or_path", str(tiny_model)]
    assert preview.main([*args, "--data.eval_batch_size", value, "--examples", "0", "--color", "never"]) == 0
    assert "test" in capsys.readouterr().out
