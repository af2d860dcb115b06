"""Speed and memory levers: each one patches a model (or a library's global registry) in a version-sensitive way.

Kept apart from :mod:`capyft.modeling`'s pure builders because each lever depends on library internals that move
between releases. Every lever names the versions it was written and measured against; when one of them moves,
re-run ``tests/test_packing.py`` (CPU) and ``scripts/bench`` (GPU).

Written against: torch 2.11-2.13, transformers 5.17-5.24, bitsandbytes 0.50.2, liger-kernel 0.8.5.

The packed-batch contract: a *packed* micro-batch (``data.padding_free``) is one row of several conversations, with
``position_ids`` restarting at 0 at each conversation start and no ``attention_mask``. :class:`PackedRow` turns it
into the keyword arguments transformers' attention functions read (``cu_seq_lens_q`` ...) plus ``packed_bounds``
(python ints), which :func:`packed_sdpa_attention` reads without a device sync.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# SDPA that runs packed (padding-free) rows one conversation at a time with the causal flash kernel, instead of one
# dense (tokens x tokens) block-diagonal mask over the whole row; identical to "sdpa" for every other batch.
PACKED_SDPA = "sdpa_packed"


def prepare_base_model(
    model: Any, attn_implementation: str = "sdpa", liger_kernels: bool = False, offload_embeddings: bool = False
) -> Any:
    """Applies capyft's levers to a freshly loaded base model (before LoRA) and returns it.

    On CPU, bitsandbytes' packed-weight path is turned off (see :func:`disable_cpu_weight_packing`).
    """
    disable_cpu_weight_packing(model)
    if attn_implementation == PACKED_SDPA:
        use_packed_sdpa(model)
    if liger_kernels:
        apply_liger_kernels(model)
    if offload_embeddings:
        offload_input_embeddings(model)
    return model


def use_packed_sdpa(model: Any) -> None:
    """Switches a model loaded with ``sdpa`` to :data:`PACKED_SDPA` (registered with transformers on first use).

    Patches transformers' global ``AttentionInterface`` / ``AttentionMaskInterface`` registries (transformers 5.x).

    Raises:
        ConfigError: for a model whose attention :data:`PACKED_SDPA` would compute differently (see
            :func:`check_packed_sdpa`).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if model.config._attn_implementation not in ("sdpa", PACKED_SDPA):
        raise ValueError(
            f"attn_implementation {PACKED_SDPA} builds on sdpa, but the model runs {model.config._attn_implementation}"
        )
    check_packed_sdpa(model.config)
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # The mask stays sdpa's: correct for every batch; packed rows merely do not read it.
    AttentionMaskInterface.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = PACKED_SDPA


