"""Model building blocks: tokenizer, 4-bit quantization and LoRA configs, loading, and the memory-lean loss.

Pure functions over transformers / peft / bitsandbytes; no Lightning.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from capyft.chat import IGNORE_INDEX

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Llama-3 ships a pad token meant for fine-tuning; prefer it to reusing eos or end-of-turn.
LLAMA3_PAD = "<|finetune_right_pad_id|>"
# SDPA that runs packed (padding-free) rows one conversation at a time with the causal flash kernel, instead of one
# dense (tokens x tokens) block-diagonal mask over the whole row; identical to "sdpa" for every other batch.
PACKED_SDPA = "sdpa_packed"


def to_dtype(name: str) -> torch.dtype:
    """Maps ``float16`` / ``bfloat16`` / ``float32`` to a torch dtype, with a clear error otherwise."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Loads a tokenizer and gives it a pad token.

    The pad id only fills padded positions; the loss masks them by attention mask and labels, so pad may equal the
    end-of-turn token (SmolLM2) without hiding real end-of-turn labels.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if LLAMA3_PAD in tokenizer.get_vocab():
        tokenizer.pad_token = LLAMA3_PAD
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_quantization_config(
    load_in_4bit: bool = True,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "float16",
    quant_storage: str | None = None,
) -> Any:
    """A ``BitsAndBytesConfig`` for 4-bit loading, or None for plain 16/32-bit weights.

    Args:
        load_in_4bit: quantize the frozen base to 4 bits (QLoRA).
        quant_type: ``nf4`` (QLoRA's NormalFloat) or ``fp4``.
        double_quant: also quantize the quantization constants (~0.4 bit/param saved).
        compute_dtype: dtype the 4-bit weights are dequantized to for matmuls.
        quant_storage: storage dtype of the packed weights; FSDP needs it equal to the compute dtype.
    """
    if not load_in_4bit:
        return None
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=to_dtype(compute_dtype),
        bnb_4bit_quant_storage=to_dtype(quant_storage) if quant_storage else torch.uint8,
    )


def build_lora_config(
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str = "all-linear",
    use_dora: bool = False,
    use_rslora: bool = False,
) -> Any:
    """A PEFT ``LoraConfig`` for causal LM fine-tuning (QLoRA paper defaults: all linear layers)."""
    from peft import LoraConfig

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_dora=use_dora,
        use_rslora=use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_base_model(
    name_or_path: str,
    quantization: Any = None,
    dtype: str = "float16",
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    *,
    liger_kernels: bool = False,
    offload_embeddings: bool = False,
) -> Any:
    """Loads a causal LM, quantized when ``quantization`` is given, onto one device (never ``device_map="auto"``).

    Each data-parallel rank loads its own copy on its own device. :func:`prepare_base_model` then applies the
    speed and memory levers.

    Args:
        attn_implementation: a transformers attention implementation, or ``sdpa_packed`` (see :data:`PACKED_SDPA`).
        liger_kernels: Liger's fused RMSNorm, SwiGLU and RoPE kernels (CUDA; needs ``liger-kernel``).
        offload_embeddings: keep the frozen input embeddings in CPU memory (1 GiB for Llama-3 in 16 bits).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        quantization_config=quantization,
        dtype=to_dtype(dtype),
        attn_implementation="sdpa" if attn_implementation == PACKED_SDPA else attn_implementation,
        device_map={"": device},
        trust_remote_code=trust_remote_code,
    )
    return prepare_base_model(model, attn_implementation, liger_kernels, offload_embeddings)


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
    """Switches a model loaded with ``sdpa`` to :data:`PACKED_SDPA` (registered with transformers on first use)."""
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

    A packed row arrives with ``cu_seq_lens_q`` (conversation boundaries, set by :func:`causal_lm_loss_sum`). SDPA
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
        bounds = getattr(bounds, "capyft_bounds", None) or bounds.tolist()  # python ints: no device sync per layer
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
    every call. Flash and memory-efficient attention need no plan."""
    if not query.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def packed_sequence_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Conversation boundaries of one packed row (positions restart at 0), as transformers' varlen kwargs.

    ``cu_seq_lens_q`` also carries the boundaries as python ints (attribute ``capyft_bounds``), read by
    :func:`packed_sdpa_attention` without a device sync; flash-attention implementations read the tensor.
    """
    positions = position_ids[0].cpu()
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, positions.numel()]
    cu_seq_lens = torch.tensor(bounds, dtype=torch.int32, device=position_ids.device)
    cu_seq_lens.capyft_bounds = bounds
    longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    lengths = {"max_length_q": longest, "max_length_k": longest}
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, **lengths}


def apply_liger_kernels(model: Any) -> bool:
    """Swaps in Liger's fused RMSNorm, SwiGLU and RoPE kernels (not its loss: capyft computes its own).

    Fused kernels read and write each activation once instead of once per elementwise op, and save fewer tensors
    for backward. Needs a CUDA model and ``pip install liger-kernel``; otherwise warns and changes nothing.

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
    were switched.
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


