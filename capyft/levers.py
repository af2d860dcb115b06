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
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if model.config._attn_implementation not in ("sdpa", PACKED_SDPA):
        raise ValueError(
            f"attn_implementation {PACKED_SDPA} builds on sdpa, but the model runs {model.config._attn_implementation}"
        )
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # The mask stays sdpa's: correct for every batch; packed rows merely do not read it.
    AttentionMaskInterface.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = PACKED_SDPA


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for :data:`PACKED_SDPA`: causal SDPA per conversation of a packed row, else transformers' SDPA.

    A packed row arrives with ``cu_seq_lens_q`` and ``packed_bounds`` (see :class:`PackedRow`). SDPA
    with the dense block-diagonal mask cannot use the flash kernel and computes all ``tokens^2`` scores; run one
    conversation at a time with ``is_causal`` instead: the flash kernel, and only the ``sum(length^2) / 2`` scores
    that matter (4 conversations of 1k tokens: 1/8 of the work).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    single_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]
    with _without_cudnn_attention(query):
        if bounds is None or not single_row or not getattr(module, "is_causal", True):
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
        gqa = {"enable_gqa": True} if groups > 1 else {}
        outputs = [
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                **gqa,
            )
            for start, end in zip(bounds[:-1], bounds[1:])
        ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


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
    silently dropped. ``disable=False`` allows the packing again where the CPU supports it (about 1.7x faster CPU
    generation): only for processes that will not train afterwards (``test``, ``predict``). Returns how many layers
    were switched. Works around bitsandbytes 0.50.2 (the flag ``support_avx512bf16_for_cpu`` on each 4-bit layer).
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
