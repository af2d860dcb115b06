"""Checks that turn a run that would fail late (after minutes of model loading) into a one-line error up front.

Pure functions over a config's values; no Lightning. :mod:`capyft.cli` calls them before any model loads, and
``python -m capyft`` reports a :class:`ConfigError` as one line naming the key and the fix (exit status 2).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Precisions that need a CUDA GPU; on CPU, capyft runs bf16-mixed instead (Lightning 2.6 on CPU turns 16-mixed into
# bf16-mixed with a warning, and 16-true gives a NaN loss).
GPU_ONLY_PRECISION = {"16-mixed", "16", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16"}
BF16_PRECISION = {"bf16-mixed", "bf16-true", "bf16"}
# A hub id: "name" or "org/name". Anything else (two slashes, ./, /, ~) is a local path and must exist.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Files from which transformers can build a tokenizer (fast, SentencePiece, byte-level BPE, WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


class ConfigError(ValueError):
    """A setting, path or file that cannot work; the message names the key and the fix."""


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name``)."""
    return (
        name.startswith((".", "/", "~", "\\"))
        or not _HUB_ID.match(name)
        or (bool(suffixes) and name.lower().endswith(suffixes))
    )


def check_model_path(name: str, key: str = "model.model_name_or_path") -> None:
    """Fails early on a model that cannot be loaded: a missing local folder, or a hub id that offline mode forbids.

    Raises:
        ConfigError: naming ``key`` and the fix.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {name} has no config.json; give the folder of a Hugging Face model")
        check_tokenizer_files(path, key)
        return
    if path.exists():
        raise ConfigError(f"{key}: {name} is a file; give a Hugging Face model folder (with config.json) or hub id")
    if looks_local(name, (".gguf", ".safetensors", ".bin")):
        raise ConfigError(f"{key}: {name} does not exist; give an existing model folder or a hub id (org/name)")
    if _hub_offline() and not _in_hub_cache(name):
        raise ConfigError(
            f"{key}: {name} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE forbids "
            "downloading it; give a local folder or unset HF_HUB_OFFLINE"
        )


def check_tokenizer_files(folder: str | Path, key: str = "model.model_name_or_path") -> None:
    """Fails on a local model folder that holds no tokenizer files.

    Without them transformers 5 answers with advice to install sentencepiece or tiktoken, which is not the problem.

    Raises:
        ConfigError: naming the folder and the files expected.
    """
    folder = Path(folder).expanduser()
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise ConfigError(
        f"{key}: {folder} has no tokenizer files (expected tokenizer.json, or tokenizer.model / spiece.model for "
        "SentencePiece, or vocab.json + merges.txt, with tokenizer_config.json); copy them from the base model's "
        "folder or hub repo"
    )


def check_data_source(source: str, key: str = "data.source") -> None:
    """Fails early on a data source that is meant as a local file or folder but does not exist, or is empty."""
    path = Path(source).expanduser()
    if path.is_file() and path.stat().st_size < 4096 and not path.read_bytes().strip():
        raise ConfigError(f"{key}: {source} is empty; it needs at least one conversation")
    if looks_local(source, _DATA_SUFFIXES) and not path.exists():
        raise ConfigError(
            f"{key}: {source} does not exist; give an existing .jsonl/.json/.parquet file or folder, "
            "or a hub id (org/name)"
        )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_precision(precision: str, compute_dtype: str, gpu_capability: tuple[int, int] | None) -> str:
    """The precision a run can use on this device.

    Args:
        precision: ``trainer.precision`` as configured.
        compute_dtype: ``model.compute_dtype``.
        gpu_capability: the CUDA compute capability, or None when training on CPU.

    Returns:
        ``precision``, or ``bf16-mixed`` for a GPU-only precision on CPU (the caller logs the change).

    Raises:
        ConfigError: bfloat16 asked for on a GPU older than Ampere (compute capability 8.0), which lacks it.
    """
    precision = str(precision)
    if gpu_capability is None:
        return "bf16-mixed" if precision in GPU_ONLY_PRECISION else precision
    if gpu_capability >= (8, 0):
        return precision
    capability = ".".join(map(str, gpu_capability))
    if precision in BF16_PRECISION:
        raise ConfigError(
            f"trainer.precision: {precision} needs bfloat16, which this GPU (compute capability {capability}) lacks; "
            "use --trainer.precision 16-mixed (fp16 with loss scaling)"
        )
    if compute_dtype == "bfloat16":
        raise ConfigError(
            f"model.compute_dtype: bfloat16 is not supported by this GPU (compute capability {capability}); "
            "use --model.compute_dtype float16"
        )
    return precision


def check_compile(setting: Any, on_gpu: bool, key: str = "model.compile_layers") -> None:
    """Fails before the model loads when ``compile_layers: true`` cannot compile on this machine (it would fail at
    the first training step). ``auto`` needs no check: it compiles only where it can.

    Raises:
        ConfigError: naming what is missing and the settings that run without it.
    """
    if setting is not True:
        return
    from capyft.levers import compile_toolchain_missing

    missing = compile_toolchain_missing("cuda" if on_gpu else "cpu")
    if missing:
        raise ConfigError(
            f"{key}: true compiles the decoder layers with torch.compile, which needs {missing} here; install it, "
            "or set --model.compile_layers auto (compiles only where it can) or false"
        )


def min_max_length(tokenizer: Any, system_prompt: str | None = None) -> int:
    """The shortest ``max_length`` that keeps one answer token: the chat header of a one-word user turn, plus one."""
    from capyft.chat import encode_prompt

    return len(encode_prompt([{"role": "user", "content": "Hi"}], tokenizer, system_prompt)) + 1


def check_max_length(max_length: int | None, tokenizer: Any, system_prompt: str | None = None) -> None:
    """Fails when ``data.max_length`` cannot hold even the chat header of the shortest conversation and one answer
    token: every row would be cut to nothing trainable.
    """
    if max_length is None:
        return
    need = min_max_length(tokenizer, system_prompt)
    if max_length < need:
        raise ConfigError(
            f"data.max_length: {max_length} tokens cannot hold a conversation: the chat template's header for a "
            f"one-word user turn is already {need - 1} tokens (system prompt included); raise data.max_length "
            f"well above {need} (typical: 1024-4096)"
        )


def oom_advice(values: dict[str, Any]) -> str:
    """What to lower after a CUDA out-of-memory error, with the run's current values (``key -> value``)."""
    now = ", ".join(f"{key} {value}" for key, value in values.items())
    return (
        f"CUDA out of memory ({now}). Lower data.max_length or data.batch_size (raise "
        "trainer.accumulate_grad_batches to keep the step size), turn on model.gradient_checkpointing and "
        "data.padding_free, lower model.loss_chunk_size, or use a smaller model"
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _need(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} {fix}")


def check_gpu_memory_cap() -> None:
    """Fails on a ``CAPYFT_GPU_MEMORY_GIB`` that is not a positive number of GiB, before the model loads."""
    from capyft.sizing import gpu_memory_cap

    try:
        gpu_memory_cap()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_model_values(model: Mapping[str, Any], prefix: str = "model") -> None:
    """Fails on ``model.*`` values no run can use, before the model loads (a negative learning rate otherwise ends
    in a torch traceback at the first optimizer step, a LoRA rank of 0 after the base model loaded).

    Args:
        model: the ``model`` section of a config (``QLoRAModule``'s arguments); missing keys are not checked.
        prefix: the section's name in messages.

    Raises:
        ConfigError: naming the key and the fix.
    """
    get = model.get
    rules = [
        (
            "learning_rate",
            lambda v: _number(v) and v > 0,
            "is not a usable learning rate; give a positive number (QLoRA used 2e-4)",
        ),
        ("weight_decay", lambda v: _number(v) and v >= 0, "must be a number >= 0 (0 is the default)"),
        ("warmup_steps", lambda v: isinstance(v, int) and v >= 0, "must be a whole number of steps >= 0"),
        ("lora_r", lambda v: isinstance(v, int) and v >= 1, "must be a LoRA rank >= 1 (typical: 8-64)"),
        (
            "lora_alpha",
            lambda v: _number(v) and v > 0,
            "must be > 0 (the adapter's scale is alpha / r; typical: 2 x lora_r)",
        ),
        ("lora_dropout", lambda v: _number(v) and 0 <= v < 1, "must be in [0, 1) (typical: 0.05)"),
        ("loss_chunk_size", lambda v: isinstance(v, int) and v >= 0, "must be >= 0 tokens (0: no chunking)"),
    ]
    for name, ok, fix in rules:
        if get(name) is not None:
            _need(ok(get(name)), f"{prefix}.{name}", get(name), fix)
    generation = get("generation")
    if isinstance(generation, Mapping):
        check_generation_values(generation, f"{prefix}.generation")
    elif generation is not None and hasattr(generation, "__dataclass_fields__"):
        check_generation_values(vars(generation), f"{prefix}.generation")


def check_generation_values(settings: Mapping[str, Any], prefix: str = "model.generation") -> None:
    """Fails on generation settings that cannot work (``GenerationSettings``' fields)."""
    get = settings.get
    rules = [
        ("max_new_tokens", lambda v: isinstance(v, int) and v >= 1, "must be >= 1 token"),
        ("temperature", lambda v: _number(v) and v > 0, "must be > 0 (used when sampling; do_sample false is greedy)"),
        ("top_p", lambda v: _number(v) and 0 < v <= 1, "must be in (0, 1]"),
        ("top_k", lambda v: isinstance(v, int) and v >= 0, "must be >= 0 (0 keeps every token)"),
        ("repetition_penalty", lambda v: _number(v) and v > 0, "must be > 0 (1.0 is none)"),
    ]
    for name, ok, fix in rules:
        if get(name) is not None:
            _need(ok(get(name)), f"{prefix}.{name}", get(name), fix)


def check_data_values(data: Mapping[str, Any], prefix: str = "data") -> None:
    """Fails on ``data.*`` sizes no run can use, before the model loads (``batch_size 0`` otherwise fails only when
    the first batch is drawn).

    A ``batch_size`` that is not a number (e.g. ``auto``) is left to whatever resolves it; ``eval_batch_size`` may
    be a number or ``auto`` (generation batches sized to the GPU memory), nothing else.

    Raises:
        ConfigError: naming the key and the fix.
    """
    get = data.get

    def whole(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    for name, low, fix in [
        (
            "batch_size",
            1,
            "must be >= 1 conversation per micro-batch (raise trainer.accumulate_grad_batches for larger steps)",
        ),
        ("eval_batch_size", 1, "must be >= 1 conversation (or prompt) per batch, or auto (sized to the GPU memory)"),
        ("max_length", 1, "must be a positive number of tokens, or null for no cut (typical: 1024-4096)"),
        ("train_size", 0, "must be >= 0 conversations, or null for all rows not carved off"),
        ("val_size", 0, "must be >= 0 conversations"),
        ("test_size", 0, "must be >= 0 conversations"),
        ("pad_to_multiple_of", 1, "must be >= 1, or null"),
        ("num_workers", 0, "must be >= 0 processes"),
    ]:
        value = get(name)
        if (
            value is None
            or (name == "batch_size" and isinstance(value, str))
            or (name, value) == ("eval_batch_size", "auto")
        ):
            continue
        _need(whole(value, low), f"{prefix}.{name}", value, fix)


def check_jsonl(path: str | Path, key: str = "data.source") -> int:
    """Reads a ``.jsonl`` file line by line and fails on the first line that is not one JSON object.

    ``datasets`` reports such a line as a 100-line ``DatasetGenerationError`` without its number.

    Returns:
        The number of rows (non-blank lines).

    Raises:
        ConfigError: naming the file, the line number and the fix.
    """
    rows = 0
    NUL = b"\x00"  # noqa: N806
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            where = f"{key}: {path} line {number}"
            if NUL in line:
                raise ConfigError(
                    f"{where} holds a raw NUL byte (column {line.index(NUL) + 1}): the file is damaged or not "
                    "text; remove the byte or write the file again"
                )
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip(b"\r\n"))  # a cut line ends in its newline: report the cut, not it
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where} is not UTF-8 text ({err.reason}); save the file as UTF-8") from err
            except json.JSONDecodeError as err:
                at = "" if err.msg.endswith(" at") else " at"  # "Unterminated string starting at"
                raise ConfigError(
                    f"{where} is not valid JSON ({err.msg}{at} column {err.colno}); fix or delete that line (each "
                    "line of a .jsonl file holds one JSON object)"
                ) from err
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{where} holds a JSON {type(row).__name__}, not an object; each line must be one conversation "
                    'such as {"messages": [{"role": "user", "content": "..."}, ...]}'
                )
            rows += 1
    return rows


