"""Loading a checkpoint or adapter folder for inference (``chat``, ``export``): the model as it was scored."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from capyft.checkpoints.files import LORA_MARK, adapter_weights, checkpoint_hparams, load_checkpoint
from capyft.checkpoints.runs import run_config
from capyft.modeling import build_lora_config, build_quantization_config, load_base_model, load_tokenizer

log = logging.getLogger(__name__)


def attach_adapter(base: Any, hparams: dict[str, Any], weights: dict[str, torch.Tensor], assign: bool = False) -> Any:
    """Wraps ``base`` with the checkpoint's LoRA config and loads its adapter tensors, checking that all match.

    Args:
        base: the base causal LM (4-bit, 16/32-bit, or on the meta device with ``assign=True``).
        hparams: the checkpoint's ``QLoRAModule`` arguments (see :func:`checkpoint_hparams`).
        weights: adapter tensors from :func:`adapter_weights`.
        assign: take the checkpoint tensors as the parameters instead of copying into them (for a meta base).

    Returns:
        The ``PeftModel`` in eval mode.

    Raises:
        ValueError: the checkpoint's tensors do not fit the adapter built on this base.
    """
    from peft import get_peft_model

    lora = build_lora_config(
        hparams["lora_r"],
        hparams["lora_alpha"],
        hparams["lora_dropout"],
        hparams["target_modules"],
        hparams["use_dora"],
        hparams["use_rslora"],
    )
    model = get_peft_model(base, lora)
    expected = {key for key in model.state_dict() if LORA_MARK in key}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's LoRA tensors do not fit the adapter built on {hparams['model_name_or_path']} "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); "
            "pass the base model it was trained on with --model"
        )
    model.load_state_dict(weights, strict=False, assign=assign)
    return model.eval()


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter folder names in its ``adapter_config.json``."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; give a folder saved by PEFT (adapter/best)")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file} names no base_model_name_or_path; pass the base model with --model")
    return base


def tokenizer_source(adapter_dir: str | Path | None, base: str) -> str:
    """Where the tokenizer comes from: the adapter folder when it holds one (capyft saves it there), else the base."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return str(adapter_dir)
    return base


def inference_dtype(trained: str | None, on_gpu: bool) -> str:
    """The compute dtype of the model as trained and evaluated: the run's ``compute_dtype`` (float16 becomes
    bfloat16 on CPU, as in ``QLoRAModule.configure_model``); without one float32 on CPU, else bf16 or fp16."""
    if trained is not None:
        return "bfloat16" if trained == "float16" and not on_gpu else trained
    if not on_gpu:
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load_for_inference(
    ckpt_path: str | Path | None = None,
    adapter: str | Path | None = None,
    model: str | None = None,
    load_in_4bit: bool | None = None,
    dtype: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Loads a model for generation: a checkpoint's adapter, an adapter folder, or a base model alone.

    By default this is the model that ``test`` scored: the base quantized as in training (4-bit on CPU too:
    bitsandbytes runs 4-bit layers on CPU) in the training compute dtype, plus the adapter. An adapter folder gets
    its quantization settings from its run's ``config.yaml`` (:func:`run_config`) when it has one.

    Args:
        ckpt_path: a capyft ``.ckpt``; its hyper-parameters give the base and the LoRA config.
        adapter: a PEFT adapter folder; its ``adapter_config.json`` names the base.
        model: the base model; with ``ckpt_path`` or ``adapter`` it overrides the base they name.
        load_in_4bit: quantize the base. Default: as in training (off for a base model alone).
        dtype: weights / compute dtype. Default: :func:`inference_dtype` of the training ``compute_dtype``.
        device: default ``cuda`` when available, else ``cpu``.

    Returns:
        ``(model, tokenizer, checkpoint)``, the model in eval mode; ``checkpoint`` is empty without ``ckpt_path``.

    Raises:
        ValueError: no source given, or both a checkpoint and an adapter.
    """
    if ckpt_path is not None and adapter is not None:
        raise ValueError("give --ckpt_path or --adapter, not both")
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path is not None else {}
    hparams = checkpoint_hparams(checkpoint) if checkpoint else {}
    if checkpoint:
        base = model or hparams["model_name_or_path"]
    elif adapter is not None:
        hparams = dict(run_config(adapter).get("model") or {})  # how the run quantized its base
        base = model or adapter_base(adapter)
    elif model is not None:
        base = model
    else:
        raise ValueError("give a model: --ckpt_path FILE.ckpt, --adapter DIR or --model DIR")
    hparams["model_name_or_path"] = base
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if load_in_4bit is None:
        load_in_4bit = bool(hparams.get("load_in_4bit", False))
    dtype = dtype or inference_dtype(hparams.get("compute_dtype"), device.type == "cuda")
    trust = bool(hparams.get("trust_remote_code", False))
    quantization = build_quantization_config(
        load_in_4bit, hparams.get("quant_type", "nf4"), hparams.get("double_quant", True), dtype
    )
    log.info("loading %s%s in %s on %s", base, " (4-bit)" if load_in_4bit else "", dtype, device)
    net = load_base_model(base, quantization, dtype, hparams.get("attn_implementation", "sdpa"), device, trust)
    if checkpoint:
        net = attach_adapter(net, hparams, {k: v.to(device) for k, v in adapter_weights(checkpoint).items()})
    elif adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(adapter))
    net.config.use_cache = True
    return net.eval(), load_tokenizer(tokenizer_source(adapter, base), trust), checkpoint
