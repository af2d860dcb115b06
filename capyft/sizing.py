"""How much fits in GPU memory: training micro-batches (``data.batch_size: auto``) and generation batches
(``data.eval_batch_size: auto``), from a model's config and the memory left once it is loaded. Plain PyTorch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from capyft.generation import PREFILL_TOKENS

log = logging.getLogger(__name__)

# Most prompts per generation batch with ``eval_batch_size: auto``: a bound on the KV cache one batch holds (and on
# the risk of running out) that still takes the reference case's 200 test prompts in one batch, which Llama-3.1-8B
# 4-bit decodes at ~52 ms a step on an H200 with CUDA-graph steps (a lab figure, 2026-11-29).
MAX_GENERATION_ROWS = 256
# Share of the GPU memory left after the model loads that ``auto``'s generation batches may plan to use; the rest
# covers what the estimate leaves out: a 4-bit layer's weight dequantized for its matmul, and the caching
# allocator's fragmentation.
GENERATION_HEADROOM = 0.8


def micro_batch_split(step_size: int, max_length: int, token_budget: int | None) -> tuple[int, int]:
    """Conversations per micro-batch and micro-batches per step for a step of ``step_size`` conversations.

    The micro-batch is the largest divisor of ``step_size`` whose worst case (every conversation ``max_length``
    tokens) fits ``token_budget``; at least 1. A divisor keeps every step exactly ``step_size`` conversations.
    """
    if step_size < 1:
        raise ValueError(f"data.step_size must be >= 1, got {step_size}")
    if token_budget is None:
        return step_size, 1
    fits = [d for d in range(1, step_size + 1) if step_size % d == 0 and d * max_length <= token_budget]
    batch = max(fits, default=1)
    return batch, step_size // batch


# Most GPU memory, in GiB, that a capyft process may use on its device: a GPU shared with other work, or a larger GPU
# standing in for a smaller one. Unset: all of it.
GPU_MEMORY_ENV = "CAPYFT_GPU_MEMORY_GIB"


def gpu_memory_cap() -> int | None:
    """Bytes of GPU memory this process may use (``CAPYFT_GPU_MEMORY_GIB``), or None when unset.

    Raises:
        ValueError: the value is not a positive number of GiB; the message names the variable.
    """
    value = os.environ.get(GPU_MEMORY_ENV, "").strip()
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        raise ValueError(
            f"{GPU_MEMORY_ENV}={value!r}: give the GiB this process may use on its GPU, e.g. 7.5, or unset it"
        )
    return int(gib * 2**30)


def cap_gpu_memory(device: torch.device) -> None:
    """Holds this process to ``CAPYFT_GPU_MEMORY_GIB`` on ``device``: PyTorch's caching allocator refuses to reserve
    more (an out-of-memory error past it, as on a GPU of that size), and :func:`usable_gpu_memory` counts no more.
    The CUDA context (a few hundred MiB) is outside the cap. Nothing to do when unset or off CUDA."""
    cap = gpu_memory_cap()
    if cap is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    log.info("%s: this process uses at most %.2f GiB of the GPU's %.2f GiB", GPU_MEMORY_ENV, cap / 2**30, total / 2**30)


def usable_gpu_memory(device: torch.device) -> int:
    """Bytes this process can still use on ``device``: free on the GPU plus what its caching allocator holds unused,
    and no more than ``CAPYFT_GPU_MEMORY_GIB`` less what it has allocated."""
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    usable = free + torch.cuda.memory_reserved(device) - allocated
    cap = gpu_memory_cap()
    return max(0, min(usable, cap - allocated)) if cap is not None else usable


def activation_bytes_per_token(
    config: Any, checkpointing: bool, adapter_bytes: int = 3, width: int = 2, norms: int = 2, in_flight: bool = True
) -> int:
    """Bytes of training activations a token of a micro-batch holds at the peak of its backward pass (with
    ``in_flight`` False: what the layers keep for backward, without the gradients in flight).

    With gradient checkpointing: each layer's saved input (``hidden x layers``) plus one layer's recomputed
    activations (about 12 x ``intermediate``), in 16 bits; for Llama-3.1-8B 0.58 MiB a token, the slope measured on an
    H200 (+1.18 GiB peak from 2048 to 4096 tokens).

    Without it, every layer keeps what its backward needs (counted per layer, ``w`` the compute dtype's bytes):
    each of its ``norms`` norms' float32 copy of its input (``4 x hidden``; Llama has 2 norms a layer, Gemma-3 6); the
    inputs of the attention, output, gate/up and down projections (``w`` each); what each of the 7 adapters keeps of
    its own input, ``adapter_bytes`` per value (QLoRA under autocast with LoRA dropout: the dropped-out copy in the
    compute dtype and a one-byte mask, ``w + 1``; without dropout it shares the projection's input, 0; peft casts a
    plain LoRA adapter's input to float32 first); attention's query and output plus key and value
    (``w x (2 x hidden + 2 x kv_dim)``); the gated MLP's gate, its activation and the up projection
    (``3 x w x intermediate``). Plus one layer's gradients in flight (as above).
    For Llama-3.1-8B, 4-bit with dropout, 16 bits: 9.8 MiB a token, 17x the checkpointed cost. The count follows
    transformers' Llama layer with peft's LoRA and attention that keeps no probabilities (SDPA's flash and
    memory-efficient kernels, varlen flash); Liger's kernels and fused projections (Phi-3) keep less.
    ``tests/test_training.py`` and ``tests/test_families.py`` check it against the tensors autograd saves.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    flight = width * 12 * intermediate if in_flight else 0
    if checkpointing:
        return width * hidden * layers + flight
    heads = text.num_attention_heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * (
        getattr(text, "head_dim", None) or hidden // heads
    )
    per_layer = (
        norms * 4 * hidden  # each norm's float32 copy of its input
        + 3 * width * hidden  # inputs of q/k/v (one tensor), o and gate/up (one tensor) projections
        + width * intermediate  # the down projection's input
        + adapter_bytes * (6 * hidden + intermediate)  # adapters of q, k, v, o, gate, up (hidden wide) and down
        + width * (2 * hidden + 2 * kv_dim)  # attention's query and output, key and value
        + 3 * width * intermediate  # gate output, its SiLU, up output
    )
    return layers * per_layer + flight


def norms_per_layer(model: Any) -> int:
    """Normalization modules in ``model``'s first decoder layer (RMSNorm or LayerNorm, Liger's included); 2 when the
    model has no ``layers`` list to look into."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None) if hasattr(base, "get_decoder") else None
    if not layers:
        return 2
    return sum("norm" in type(module).__name__.lower() for module in layers[0].modules())


# Config keys of mixture-of-experts models: their routed layers keep more than a dense layer, which
# activation_bytes_per_token counts
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def adapter_input_bytes(load_in_4bit: bool, lora_dropout: float, width: int, cuda: bool = True) -> int:
    """Bytes per input value that a LoRA adapter keeps for backward besides its layer's input
    (:func:`activation_bytes_per_token`'s ``adapter_bytes``). On bitsandbytes' 4-bit layers under CUDA autocast peft
    feeds the adapter the input as it is: with dropout a dropped-out copy in the compute dtype plus the mask (one
    byte on CUDA), without it nothing. Elsewhere (plain layers, or 4-bit ones under CPU autocast, which peft does not
    recognize as autocast) peft first casts the input to float32 (4 bytes), and dropout adds its mask, counted at 4
    bytes, as CPU dropout keeps it."""
    if load_in_4bit and cuda:
        return width + 1 if lora_dropout > 0 else 0
    return 4 + (4 if lora_dropout > 0 else 0)


def usable_cpu_memory() -> int | None:
    """Bytes of host memory available to a new allocation (Linux's ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def token_budget_from_memory(config: Any, device: torch.device, headroom: float = 0.8) -> int:
    """Tokens a training micro-batch can hold in the GPU memory still free (the model already loaded), with gradient
    checkpointing (:func:`activation_bytes_per_token`): ``batch_size: auto`` splits a step by this budget first,
    then ``gradient_checkpointing: auto`` sees whether the chosen micro-batch fits without recomputation."""
    return int(headroom * usable_gpu_memory(device) / activation_bytes_per_token(config, checkpointing=True))


# Share of the free memory (GPU, or host memory on CPU) that activations kept without gradient checkpointing may
# plan to use (``gradient_checkpointing: auto``); the rest covers the optimizer's state, the allocator's
# fragmentation and what the estimate leaves out.
CHECKPOINTING_HEADROOM = 0.8


def checkpointing_needed(
    config: Any, tokens: int, usable_bytes: int, adapter_bytes: int = 3, width: int = 2, norms: int = 2
) -> str | None:
    """Why a micro-batch of up to ``tokens`` tokens needs gradient checkpointing with ``usable_bytes`` of memory free
    on its device (the model loaded), or None when its activations fit without it (:func:`activation_bytes_per_token`,
    within :data:`CHECKPOINTING_HEADROOM` of the free memory)."""
    needed = tokens * activation_bytes_per_token(config, False, adapter_bytes, width, norms)
    budget = CHECKPOINTING_HEADROOM * usable_bytes
    if needed <= budget:
        return None
    return (
        f"a micro-batch of up to {tokens} tokens would keep about {needed / 2**30:.1f} GiB of activations without it, "
        f"more than {budget / 2**30:.1f} GiB ({CHECKPOINTING_HEADROOM:.0%} of the free memory)"
    )


@dataclass(frozen=True)
class GenerationMemory:
    """GPU memory that generating answers for a batch of left-padded prompts needs besides the model's weights.

    See :meth:`batch_bytes` for how the parts add up and :meth:`from_config` for each part's estimate.

    Args:
        kv_per_token: bytes of KV cache per token of a row.
        activations_per_token: bytes of the prefill's transient activations per prompt token of a row.
        logits_per_row: bytes of the last position's logits per row.
        mask_per_pair: bytes of the prefill's attention mask per (query, key) pair of a row.
    """

    kv_per_token: int
    activations_per_token: int
    logits_per_row: int
    mask_per_pair: int = 0

    @classmethod
    def from_config(cls, config: Any) -> GenerationMemory:
        """The estimate for a model with this (transformers) config, in its compute dtype (``config.dtype``;
        float32 when absent, the widest a model computes in). For Llama-3.1-8B in 16 bits: 128 KiB of KV cache and
        144 KiB of prefill activations a token, 0.73 MiB of logits a row.

        - KV cache: K and V of every layer, ``2 x num_hidden_layers x num_key_value_heads x head_dim`` values
          (``head_dim`` defaults to ``hidden_size // num_attention_heads``; sliding-window layers are counted as
          full ones, an overestimate).
        - Prefill activations: under no_grad only one decoder layer's transients exist at a time. Their peak is in
          the MLP: the gate projection's output, and the up projection's output while its LoRA update is added
          (base output, scaled adapter output, their sum), ``4 x intermediate_size``; plus the residual stream, its
          normalized copy and attention's query and output around it, ``4 x hidden_size`` (``intermediate_size``
          defaults to ``4 x hidden_size``).
        - Logits: generation keeps only the last position's logits during the prefill, in the compute dtype and the
          float32 copy it picks the next token from: ``vocab_size x (dtype bytes + 4)``.
        - Attention mask: the prefill's boolean ``(rows, 1, prompt, prompt)`` mask plus, within each layer, the
          additive bias SDPA's memory-efficient kernel makes of it in the compute dtype, padded for alignment:
          ``1 + 2 x dtype bytes`` per (query, key) pair, quadratic in the prompt (20 MiB a row at 2k tokens in 16 bits).

        Raises:
            ValueError: the config lacks a size the estimate needs; the message says to give a number instead.
        """
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        dtype = getattr(config, "dtype", None) or getattr(text, "dtype", None)
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        width = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
        sizes = {}
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            sizes[key] = getattr(text, key, None)
            if not isinstance(sizes[key], int):
                raise ValueError(
                    f"data.eval_batch_size auto cannot size generation batches for model type "
                    f"{getattr(text, 'model_type', '?')!r}: its config has no {key}; set data.eval_batch_size to a "
                    "number of prompts per batch"
                )
        hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
        return cls(
            kv_per_token=2 * sizes["num_hidden_layers"] * kv_heads * head_dim * width,
            activations_per_token=(4 * intermediate + 4 * hidden) * width,
            logits_per_row=sizes["vocab_size"] * (width + 4),
            mask_per_pair=1 + 2 * width,
        )

    def batch_bytes(self, rows: int, longest: int, max_new_tokens: int) -> int:
        """Bytes to answer ``rows`` prompts padded to ``longest`` tokens with up to ``max_new_tokens`` new ones: the
        KV cache of the padded prompt and the answer and the logits, per row, plus one prefill pass's activations and
        attention mask (:func:`capyft.generation.prefill` encodes the prompts in passes of at most
        ``PREFILL_TOKENS`` tokens, or one prompt). The prefill's transients and the full cache are counted
        together, an upper bound on the peak.
        """
        per_row = (longest + max_new_tokens) * self.kv_per_token + self.logits_per_row
        prefill_tokens = min(rows * longest, max(PREFILL_TOKENS, longest))
        prefill = prefill_tokens * (self.activations_per_token + longest * self.mask_per_pair)
        return rows * per_row + prefill


def generation_batches(
    lengths: Sequence[int],
    max_new_tokens: int,
    memory: GenerationMemory,
    budget_bytes: int,
    max_rows: int = MAX_GENERATION_ROWS,
) -> list[list[int]]:
    """Splits prompts, in their given order, into batches of consecutive prompts whose generation fits a budget.

    Greedy: a batch takes the next prompt while it holds fewer than ``max_rows`` and
    :meth:`GenerationMemory.batch_bytes` of the grown batch (padded to its longest prompt) stays within
    ``budget_bytes``. A prompt that needs more than the budget alone still gets a batch of its own. With the prompts
    longest first, as the prompt loader orders them, the batches grow as the prompts shorten.

    Args:
        lengths: each prompt's token count, in the order to generate them.
        max_new_tokens: most tokens generated per answer.
        memory: the model's per-token and per-row costs.
        budget_bytes: GPU memory one batch may use.
        max_rows: most prompts per batch.

    Returns:
        Each batch's positions in ``lengths``: every position once, in order.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for position, length in enumerate(lengths):
        grown = max(longest, length)
        if batch and (
            len(batch) >= max_rows or memory.batch_bytes(len(batch) + 1, grown, max_new_tokens) > budget_bytes
        ):
            batches.append(batch)
            batch, grown = [], length
        batch.append(position)
        longest = grown
    if batch:
        batches.append(batch)
    return batches
