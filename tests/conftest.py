"""Shared fixtures: the offline environment, real tokenizers built offline by :mod:`capyft.assets`, the 16 real
Capybara rows, the tiny random Llama and the toy data sets it learns."""

import os

# Nothing may reach for the hub. Set here only, before transformers / datasets are imported by any test module, and
# assigned rather than defaulted: subprocesses inherit this environment (helpers.offline_env).
os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})

import json

import pytest

from capyft import assets
from capyft.data import SAMPLE_DATA

# the words of the two color data sets below
COLORS = ["red", "green", "blue", "amber", "violet", "black", "white", "olive", "teal", "pink", "gold", "gray"]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: ChatML template with a default system prompt, eos = pad = ``<|im_end|>``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.smollm2_dir())


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The real Llama-3 tokenizer with capyft's Llama-3.1-style template: eos ``<|eot_id|>``, pad 128004."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.llama3_tokenizer_dir())


@pytest.fixture(scope="session")
def sample_rows():
    """The 16 real Capybara rows in trl's ``messages`` schema (shared: copy before changing them)."""
    with open(SAMPLE_DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer and chat template (4-bit needs multiples of 64).

    Shared by every test: load it, never write into its folder (copy it first, as ``shutil.copytree``)."""
    from capyft.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", assets.smollm2_dir())


@pytest.fixture(scope="session")
def color_words(tmp_path_factory):
    """12 one-turn conversations, "Say red" -> "red": a set a tiny model learns in a few steps (a ``.jsonl``)."""
    from helpers import one_turn, write_jsonl  # imported here: helpers imports Lightning (~3 s), conftest stays light

    path = tmp_path_factory.mktemp("colors") / "colors.jsonl"
    return write_jsonl(path, [one_turn(f"Say {w}", w) for w in COLORS])


@pytest.fixture(scope="session")
def uneven_colors(tmp_path_factory):
    """12 conversations of uneven lengths, "Say red please please" -> "red red red": the answer is a fixed function
    of the question (learnable), and rows hold different token counts (so do the two ranks of a DDP step)."""
    from helpers import one_turn, write_jsonl

    rows = [one_turn(f"Say {w}" + " please" * (i % 4), " ".join([w] * (1 + i % 5))) for i, w in enumerate(COLORS)]
    return write_jsonl(tmp_path_factory.mktemp("uneven_colors") / "uneven_colors.jsonl", rows)


@pytest.fixture
def no_model_load(monkeypatch):
    """Config errors must stop the run before the (in real life, minutes-long) model load."""
    from capyft.model import QLoRAModule

    def configure_model(self):
        pytest.fail("the model was loaded before the config error was reported")

    monkeypatch.setattr(QLoRAModule, "configure_model", configure_model)
