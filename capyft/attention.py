"""Attention for packed (padding-free) rows: the packed-batch contract and the two ways capyft computes it.

A *packed* micro-batch (``data.padding_free``) is one row of several conversations, with ``position_ids``
restarting at 0 at each conversation start and no ``attention_mask``. :class:`PackedRow` turns it into the keyword
arguments transformers' attention functions read (``cu_seq_lens_q`` ...) plus ``packed_bounds`` (python ints).

``sdpa_packed`` (the default) computes each conversation's causal attention, never across conversations: on a
CUDA GPU with flash attention (compute capability 8.0 or newer, 16-bit inputs, no sliding window) in one
variable-length flash call per layer (:func:`varlen_causal_attention`, PyTorch's own flash kernel); elsewhere one
causal SDPA call per conversation. ``sdpa_packed_loop`` always takes the per-conversation calls: the reference the
kernel is tested against, and a lever to measure.

Patches transformers' global ``AttentionInterface`` registry (transformers 5.x); calls PyTorch's private
``aten._flash_attention_forward`` / ``_backward`` (schema as in torch 2.11-2.13).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# SDPA that keeps packed (padding-free) rows' conversations apart without a dense (tokens x tokens) block-diagonal
# mask: one variable-length flash call where it runs, else one causal call per conversation; identical to "sdpa" for
# every other batch. The _loop variant always calls per conversation.
PACKED_SDPA = "sdpa_packed"
PACKED_SDPA_LOOP = "sdpa_packed_loop"
PACKED_ATTENTION = (PACKED_SDPA, PACKED_SDPA_LOOP)


def use_packed_attention(model: Any, name: str = PACKED_SDPA) -> None:
    """Switches a model loaded with ``sdpa`` to ``name``, one of :data:`PACKED_ATTENTION` (registered with
    transformers on first use).

    Raises:
        ConfigError: for a model whose attention the packed path would compute differently (see
            :func:`check_packed_sdpa`).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if name not in PACKED_ATTENTION:
        raise ValueError(f"packed attention is one of {', '.join(PACKED_ATTENTION)}, got {name!r}")
    if model.config._attn_implementation not in ("sdpa", *PACKED_ATTENTION):
        raise ValueError(
            f"attn_implementation {name} builds on sdpa, but the model runs {model.config._attn_implementation}"
        )
    check_packed_sdpa(model.config)
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionInterface.register(PACKED_SDPA_LOOP, functools.partial(packed_sdpa_attention, varlen=False))
    for registered in PACKED_ATTENTION:  # the mask stays sdpa's: correct for every batch; packed rows do not read it
        AttentionMaskInterface.register(registered, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = name


# Layer types (transformers' ``config.layer_types``) whose attention is causal SDPA, over a sliding window or not:
# what packed_sdpa_attention computes. Chunked (Llama-4), sparse and recurrent layers live in masks or states
# that a packed row does not pass to it.
PACKED_SDPA_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_packed_sdpa(config: Any) -> None:
    """Refuses a model whose attention :data:`PACKED_ATTENTION` cannot compute exactly, before it loads if called on
    the ``AutoConfig``.

    :func:`packed_sdpa_attention` computes causal attention, over a sliding window where the layer passes one
    (Mistral, Phi-3, Gemma-2/3); it cannot cap attention logits (Gemma-2's ``attn_logit_softcapping``: transformers'
    own ``sdpa`` refuses Gemma-2 too) nor apply patterns that only a layer type names (chunked attention).

    Raises:
        ConfigError: naming the feature and the attention implementation to use instead.
    """
    from capyft.checks import ConfigError

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", type(text).__name__)
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ConfigError(
            f"model.attn_implementation {PACKED_SDPA}: {model_type} caps its attention logits "
            f"(attn_logit_softcapping {softcap}), which SDPA cannot compute; use --model.attn_implementation eager"
        )
    other = sorted(set(getattr(text, "layer_types", None) or ()) - set(PACKED_SDPA_LAYER_TYPES))
    if other:
        raise ConfigError(
            f"model.attn_implementation {PACKED_SDPA}: {model_type} has {', '.join(other)} layers, and "
            f"{PACKED_SDPA} computes only {' and '.join(PACKED_SDPA_LAYER_TYPES)}; use --model.attn_implementation "
            "sdpa"
        )


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    *,
    varlen: bool = True,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for :data:`PACKED_ATTENTION`: causal attention per conversation of a packed row, else
    transformers' SDPA.

    A packed row arrives with ``cu_seq_lens_q`` and ``packed_bounds`` (see :class:`PackedRow`). SDPA with the dense
    block-diagonal mask cannot use the flash kernel and computes all ``tokens^2`` scores; capyft computes only the
    ``sum(length^2) / 2`` scores that matter (4 conversations of 1k tokens: 1/8 of the work): in one varlen flash
    call where :func:`varlen_usable` (and ``varlen``), else one causal SDPA call per conversation. A layer with a
    ``sliding_window`` (Mistral, Phi-3, Gemma-2/3 local layers) sees only the last ``sliding_window`` tokens, itself
    included, as transformers' masks say: a conversation longer than the window gets a banded causal mask
    (memory-efficient kernel, not flash).

    Raises:
        ConfigError: for attention-changing arguments it cannot compute (``softcap``, attention sinks ``s_aux``).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            from capyft.checks import ConfigError

            raise ConfigError(
                f"model.attn_implementation {PACKED_SDPA} cannot compute attention with {name} "
                f"({type(module).__name__}); use --model.attn_implementation eager"
            )
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    single_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]
    packed = cu_seq_lens is not None and single_row and getattr(module, "is_causal", True)
    if packed and varlen and sliding_window is None and dropout == 0.0 and varlen_usable(query, key, value):
        # (1, heads, tokens, dim) -> (tokens, heads, dim) views: no copy
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # Compiled, the longest conversation would be a python int that dynamo guards on (a recompile per new
        # value): the row's length bounds it, and the kernel reads each conversation's real length from cu_seq_lens.
        longest = kwargs.get("max_length_q") if not torch.compiler.is_compiling() else None
        longest = longest or q.shape[0]
        out, _ = torch.ops.capyft.varlen_causal_attention(q, k, v, cu_seq_lens, longest, scale)
        return out.unsqueeze(0), None
    with _without_cudnn_attention(query):
        if not packed and _one_query_grouped(module, query, key, attention_mask, dropout, sliding_window):
            return _grouped_decode_attention(query, key, value, attention_mask, scaling), None
        if not packed:
            if sliding_window is not None:
                kwargs["sliding_window"] = sliding_window  # passed on; transformers' sdpa takes it from the mask
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        bounds = kwargs.get("packed_bounds") or cu_seq_lens.tolist()  # python ints: no device sync per layer
        groups = getattr(module, "num_key_value_groups", 1)
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
            if sliding_window is None or end - start <= sliding_window:  # the window covers the conversation
                gqa = {"enable_gqa": True} if groups > 1 else {}
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, **gqa)
            else:
                # expand grouped heads: with a mask, enable_gqa sends CUDA SDPA to its math kernel (transformers
                # 5.24, use_gqa_in_sdpa)
                k, v = repeat_kv(k, groups), repeat_kv(v, groups)
                mask = _banded_causal_mask(end - start, sliding_window, query.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
            outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _one_query_grouped(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    sliding_window: int | None,
) -> bool:
    """Whether this is a decode step of grouped-query attention that :func:`_grouped_decode_attention` computes:
    one new token a row, more query than key heads, no dropout or window, and a mask (if any) of one row per batch
    row, ``(batch, 1, 1, keys)``, boolean or additive."""
    if query.shape[2] != 1 or query.shape[1] == key.shape[1] or query.shape[1] % key.shape[1]:
        return False
    if dropout or sliding_window is not None or not getattr(module, "is_causal", True):
        return False
    return attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1
    )


