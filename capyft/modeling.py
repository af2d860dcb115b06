"""Model building blocks: tokenizer, 4-bit quantization and LoRA configs, loading, and the memory-lean loss.

Plain functions over transformers / peft / bitsandbytes; no Lightning. The version-sensitive speed and memory levers
they switch on live in :mod:`capyft.levers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from capyft.attention import PACKED_ATTENTION, PackedRow, check_packed_sdpa, is_packed_batch
from capyft.chat import IGNORE_INDEX
from capyft.checks import ConfigError
from capyft.levers import prepare_base_model

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Llama-3 ships a pad token meant for fine-tuning; prefer it to reusing eos or end-of-turn.
LLAMA3_PAD = "<|finetune_right_pad_id|>"


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
    speed and memory levers, and :func:`check_logit_transform` makes sure capyft's loss is the model's own.

    Args:
        attn_implementation: a transformers attention implementation, or ``sdpa_packed`` / ``sdpa_packed_loop`` (see
            :mod:`capyft.attention`).
        liger_kernels: Liger's fused RMSNorm, SwiGLU and RoPE kernels (CUDA; needs ``liger-kernel``).
        offload_embeddings: keep the frozen input embeddings in CPU memory (1 GiB for Llama-3 in 16 bits).

    Raises:
        ConfigError: attention ``sdpa_packed`` cannot compute (before the weights load), or output logits capyft's
            loss does not reproduce.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn_implementation in PACKED_ATTENTION:  # refuse before the weights load
        check_packed_sdpa(AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))
    device = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        quantization_config=quantization,
        dtype=to_dtype(dtype),
        attn_implementation="sdpa" if attn_implementation in PACKED_ATTENTION else attn_implementation,
        device_map={"": device},
        trust_remote_code=trust_remote_code,
    )
    model = prepare_base_model(model, attn_implementation, liger_kernels, offload_embeddings)
    check_logit_transform(model)
    return model


def wrap_with_lora(model: Any, lora_config: Any, gradient_checkpointing: bool = True) -> Any:
    """Freezes the base, adds LoRA adapters (kept in fp32 for stable updates) and sets up checkpointing.

    Unlike ``peft.prepare_model_for_kbit_training`` this leaves embeddings and output head in their 16-bit dtype:
    casting them to fp32 costs 4 GiB for Llama-3's 128k vocabulary and buys nothing when they are frozen.
    """
    from peft import get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        set_gradient_checkpointing(model, True)
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


def set_gradient_checkpointing(model: Any, on: bool) -> None:
    """Turns activation checkpointing of the decoder layers on (non-reentrant) or off, before or after LoRA wraps
    ``model``. On, the embeddings' output requires grad, so checkpointed layers see an input that needs a gradient;
    off, nothing does."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(base, "_require_grads_hook", None) is None:  # transformers 5 registers it in the line above
            base.enable_input_require_grads()
        return
    base.gradient_checkpointing_disable()
    # transformers (enabling checkpointing) and peft (wrapping a checkpointed model) each register a hook named
    # make_inputs_require_grad(s) and keep a handle to the last one only: remove them all by name
    embeddings = base.get_input_embeddings()
    for key, hook in list(embeddings._forward_hooks.items()):
        if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
            del embeddings._forward_hooks[key]
    base._require_grads_hooks = []
    base.__dict__.pop("_require_grads_hook", None)


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
    transform = logit_transform(base.config)
    attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
    packed = {}
    if is_packed_batch(batch):  # one padding-free row: tell attention where conversations start
        packed = PackedRow.from_position_ids(position_ids).attention_kwargs(position_ids.device)
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
            total = total + checkpoint(_head_ce_sum, head, h, t, transform, use_reentrant=False)
        else:
            total = total + _head_ce_sum(head, h, t, transform)
    return total, n_tokens