# Layer types (transformers' ``config.layer_types``) whose attention is causal SDPA, over a sliding window or not:
# what packed_sdpa_attention computes. Chunked (Llama-4), sparse and recurrent layers live in masks or states
# that a packed row does not pass to it.
PACKED_SDPA_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_packed_sdpa(config: Any) -> None:
    """Refuses a model whose attention :data:`PACKED_SDPA` cannot compute exactly, before it loads if called on
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
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for :data:`PACKED_SDPA`: causal SDPA per conversation of a packed row, else transformers' SDPA.

    A packed row arrives with ``cu_seq_lens_q`` and ``packed_bounds`` (see :class:`PackedRow`). SDPA
    with the dense block-diagonal mask cannot use the flash kernel and computes all ``tokens^2`` scores; run one
    conversation at a time with ``is_causal`` instead: the flash kernel, and only the ``sum(length^2) / 2`` scores
    that matter (4 conversations of 1k tokens: 1/8 of the work). A layer with a ``sliding_window`` (Mistral, Phi-3,
    Gemma-2/3 local layers) sees only the last ``sliding_window`` tokens, itself included, as transformers' masks
    say: a conversation longer than the window gets a banded causal mask (memory-efficient kernel, not flash).

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
    bounds = kwargs.get("cu_seq_lens_q")
    single_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]
    with _without_cudnn_attention(query):
        if bounds is None or not single_row or not getattr(module, "is_causal", True):
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
        bounds = kwargs.get("packed_bounds") or bounds.tolist()  # python ints: no device sync per layer
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


def apply_liger_kernels(model: Any) -> bool:
    """Swaps in Liger's fused RMSNorm, SwiGLU and RoPE kernels (not its loss: capyft computes its own).

    Fused kernels read and write each activation once instead of once per elementwise op, and save fewer tensors
    for backward. Needs a CUDA model and ``pip install liger-kernel``; otherwise warns and changes nothing.
    Patches the model's modules through liger-kernel's own per-model functions (measured with liger-kernel 0.8.5).

    Returns:
        Whether the kernels were applied.
    """
    if next(model.parameters()).device.type != "cuda":
        log.info("liger_kernels: CUDA only; not used on %s", next(model.parameters()).device.type)
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        log.warning("liger_kernels is on but liger-kernel is not installed (pip install liger-kernel); running without")
        return False
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model.config.model_type)
    if apply is None:
        log.warning("liger-kernel has no kernels for model type %s; running without", model.config.model_type)
        return False
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True}
    wanted |= {"cross_entropy": False, "fused_linear_cross_entropy": False}
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})
    return True


class OffloadedEmbedding(torch.nn.Module):
    """A frozen embedding table kept in CPU memory: rows are looked up there and only they go to the GPU.

    The table is a plain attribute, not a parameter or buffer, so ``Module.to(cuda)`` (Lightning moves the whole
    model) leaves it on the CPU. A 4k-token step moves 32 MB (Llama-3: 8 KiB a token) instead of holding 1 GiB.
    """

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        super().__init__()
        self.weight_cpu = embedding.weight.detach().to("cpu")
        self.num_embeddings, self.embedding_dim = self.weight_cpu.shape
        self.padding_idx = embedding.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.cpu(), self.weight_cpu).to(input_ids.device)


def offload_input_embeddings(model: Any) -> bool:
    """Moves a GPU model's frozen input embeddings to CPU memory (see :class:`OffloadedEmbedding`).

    Skipped (returns False) on CPU, when the table is tied to the output head (the head needs it on the GPU) or is
    not a plain ``nn.Embedding`` (e.g. scaled embeddings).
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or embedding.weight.device.type == "cpu":
        return False
    if head is not None and head.weight.data_ptr() == embedding.weight.data_ptr():
        log.info("offload_embeddings: input embeddings are tied to the output head; keeping them on the GPU")
        return False
    model.set_input_embeddings(OffloadedEmbedding(embedding))
    del embedding
    torch.cuda.empty_cache()  # hand the freed table back, or later peaks count it as reserved
    return True


def disable_cpu_weight_packing(model: torch.nn.Module, disable: bool = True) -> int:
    """Keeps bitsandbytes 4-bit layers on the format that has an autograd kernel.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights during any no-grad pass (validation, sanity
    check, ``generate``); the packed format has no autograd kernel, so later gradients through those layers are
    silently dropped. Packing also rounds each layer's block scales to bfloat16, so a packed model is not the one
    trained: capyft never allows it (``disable=False`` would, about 1.7x faster CPU generation). Returns how many
    layers were switched. Works around bitsandbytes 0.50.2 (the flag ``support_avx512bf16_for_cpu`` on each 4-bit
    layer).
    """
    allowed = False
    if not disable:
        from bitsandbytes.functional import has_avx512bf16

        allowed = bool(has_avx512bf16())
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = allowed
            count += 1
    return count


def compile_decoder_layers(model: Any, backend: str = "inductor") -> int:
    """Regional ``torch.compile``: compiles each decoder layer's forward (one graph, reused by every layer).

    QLoRA steps are launch-bound (an 8B step at 4k tokens kept an H200 busy 0.34 s of 0.87 s): fusing the
    elementwise work around each layer's 4-bit + LoRA linears removes most of the host time per layer.
    Lengths are compiled dynamic, so packed rows of new lengths reuse the graph; the packed attention loop
    (:func:`packed_sdpa_attention`) is traced too, so a new *number* of conversations per row compiles once more
    (a fixed micro-batch of conversations always packs the same number; validation adds a no-grad graph). Keeping
    that loop eager instead (``torch.compiler.disable``) broke the checkpointed layer into eager pieces and still
    guarded on the count (torch 2.13, CPU). The first step pays the compile (~10-15 s for Llama-3.1-8B on an H200).
    Written against torch 2.11-2.13 with bitsandbytes 0.50.2, whose 4-bit matmul traces without graph breaks.

    Returns:
        How many layers were compiled (0 when the model has no ``layers`` list).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        log.warning("compile_layers: %s has no decoder layer list; not compiled", type(base).__name__)
        return 0
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)