def _grouped_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """A decode step's attention with grouped-query heads, without expanding the KV cache.

    transformers' SDPA path copies each layer's keys and values once per query head that shares them
    (``repeat_kv``) whenever there is a padding mask: for Llama-3.1-8B's 4 query heads per key head that writes and
    reads four times the cache at every new token, most of a batched decode step's GPU time. With one query a row
    there is no causal structure to keep, so the query heads of one key head become that head's "query positions":
    ``(batch, heads, 1, dim)`` -> ``(batch, key heads, group, dim)``, attending to the cache as it is, the padding
    mask broadcast over the group. The same scores and weights as the expanded heads, to float rounding
    (``tests/test_families.py``).
    Returns ``(batch, 1, heads, dim)``, the layout transformers' attention functions return.
    """
    batch, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    folded = query.reshape(batch, key.shape[1], groups, dim)  # head h = key head h // groups, as repeat_kv orders
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2)


# ---- one variable-length flash call per layer ----------------------------------------------------------------
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def varlen_usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether PyTorch's flash kernel takes these inputs: CUDA, compute capability >= 8.0 (Ampere; flash attention
    2's floor), one 16-bit dtype, head size a multiple of 8 up to 256, query heads a multiple of key heads."""
    if not query.is_cuda or query.dtype not in FLASH_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return False
    size, heads, kv_heads = query.shape[-1], query.shape[1], key.shape[1]
    return size % 8 == 0 and size <= 256 and heads % kv_heads == 0 and _flash_capable(query.device.index or 0)


