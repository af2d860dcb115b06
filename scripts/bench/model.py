"""Random-weight models: an in-memory 4-bit build (tests) and an on-disk checkpoint (the user's path)."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import llama_config


def build_random_4bit_model(config: Any, quantization: Any, device: Any, dtype: torch.dtype, attn: str = "sdpa") -> Any:
    """A random-weight causal LM with the module structure of ``from_pretrained(..., quantization_config=...)``.

    The skeleton is built on the meta device; transformers' own quantizer swaps in bitsandbytes' ``Linear4bit``
    exactly as a 4-bit load does; each linear weight is then drawn in 16 bits on ``device`` and quantized there, one
    matrix at a time (peak: one 4096 x 14336 matrix). Nothing is read from or written to disk.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    config = copy.deepcopy(config)
    device = torch.device(device)
    hf_attn = "sdpa" if attn.startswith("sdpa_packed") else attn
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=hf_attn, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, attn_implementation=hf_attn, torch_dtype=dtype)
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    quantizer.preprocess_model(model=model, device_map={"": device}, keep_in_fp32_modules=[], dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    std = config.initializer_range
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
            weight.normal_(0.0, std, generator=generator)
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **module.weight.__dict__).to(device)
            del weight
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                data = torch.empty(param.shape, dtype=param.dtype, device=device)
                if isinstance(module, (torch.nn.Embedding, torch.nn.Linear)):
                    data.normal_(0.0, std, generator=generator)
                else:  # RMSNorm scales
                    data.fill_(1.0)
                setattr(module, name, torch.nn.Parameter(data, requires_grad=param.requires_grad))
    rotary = model.get_decoder().rotary_emb  # its inverse frequencies are computed, not loaded: rebuild off meta
    model.get_decoder().rotary_emb = type(rotary)(config=model.config).to(device)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"random model left on the meta device: {left[:5]}")
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    model.eval()  # from_pretrained returns eval mode too
    return model


def write_checkpoint(out: Path, tokenizer_dir: Path, tiny: bool = False, device: str | None = None) -> dict[str, Any]:
    """Writes a random-weight Llama-3.1-8B (or tiny) checkpoint in bf16 with the given tokenizer to ``out``.

    Weights are drawn on the GPU when there is one (seconds), then saved as safetensors shards (~22 s for 16 GB on
    an H200 host). Speed and memory of the 8B shape do not depend on the weight values.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(tiny)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tiny:
        config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.do_sample = False  # random weights; capyft's own settings decide decoding anyway
    model.save_pretrained(str(out), max_shard_size="5GB")
    tokenizer.save_pretrained(str(out))
    for extra in ("chat_template.jinja",):  # capyft's Llama-3.1-style template, if the tokenizer dir has it
        if (tokenizer_dir / extra).exists() and not (out / extra).exists():
            shutil.copy(tokenizer_dir / extra, out / extra)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"checkpoint": str(out), "parameters": params, "write_s": round(time.perf_counter() - start, 1)}