def wrap_with_lora(model: Any, lora_config: Any, gradient_checkpointing: bool = True) -> Any:
    """Freezes the base, adds LoRA adapters (kept in fp32 for stable updates) and sets up checkpointing.

    Unlike ``peft.prepare_model_for_kbit_training`` this leaves embeddings and output head in their 16-bit dtype:
    casting them to fp32 costs 4 GiB for Llama-3's 128k vocabulary and buys nothing when they are frozen.
    """
    from peft import get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(
                f"LoRA target_modules {lora_config.target_modules} match no layer of this model; linear layers are "
                f"named {names[:12]} (or use 'all-linear')"
            ) from err
        raise
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    peft_model.train()  # HF models load in eval mode; checkpointing and dropout only act in training mode
    return peft_model


def causal_lm_loss_sum(
    model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the trained tokens of a batch, and how many there are.

    The decoder runs once; the output head and cross-entropy then run over the trained positions only, in chunks of
    ``chunk_size`` tokens, each recomputed in backward, so the full ``tokens x vocab`` logits (2 GiB in fp32 for 4k
    tokens of Llama-3's 128k vocabulary) never exist at once.

    Args:
        model: a causal LM (PEFT-wrapped or not).
        batch: ``input_ids``, ``labels`` and ``attention_mask`` or ``position_ids``.
        chunk_size: tokens per head + loss chunk; 0 computes all at once.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
    packed = {}
    if attention_mask is None and position_ids is not None and position_ids.shape[0] == 1:
        packed = packed_sequence_kwargs(position_ids)  # one padding-free row: tell attention where rows restart
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **packed,
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][mask], labels[mask]
    n_tokens = mask.sum()
    if targets.numel() == 0:
        return hidden.sum() * 0.0, n_tokens
    chunk = chunk_size if chunk_size > 0 else targets.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and chunk < targets.numel():
            total = total + checkpoint(_head_ce_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _head_ce_sum(head, h, t)
    return total, n_tokens


def _head_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


# ---- FSDP -------------------------------------------------------------------------------------------------------
FSDP_PARAM_DTYPES = {"16": "float16", "bf16": "bfloat16", "32": "float32"}  # Lightning's FSDP cast per precision


def check_fsdp_quant_storage(quant_storage: str | None, compute_dtype: str, precision: str | int) -> None:
    """Raises unless FSDP can shard the 4-bit weights of this configuration.

    FSDP flattens the parameters of each unit into one buffer of a single dtype and casts it to its mixed-precision
    dtype for compute (Lightning: float16 for ``16-*``, bfloat16 for ``bf16-*``, float32 for ``32-true``). Packed
    4-bit weights in the default ``uint8`` storage cannot join a 16-bit buffer, and a cast would scramble their
    bytes, so ``quant_storage`` and ``compute_dtype`` must both equal that dtype.

    Raises:
        ValueError: naming the setting to change.
    """
    wanted = FSDP_PARAM_DTYPES.get(str(precision).split("-")[0])
    if wanted is None:
        raise ValueError(f"FSDP with 4-bit weights needs precision bf16-mixed, 16-mixed or 32-true, got {precision}")
    if compute_dtype != wanted:
        raise ValueError(
            f"FSDP with precision {precision} computes in {wanted}, but model.compute_dtype is {compute_dtype}: "
            f"set --model.compute_dtype={wanted}"
        )
    if quant_storage != wanted:
        raise ValueError(
            f"FSDP shards the 4-bit weights in {wanted} buffers (precision {precision}), but model.quant_storage is "
            f"{quant_storage or 'uint8 (the default)'}: set --model.quant_storage={wanted}"
        )


def fsdp_auto_wrap_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy for QLoRA: one unit per decoder layer and one per trainable (LoRA) weight.

    LoRA weights are float32 while the frozen base is 16-bit, and FSDP needs one dtype per unit, so each LoRA
    ``Linear`` gets its own unit (as ``peft.utils.other.fsdp_auto_wrap_policy`` does). Use it as
    ``--trainer.strategy.auto_wrap_policy=capyft.modeling.fsdp_auto_wrap_policy``.
    """
    if recurse:
        return True  # look inside every module
    if type(module).__name__.endswith("DecoderLayer"):
        return True
    is_leaf = next(module.children(), None) is None
    return is_leaf and any(p.requires_grad for p in module.parameters(recurse=False))
