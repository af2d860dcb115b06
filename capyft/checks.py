"""Checks that turn a run that would fail late (after minutes of model loading) into a one-line error up front.

Pure functions over a config's values; no Lightning. :mod:`capyft.cli` calls them before any model loads, and
``python -m capyft`` reports a :class:`ConfigError` as one line naming the key and the fix (exit status 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# Precisions that need a CUDA GPU; on CPU, capyft runs bf16-mixed instead (16-true gives NaN there, see FACTS).
GPU_ONLY_PRECISION = {"16-mixed", "16", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16"}
BF16_PRECISION = {"bf16-mixed", "bf16-true", "bf16"}
# A hub id: "name" or "org/name". Anything else (two slashes, ./, /, ~) is a local path and must exist.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


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
