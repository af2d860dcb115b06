"""Speed and memory levers: each one patches a model (or a library's global registry) in a version-sensitive way.

Kept apart from :mod:`capyft.modeling`'s pure builders because each lever depends on library internals that move
between releases. Every lever names the versions it was written and measured against; when one of them moves,
re-run ``tests/test_packing.py`` (CPU), ``tests/test_gpu.py`` (CUDA) and ``scripts/bench`` (GPU). Attention for
packed rows lives in :mod:`capyft.attention`.

Written against: torch 2.11-2.13, transformers 5.17-5.24, bitsandbytes 0.50.2, liger-kernel 0.8.5.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from typing import Any

import torch
import torch.nn.functional as F

from capyft.attention import PACKED_ATTENTION, use_packed_attention

log = logging.getLogger(__name__)


def prepare_base_model(
    model: Any, attn_implementation: str = "sdpa", liger_kernels: bool = False, offload_embeddings: bool = False
) -> Any:
    """Applies capyft's levers to a freshly loaded base model (before LoRA) and returns it.

    On CPU, bitsandbytes' packed-weight path is turned off (see :func:`disable_cpu_weight_packing`).
    """
    disable_cpu_weight_packing(model)
    if attn_implementation in PACKED_ATTENTION:
        use_packed_attention(model, attn_implementation)
    if liger_kernels:
        apply_liger_kernels(model)
    if offload_embeddings:
        offload_input_embeddings(model)
    return model


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


COMPILE_MIN_GPU_GIB = 16  # compile_layers auto: GPUs this large spare the ~0.7 GiB compiled layers take
# compile_layers auto: fits this long earn back the compile. On an H200 (Llama-3.1-8B, 4k-token steps, 2026-11-29)
# compiling added ~90 s to a fit and saved 0.09 s a step without gradient checkpointing (0.536 -> 0.444 s: even at
# ~1,000 steps); with checkpointing it added 45-65 s and saved 0.12-0.24 s (even at ~200-500 steps).
COMPILE_MIN_STEPS = 1000


def compile_wanted(setting: bool | str, device: torch.device | str, steps: int | None = None) -> bool:
    """``compile_layers`` resolved for ``device`` and a fit of ``steps`` optimizer steps (None: unbounded).

    ``auto`` compiles a fit of at least :data:`COMPILE_MIN_STEPS` steps on a CUDA GPU of at least
    :data:`COMPILE_MIN_GPU_GIB` GiB where triton (inductor's GPU code generator) is installed and a C compiler is on
    ``PATH`` (triton builds its kernel launcher with one at the first compile; without it the first step fails).
    ``auto`` logs what it decided and why.
    """
    if setting != "auto":
        return bool(setting)
    reason = _auto_compile_obstacle(torch.device(device), steps)
    log.info("compile_layers auto: %s", f"eager, {reason}" if reason else "compiling the decoder layers")
    return reason is None


def _auto_compile_obstacle(device: torch.device, steps: int | None) -> str | None:
    if steps is not None and steps < COMPILE_MIN_STEPS:
        return f"{steps} optimizer steps do not earn back the compile (it pays from about {COMPILE_MIN_STEPS})"
    if device.type != "cuda":
        return "CUDA GPUs only"
    from capyft.sizing import gpu_memory_cap

    total = torch.cuda.get_device_properties(device).total_memory
    total_gib = min(total, gpu_memory_cap() or total) / 2**30  # CAPYFT_GPU_MEMORY_GIB: the GPU it stands in for
    if total_gib < COMPILE_MIN_GPU_GIB:
        gpu = f"a {total_gib:.0f} GiB GPU"
        return f"{gpu} keeps the ~0.7 GiB compiled layers add (compiles from {COMPILE_MIN_GPU_GIB} GiB)"
    missing = compile_toolchain_missing("cuda")
    return f"torch.compile needs {missing}" if missing else None


def compile_toolchain_missing(device_type: str) -> str | None:
    """What ``torch.compile``'s inductor lacks on this machine to compile for ``device_type``, or None.

    On CUDA, triton and a C compiler (triton builds its kernel launcher with one); on CPU, a C++ compiler.
    """
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton (pip install triton; Linux only)"
        compilers, what = (os.environ.get("CC"), "cc", "gcc", "clang"), "a C compiler (gcc or clang, or CC)"
    else:
        compilers, what = (os.environ.get("CXX"), "c++", "g++", "clang++"), "a C++ compiler (g++ or clang++, or CXX)"
    return None if any(c and shutil.which(c) for c in compilers) else f"{what} on PATH"


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