_FLASH_CAPABLE: dict[int, bool] = {}  # device index -> compute capability >= 8.0 (a plain dict: dynamo traces it)


def _flash_capable(device_index: int) -> bool:
    if device_index not in _FLASH_CAPABLE:
        _FLASH_CAPABLE[device_index] = torch.cuda.get_device_capability(device_index) >= (8, 0)
    return _FLASH_CAPABLE[device_index]


@torch.library.custom_op("capyft::varlen_causal_attention", mutates_args=())
def varlen_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each sequence of a packed batch, in one flash call: ``query`` ``(tokens, heads,
    dim)``, ``key``/``value`` ``(tokens, kv_heads, dim)`` (grouped-query heads without expansion), sequence ``i``
    spanning ``cu_seq_lens[i]:cu_seq_lens[i + 1]`` (int32, on the GPU), ``max_length`` at least its longest sequence.

    Returns the output ``(tokens, heads, dim)`` and the softmax log-sum-exp ``(heads, tokens)`` that backward reads.
    A custom op, so ``torch.compile`` keeps it as one call in its graph.
    """
    output, lse, *_ = torch.ops.aten._flash_attention_forward(
        query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, 0.0, True, False, scale=scale
    )
    return output, lse


@varlen_causal_attention.register_fake
def _varlen_fake(query, key, value, cu_seq_lens, max_length, scale):
    return torch.empty_like(query), query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32)


@torch.library.custom_op("capyft::varlen_causal_attention_backward", mutates_args=())
def _varlen_backward_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # no dropout: the random state the kernel would read is never used (as torch.nn.attention.varlen passes it)
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)
    unused = torch.empty(0, device=query.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out.contiguous(),
        query,
        key,
        value,
        out,
        lse,
        cu_seq_lens,
        cu_seq_lens,
        max_length,
        max_length,
        0.0,
        True,
        rng_state,
        unused,
        scale=scale,
    )
    return dq, dk, dv


@_varlen_backward_op.register_fake
def _varlen_backward_fake(grad_out, query, key, value, out, lse, cu_seq_lens, max_length, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _varlen_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    query, key, value, cu_seq_lens, max_length, scale = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], cu_seq_lens)
    ctx.max_length, ctx.scale = max_length, scale


def _varlen_backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple:
    query, key, value, out, lse, cu_seq_lens = ctx.saved_tensors
    grads = torch.ops.capyft.varlen_causal_attention_backward(
        grad_out, query, key, value, out, lse, cu_seq_lens, ctx.max_length, ctx.scale
    )
    return (*grads, None, None, None)


varlen_causal_attention.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _banded_causal_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(length, length)`` mask: query ``i`` sees keys ``i - window < j <= i`` (transformers'
    ``sliding_window_overlay`` on a causal mask)."""
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]
    return (distance >= 0) & (distance < window)


def _without_cudnn_attention(query: torch.Tensor) -> Any:
    """Keeps SDPA off cuDNN on CUDA: torch 2.11 prefers it on Hopper, and it builds a new plan for every new
    sequence length (~2 ms of CPU per call, measured on an H200), which packed rows and growing KV caches hit at
    every call. Flash and memory-efficient attention need no plan. Written for torch 2.11 (H200)."""
    if not query.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def is_packed_batch(batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``batch`` follows the packed-batch contract (one row, ``position_ids``, no ``attention_mask``)."""
    position_ids = batch.get("position_ids")
    return batch.get("attention_mask") is None and position_ids is not None and position_ids.shape[0] == 1


@dataclass(frozen=True)
class PackedRow:
    """The conversation boundaries of one packed row: ``bounds[i]:bounds[i + 1]`` is conversation ``i``."""

    bounds: tuple[int, ...]

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> PackedRow:
        """Reads the boundaries where ``position_ids`` (shape ``(1, tokens)``) restart at 0 (one host sync)."""
        positions = position_ids[0].cpu()
        starts = (positions == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        return cls((*starts, positions.numel()))

    def attention_kwargs(self, device: torch.device | str) -> dict[str, Any]:
        """The keyword arguments a transformers decoder passes on to its attention function for this row.

        ``cu_seq_lens_*`` and ``max_length_*`` are transformers' own varlen arguments (flash-attention reads them);
        ``packed_bounds`` carries the same boundaries as python ints for :func:`packed_sdpa_attention`.
        """
        cu_seq_lens = torch.tensor(self.bounds, dtype=torch.int32, device=device)
        longest = max(end - start for start, end in zip(self.bounds[:-1], self.bounds[1:]))
        return {
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
            "packed_bounds": self.bounds,
        }
