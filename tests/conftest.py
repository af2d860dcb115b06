"""Shared fixtures: real tokenizers built offline by :mod:`capyft.assets`, and the 16 real Capybara rows."""

import os

# Nothing may reach for the hub; set before transformers / datasets are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import pytest

from capyft import assets
from capyft.data import SAMPLE_DATA


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
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer and chat template (4-bit needs multiples of 64)."""
    from capyft.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", assets.smollm2_dir())


@pytest.fixture(scope="session")
def color_words(tmp_path_factory):
    """12 one-turn conversations, "Say red" -> "red": a set a tiny model learns in a few steps (a ``.jsonl``)."""
    words = ["red", "green", "blue", "amber", "violet", "black", "white", "olive", "teal", "pink", "gold", "gray"]
    path = tmp_path_factory.mktemp("colors") / "colors.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]} for w in words]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
