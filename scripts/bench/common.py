"""Shared constants and helpers: the Llama-3.1-8B config, quantization settings, environment, subprocesses."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata as md
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# meta-llama/Llama-3.1-8B-Instruct config.json (the fields that shape compute and memory)
LLAMA31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
    "torch_dtype": "bfloat16",
}


def llama_config(tiny: bool = False) -> Any:
    """The Llama-3.1-8B config, or :func:`tiny_config` of it."""
    return tiny_config() if tiny else _config(LLAMA31_8B)


def tiny_config(vocab: int = 128256) -> Any:
    """The 8B config shrunk to 2 layers of hidden 64 (4-bit needs multiples of 64); same RoPE, vocab by default."""
    small = {**LLAMA31_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    small.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab)
    if vocab < 128256:
        small.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _config(small)


def _config(values: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig.from_dict(copy.deepcopy(values))


def bnb_config(compute_dtype: Any) -> Any:
    """nf4 + double quant with ``compute_dtype`` (the QLoRA paper's settings, as capyft's reference config)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def environment() -> dict[str, Any]:
    """Versions, GPU (from nvidia-smi) and date, for the report."""
    env: dict[str, Any] = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "lightning", "triton"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    env["cpu_count"] = os.cpu_count()
    return env


def run_logged(command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``command`` from the repository root with its output in ``log``, each line prefixed with the seconds
    since the start (where a whole command's time goes); returns exit status and wall time."""
    start = time.perf_counter()
    environ = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", **(env or {})}
    paths = [str(REPO), str(REPO / "scripts"), environ.get("PYTHONPATH")]  # scripts/: bench.profile's callback
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environ,
            text=True,
            errors="replace",
        )
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            for line in process.stdout:
                out.write(f"[{time.perf_counter() - start:7.1f}] {line}")
            status = process.wait()
        finally:
            timed_out = not watchdog.is_alive()
            watchdog.cancel()
    return {
        "status": "timeout" if timed_out else status,
        "wall_s": round(time.perf_counter() - start, 2),
        "log": str(log),
    }


def python() -> str:
    return sys.executable