def check_writable(path: str | Path, key: str) -> None:
    """Fails when ``path`` (a file or folder, existing or to be created) cannot be written, before any work is done
    whose result would go there.

    Creates nothing: the nearest existing folder is probed with a temporary file (``os.access`` alone says yes to
    root on a read-only mount).

    Raises:
        ConfigError: naming ``key``, the path and the fix.
    """
    path = Path(path).expanduser()
    fix = "choose a writable location or make it writable"
    if path.is_file():
        try:
            with path.open("ab"):  # opening for append changes neither content nor modification time
                pass
        except OSError as err:
            raise ConfigError(f"{key}: cannot write {path} ({err.strerror}); {fix}") from err
        return
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}: cannot create {path}: {folder} is a file, not a folder; {fix}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        where = "" if folder == path else f" (its nearest existing folder {folder})"
        raise ConfigError(f"{key}: cannot write to {path}{where}: {err.strerror}; {fix}") from err


def run_output_dirs(trainer: Mapping[str, Any], checkpoint: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """The folders a run writes to, as ``(key, path)``: checkpoint ``dirpath`` and each logger's ``save_dir`` (or
    ``trainer.default_root_dir`` when a logger has none).
    """
    found = []
    if checkpoint and checkpoint.get("dirpath"):
        found.append(("checkpoint.dirpath", str(checkpoint["dirpath"])))
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for logger in loggers:
        if isinstance(logger, Mapping):
            save_dir = (logger.get("init_args") or {}).get("save_dir")
            if save_dir:
                found.append(("trainer.logger.init_args.save_dir", str(save_dir)))
                continue
        if logger is not False and logger is not None:
            found.append(("trainer.default_root_dir", str(trainer.get("default_root_dir") or ".")))
    return found


def check_run_outputs(trainer: Mapping[str, Any], checkpoint: Mapping[str, Any] | None = None) -> None:
    """Fails before the model loads when a run dir or checkpoint folder is not writable (otherwise the first save
    fails, after training ran).

    Args:
        trainer: the ``trainer`` section of the parsed config, as a dict.
        checkpoint: the ``checkpoint`` section (``ModelCheckpoint``'s arguments), as a dict.
    """
    for key, path in run_output_dirs(trainer, checkpoint):
        check_writable(path, key)