def _head_ce_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform: LogitTransform
) -> torch.Tensor:
    return F.cross_entropy(transform(head(hidden).float()), targets, reduction="sum")


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM does to its output head's logits before the loss (transformers 5.24's ``*ForCausalLM``):
    ``softcap * tanh(logits * multiplier / divisor / softcap)``, each part only where the model has it.

    :func:`causal_lm_loss_sum` runs the output head itself, so it applies this in float32 (transformers applies it
    in the model's dtype: equal in float32, closer to exact in 16 bits).
    """

    multiplier: float = 1.0  # Cohere's logit_scale
    divisor: float = 1.0  # Granite's logits_scaling
    softcap: float | None = None  # Gemma-2/3's final_logit_softcapping

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(config: Any) -> LogitTransform:
    """The :class:`LogitTransform` a model config names (its text config for multimodal models).

    :func:`check_logit_transform` verifies, once the model is loaded, that it is all the model does.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LogitTransform(
        multiplier=float(getattr(text, "logit_scale", None) or 1.0),
        divisor=float(getattr(text, "logits_scaling", None) or 1.0),
        softcap=getattr(text, "final_logit_softcapping", None),
    )


@torch.no_grad()
def check_logit_transform(model: Any, tokens: int = 8) -> None:
    """Refuses a model whose own logits differ from what :func:`causal_lm_loss_sum` computes (decoder, output head,
    :func:`logit_transform`), so that capyft's loss is the model's own loss for every model it trains.

    Runs the model and its decoder on ``tokens`` tokens (one forward each, in eval mode). The tolerance, 1% of the
    largest logit, covers the transform computed in float32 here and in 16 bits by the model; an unknown transform
    (an extra scale, a bias, a cap in another place) moves the logits far more.

    Raises:
        ConfigError: naming the model type and the transforms capyft knows.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    ids = (torch.arange(1, tokens + 1, device=head.weight.device) % base.config.get_text_config().vocab_size)[None]
    was_training = base.training
    base.eval()  # dropout off: both passes must see the same weights and activations
    try:
        theirs = base(input_ids=ids, use_cache=False).logits.float()
        hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = logit_transform(base.config)(head(hidden).float())
    finally:
        base.train(was_training)
    gap = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
    if not gap <= 1e-2 * float(theirs.abs().max()) + 1e-4:
        raise ConfigError(
            f"model.model_name_or_path: {base.config.model_type} transforms its output logits in a way capyft's "
            f"loss does not reproduce (largest gap {gap:.3g} against the model's own logits); capyft knows "
            "logit_scale (Cohere), logits_scaling (Granite) and final_logit_softcapping (Gemma), so it cannot "
            "train this model"
        )


# ---- FSDP -------------------------------------------------------------------------------------------------------
FSDP_PARAM_DTYPES = {"16": "float16", "bf16": "bfloat16", "32": "float32"}  # Lightning's FSDP cast per precision


def check_fsdp(
    strategy_kwargs: dict[str, Any], load_in_4bit: bool, quant_storage: str | None, dtype: str, precision: Any
) -> None:
    """Under FSDP: refuses a 4-bit storage dtype FSDP cannot shard or a missing wrap policy, and warns that the path
    is unmeasured.

    Raises:
        ValueError: naming the setting to change.
    """
    if load_in_4bit:
        check_fsdp_quant_storage(quant_storage, dtype, precision)
    if dtype != "float32" and strategy_kwargs.get("auto_wrap_policy") is None:
        raise ValueError(
            f"FSDP needs one dtype per unit, and the LoRA weights are float32 in a {dtype} model: set "
            "--trainer.strategy.auto_wrap_policy=capyft.modeling.fsdp_auto_wrap_policy (a unit per decoder "
            "layer and per LoRA weight)"
        )
    log.warning(
        "FSDP has not been run with capyft on a GPU yet; check that adapter/final and the checkpoints hold the "
        "full adapter before relying on them (docs/multi-gpu.md)"
    )


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
