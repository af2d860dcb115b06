"""The plain pieces of a training run that ``QLoRAModule`` calls: RNG state as plain values, the learning-rate
schedule, the optimizer, and a one-line description of an adapter. No Lightning.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (torch, CUDA, numpy, python), as tensors and plain values only, so a
    checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }


def restore_rng_state(states: dict[str, Any]) -> None:
    """Puts back what :func:`rng_state` saved, so a resumed run draws the same dropout masks."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(_numpy_from_plain(states["numpy"]))
    random.setstate(states["python"])


def build_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float) -> Any:
    """AdamW from torch, or bitsandbytes' paged 8-bit AdamW (``paged_adamw_8bit``: state paged to CPU under memory
    pressure, as the QLoRA paper ran)."""
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def adapter_mismatch(own: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> str | None:
    """Both sides, described, when a checkpoint's adapter (``theirs``: name -> shape) is not this model's (``own``)."""
    if own == theirs:
        return None
    sides = f"checkpoint adapter: {describe_adapter(theirs)}; this model: {describe_adapter(own)}"
    if describe_adapter(theirs) == describe_adapter(own):
        first = min(set(own.items()) ^ set(theirs.items()))
        sides += f"; first difference: {first[0]} {list(first[1])}"
    return sides


def describe_adapter(shapes: dict[str, tuple[int, ...]]) -> str:
    """``q_proj,v_proj r=8, 2 layers, 8 tensors`` for a LoRA state dict's ``{name: shape}`` (PEFT's names).

    Args:
        shapes: parameter names as ``QLoRAModule`` holds them (``...layers.0.self_attn.q_proj.lora_A.default.weight``)
            and their shapes.
    """
    if not shapes:
        return "no adapter weights"
    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in shapes if ".lora_" in name})
    ranks = sorted({shape[0] for name, shape in shapes.items() if ".lora_A." in name})
    layers = {name.split(".layers.")[1].split(".")[0] for name in shapes if ".layers." in name}
    dora = " DoRA" if any("lora_magnitude_vector" in name for name in shapes) else ""
    rank = "r=" + "/".join(map(str, ranks)) if ranks else "no rank"
    return f"{','.join(targets) or 'no LoRA layer'} {rank}{dora}, {len(layers)} layers, {len(shapes)} tensors"


def _numpy_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_from_plain(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached"]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Any:
    """Learning-rate multiplier per optimizer step: linear warmup, then cosine / linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr_schedule must be cosine, linear or constant, got {schedule!r}")
    return factor


def reduce_step_metrics(
    strategy: Any, loss: float, tokens: int, elapsed: float, grad_norm: torch.Tensor
) -> tuple[float, float, float]:
    """The optimizer step's loss, tokens/s and gradient norm over all ranks, with one small collective.

    Each rank holds its share of the global token-mean (its loss sum over the step's tokens on all ranks), so the sum
    over ranks is the exact global token-mean loss; throughputs add up too. DDP gradients are already averaged, so
    every rank holds the same norm; FSDP ranks hold disjoint shards, whose squared norms add up.

    Args:
        strategy: the Lightning strategy (its ``world_size``, ``reduce`` and ``root_device``).
    """
    if getattr(strategy, "world_size", 1) == 1:  # single-device strategies have no world_size
        return loss, tokens / elapsed, float(grad_norm)
    local = [loss, tokens / elapsed, float(grad_norm) ** 2]
    total = strategy.reduce(torch.tensor(local, dtype=torch.float64, device=strategy.root_device), reduce_op="sum")
    sharded = type(strategy).__name__ == "FSDPStrategy"
    return total[0].item(), total[1].item(), math.sqrt(total[2].item() if sharded else local[2])
