"""GPU benchmark (issue #6): capyft against TRL and a plain loop, on a Llama-3.1-8B-shaped QLoRA model.

    python scripts/bench_gpu.py --out benchmarks/run        # everything: ~15-20 min on one H200
    python scripts/bench_gpu.py --out DIR --only capyft-bf16-fast,trl-defaults
    python scripts/bench_gpu.py --out DIR --tiny --device cpu     # every code path on a tiny model, CPU (~10 min)

Needs trl, liger-kernel, bitsandbytes and datasets besides capyft's own dependencies (on the offline H200 host: the
wheels of ``../shared/gpu/fetch-wheels.sh``, installed with ``pip install --no-deps --target``).

Every stack trains the same random-weight model shape (Llama-3.1-8B: hidden 4096, 32 layers, 32 heads, 8 kv
heads, vocab 128,256, llama3 RoPE) in 4-bit nf4 + double quant, LoRA r=16 / alpha 32 / dropout 0.05 on all linear
layers, gradient checkpointing, paged AdamW 8-bit, on the same synthetic conversations (Capybara-like lengths:
log-normal around 900 tokens, clipped to 200-2048, ~90% of tokens trained). Each stack runs in its own process
(clean memory statistics, no kernel patches leaking between stacks), warms up, then times several optimizer steps
(device-synchronized). Speeds count trained (label) tokens. Weights are random: speed and memory do not depend on
their values, and nothing has to be downloaded or saved (building the 8B model takes seconds).

Writes ``bench.json`` (everything), ``bench.md`` (tables) and ``profile-<stack>.txt`` (torch.profiler: where the
step time goes) to ``--out``; prints the tables last. Results of 2026-11-29: ``benchmarks/h200-2026-11-29.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

IGNORE = -100
# meta-llama/Llama-3.1-8B-Instruct config.json (the fields that shape compute and memory)
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}
SPECIAL = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|eot_id|>": 128009,
}
STOP_IDS = [128009, 128001]
PART: Path | None = None  # a worker's result file, rewritten as partial results come in
GEN_BATCHES = ["200", "64"]  # generation batch sizes (--gen-batches; "64a": under autocast)
# capyft's levers as measured here; "fast" is what the report proposes as defaults
LEAN = {"attn_implementation": "sdpa_packed", "liger_kernels": True, "offload_embeddings": True, "loss_chunk_size": 256}
PLAIN = {"attn_implementation": "sdpa", "liger_kernels": False, "offload_embeddings": False, "loss_chunk_size": 1024}


# ---- model and data ---------------------------------------------------------------------------------------------
def llama_config(tiny: bool = False) -> Any:
    return tiny_config() if tiny else _config(LLAMA31_8B)


def tiny_config(vocab: int = 128256) -> Any:
    """The 8B config shrunk to 2 layers of hidden 64 (4-bit needs multiples of 64); same RoPE, vocab by default."""
    small = {**LLAMA31_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    small.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab)
    if vocab < 128256:
        small.update(bos_token_id=1, eos_token_id=2)
    return _config(small)


def _config(values: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig.from_dict(copy.deepcopy(values))


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
    hf_attn = "sdpa" if attn == "sdpa_packed" else attn
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


def bnb_config(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def lognormal_lengths(n: int, median: float, sigma: float, low: int, high: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(n, generator=generator, dtype=torch.float64) * sigma + math.log(median)
    return [int(min(max(round(math.exp(x)), low), high)) for x in draws.tolist()]


def make_conversations(
    n: int,
    seed: int = 0,
    median: float = 900,
    sigma: float = 0.6,
    low: int = 200,
    high: int = 2048,
    vocab: int = 128000,
) -> list[dict[str, list[int]]]:
    """Synthetic multi-turn conversations: 1-3 turns, each a masked user part (~10%) and a trained assistant part.

    Token ids are random (below the special tokens); the first token (begin-of-text) is never trained.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    rows = []
    for length in lognormal_lengths(n, median, sigma, low, high, seed):
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        labels = list(ids)
        turns = int(torch.randint(1, 4, (1,), generator=generator))
        bounds = [round(length * k / turns) for k in range(turns + 1)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            user = max(4, round(0.1 * (end - start)))
            labels[start : start + user] = [IGNORE] * user
        labels[0] = IGNORE
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def fixed_length_rows(n: int, length: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` conversations of exactly ``length`` tokens, ~90% trained (for the memory runs)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 128000, (length,), generator=generator).tolist()
        user = length // 10
        rows.append({"input_ids": ids, "labels": [IGNORE] * user + ids[user:]})
    return rows


def bench_tokenizer() -> Any:
    """A real ``PreTrainedTokenizerFast`` (TRL insists) that knows only Llama-3's special tokens; ids stay ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, **SPECIAL}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token="<unk>",
    )


def trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


# ---- timing -----------------------------------------------------------------------------------------------------
class Steps:
    """Per-step wall time (device-synchronized), trained tokens and tokens fed, for one stack."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.trained: list[int] = []
        self.fed: list[int] = []
        self._start = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self) -> None:
        self.sync()
        self._start = time.perf_counter()

    def end(self, labels: torch.Tensor, input_ids: torch.Tensor) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._start)
        self.trained.append(trained_tokens(labels))
        self.fed.append(int(input_ids.numel()))

    def summary(self, warmup: int, stop: int | None = None) -> dict[str, Any]:
        window = slice(warmup, stop)
        times, trained, fed = self.times[window], self.trained[window], self.fed[window]
        if not times:
            return {"error": f"no measured steps ({len(self.times)} steps, {warmup} warm-up)"}
        out = {
            "steps_measured": len(times),
            "step_s_median": statistics.median(times),
            "trained_tokens_per_s": sum(trained) / sum(times),
            "trained_tokens_per_s_median_step": statistics.median(t / s for t, s in zip(trained, times)),
            "trained_tokens_per_step": sum(trained) / len(times),
            "fed_tokens_per_step": sum(fed) / len(times),
            "first_step_s": self.times[0],
        }
        out.update(memory(self.device))
        return out


def save_partial(info: dict[str, Any]) -> None:
    """Writes what a worker has so far, so a stack stopped at its time limit still reports its finished parts."""
    if PART is not None:
        PART.write_text(json.dumps({**info, "partial": True}, indent=1, default=str))


def memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }


def fresh_memory(device: torch.device) -> float:
    """Frees cached blocks and restarts the peak counters; returns what is still allocated (GiB)."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


# ---- capyft through Lightning -----------------------------------------------------------------------------------
def accepted(fn: Any, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits ``values`` into the keyword arguments ``fn`` takes and the rest."""
    params = inspect.signature(fn).parameters
    taken = {k: v for k, v in values.items() if k in params}
    return taken, {k: v for k, v in values.items() if k not in params}


def patch_capyft_loading(config: Any, tokenizer: Any, levers: dict[str, Any], info: dict[str, Any]) -> None:
    """Makes ``QLoRAModule.configure_model`` build the random model instead of ``from_pretrained``.

    Everything after loading (quantization config, LoRA wrapping, loss, optimizer, Lightning) is capyft's own code.
    Levers that ``QLoRAModule`` does not take (yet) as arguments are applied here, through capyft's own
    :func:`capyft.modeling.prepare_base_model`.
    """
    import capyft.model as capyft_model
    from capyft import modeling

    real = modeling.load_base_model

    def load_random(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        device = torch.device(a["device"])
        start = time.perf_counter()
        model = build_random_4bit_model(config, a["quantization"], device, modeling.to_dtype(a["dtype"]), "sdpa")
        liger = bool(a.get("liger_kernels") or levers.get("liger_kernels"))
        offload = bool(a.get("offload_embeddings") or levers.get("offload_embeddings"))
        modeling.prepare_base_model(model, a["attn_implementation"], liger, offload)
        info["build_s"] = time.perf_counter() - start
        info["attn_implementation"] = model.config._attn_implementation
        info["liger_kernels"], info["offload_embeddings"] = liger, offload
        info["allocated_after_build_gib"] = fresh_memory(device)
        return model

    capyft_model.load_base_model = load_random
    capyft_model.load_tokenizer = lambda *a, **k: tokenizer


def run_capyft(
    name: str,
    rows: list[dict[str, Any]],
    device: torch.device,
    tiny: bool,
    *,
    precision: str,
    batch_size: int,
    padding_free: bool,
    levers: dict[str, Any],
    steps: int,
    warmup: int,
    lora_dropout: float = 0.05,
    profile: Path | None = None,
    profile_steps: int = 2,
    check: bool = False,
) -> dict[str, Any]:
    """capyft's training path: ``QLoRAModule`` + ``ChatDataModule`` under a Lightning ``Trainer``."""
    import lightning as L
    from datasets import Dataset

    from capyft.datamodule import ChatDataModule
    from capyft.model import QLoRAModule

    info: dict[str, Any] = {"stack": name, "precision": precision, "batch_size": batch_size}
    info["padding_free"] = padding_free
    tokenizer = bench_tokenizer()
    compute = "float16" if precision.startswith("16") else "bfloat16"
    if device.type == "cpu":
        compute, precision = "float32", "32-true"
    wanted = {
        "model_name_or_path": "random-llama-3.1-8b",
        "compute_dtype": compute,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": lora_dropout,
        "target_modules": "all-linear",
        "gradient_checkpointing": True,
        "optimizer": "paged_adamw_8bit" if device.type == "cuda" else "adamw",
        "learning_rate": 2e-4,
        "warmup_steps": 1,
        **levers,
    }
    module_args, rest = accepted(QLoRAModule.__init__, wanted)
    info["module_args"], info["levers_applied_by_bench"] = module_args, rest
    patch_capyft_loading(llama_config(tiny), tokenizer, rest, info)
    module = QLoRAModule(**module_args)

    data_args, _ = accepted(
        ChatDataModule.__init__,
        {"tokenizer": "random", "batch_size": batch_size, "padding_free": padding_free, "group_by_length": False},
    )
    datamodule = ChatDataModule(**data_args)
    datamodule.tokenizer = tokenizer
    datamodule.splits = {"train": Dataset.from_list([{**r, "row": i} for i, r in enumerate(rows)])}

    timer = Steps(device)
    profiler = Profiler(device, profile) if profile else None
    total = steps + (profile_steps if profiler else 0)  # profiled steps come last and are not timed

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if profiler and batch_idx == steps:
                profiler.start()
            timer.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.end(batch["labels"], batch["input_ids"])
            if profiler and batch_idx == total - 1:
                info["profile"] = profiler.stop(profile_steps)

        def on_train_end(self, trainer, pl_module):
            if check:  # Lightning moves the model back to the CPU after this hook
                capyft_check(pl_module, info, pl_module.hparams.loss_chunk_size)

    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=datamodule)
    info.update(timer.summary(warmup, steps))
    info["step_s"] = [round(t, 4) for t in timer.times]
    del trainer, module, datamodule
    return info


# ---- TRL --------------------------------------------------------------------------------------------------------
def run_trl(
    name: str,
    rows: list[dict[str, Any]],
    device: torch.device,
    tiny: bool,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    padding_free: bool = False,
    packing: bool = False,
    liger: bool = False,
    profile: Path | None = None,
    profile_steps: int = 2,
) -> dict[str, Any]:
    """TRL's ``SFTTrainer``: its defaults plus the reference settings (4-bit model, LoRA, paged AdamW 8-bit)."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    info: dict[str, Any] = {"stack": name, "trl": trl.__version__, "batch_size": batch_size}
    liger = liger and device.type == "cuda"  # Liger's kernels are Triton GPU kernels
    info.update(padding_free=padding_free, packing=packing, use_liger_kernel=liger)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    model = build_random_4bit_model(llama_config(tiny), bnb_config(dtype), device, dtype, "sdpa")
    info["build_s"] = time.perf_counter() - start
    info["allocated_after_build_gib"] = fresh_memory(device)
    settings = {
        "output_dir": tempfile.mkdtemp(prefix="trl-"),
        "per_device_train_batch_size": batch_size,
        "max_steps": steps + (profile_steps if profile else 0),
        # the data is at most 2048 tokens; TRL refuses max_length with padding_free unless it packs
        "max_length": None if padding_free and not packing else 2048,
        "learning_rate": 2e-4,
        "optim": "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "padding_free": padding_free,
        "packing": packing,
        "use_liger_kernel": liger,
        "seed": 42,
    }
    if device.type == "cpu":
        settings.update(bf16=False, use_cpu=True)
    args = trl.SFTConfig(**settings)
    info["trl_defaults_kept"] = {
        k: getattr(args, k, None)
        for k in ("gradient_checkpointing", "gradient_checkpointing_kwargs", "bf16", "loss_type", "packing_strategy")
    }
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    timer = Steps(device)
    profiler = Profiler(device, profile) if profile else None
    fed: list[tuple[torch.Tensor, torch.Tensor]] = []  # batches in the order the collator made them

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if profiler and len(timer.times) == steps:
                profiler.start()
            timer.begin()

        def on_step_end(self, args, state, control, **kwargs):
            labels, input_ids = fed.pop(0)
            timer.end(labels, input_ids)
            if profiler and len(timer.times) == steps + profile_steps:
                info["profile"] = profiler.stop(profile_steps)

    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=bench_tokenizer(),
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        fed.append((batch["labels"], batch["input_ids"]))
        return batch

    trainer.data_collator = counting
    trainer.train()
    info.update(timer.summary(warmup, steps))
    info["step_s"] = [round(t, 4) for t in timer.times]
    del trainer, model
    return info


# ---- plain transformers + peft + bitsandbytes loop --------------------------------------------------------------
def run_plain(
    name: str,
    rows: list[dict[str, Any]],
    device: torch.device,
    tiny: bool,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """The usual QLoRA notebook loop: ``prepare_model_for_kbit_training``, PEFT, the model's own loss."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from capyft.data import ChatCollator

    info: dict[str, Any] = {"stack": name, "batch_size": batch_size}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    model = build_random_4bit_model(llama_config(tiny), bnb_config(dtype), device, dtype, "sdpa")
    info["build_s"] = time.perf_counter() - start
    info["allocated_after_build_gib"] = fresh_memory(device)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=2e-4)
    collate = ChatCollator(pad_id=SPECIAL["<|finetune_right_pad_id|>"])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(42)).tolist()
    timer = Steps(device)
    autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()
    for step in range(steps):
        batch = collate([rows[i] for i in order[step * batch_size : (step + 1) * batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        timer.begin()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.end(batch["labels"], batch["input_ids"])
    info.update(timer.summary(warmup))
    info["step_s"] = [round(t, 4) for t in timer.times]
    del model, optimizer
    return info


# ---- profiles and the packing check -----------------------------------------------------------------------------
class Profiler:
    """torch.profiler around a few real steps; writes a kernel-time summary and op tables to ``path``."""

    def __init__(self, device: torch.device, path: Path) -> None:
        self.device, self.path = device, path
        self.prof: Any = None
        self.summary: dict[str, Any] = {}
        self._start = 0.0
        self.steps = 0

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        Steps(self.device).sync()
        self.prof = profile(activities=activities)
        self.prof.start()
        self._start = time.perf_counter()

    def stop(self, steps: int) -> dict[str, Any]:
        Steps(self.device).sync()
        wall = time.perf_counter() - self._start
        self.prof.stop()
        try:
            self.summary = summarize_profile(self.prof, wall, steps, self.device, self.path)
        except Exception as err:  # a profile must not cost the measurements
            self.summary = {"error": repr(err)}
        return self.summary


def summarize_profile(prof: Any, wall: float, steps: int, device: torch.device, path: Path) -> dict[str, Any]:
    kernels: dict[str, float] = {}
    for event in prof.events():
        # device-side kernels only; "Optimizer.step#..." ranges are annotations that span whole steps (Lightning
        # runs forward and backward inside optimizer.step's closure), not kernels
        annotation = event.name.startswith(("Optimizer.", "ProfilerStep"))
        if str(getattr(event, "device_type", "")).endswith("CUDA") and not annotation:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e6
    busy = sum(kernels.values())
    categories = {  # first match wins: attention before matmul (fmha_cutlass...), optimizer before elementwise
        "attention": ("flash", "fmha", "attention", "cudnn"),
        "matmul (cuBLAS/CUTLASS)": ("gemm", "cutlass", "nvjet", "sm90_", "xmma", "splitkreduce"),
        "bitsandbytes dequantize": ("dequant",),
        "optimizer (8-bit paged)": ("optimizer",),
        "triton (liger)": ("triton", "_rms", "swiglu", "rope", "liger"),
        "cross-entropy / softmax": ("softmax", "nll", "cross_entropy", "logsumexp"),
        "dropout (LoRA)": ("dropout", "masked_scale"),
        "copies / casts": ("copy", "memcpy", "memset", "cat", "to_copy"),
    }
    split = dict.fromkeys([*categories, "other elementwise / reductions"], 0.0)
    for kernel, seconds in kernels.items():
        lower = kernel.lower()
        label = next((c for c, keys in categories.items() if any(k in lower for k in keys)), None)
        split[label or "other elementwise / reductions"] += seconds
    summary = {
        "steps": steps,
        "wall_s": wall,
        "gpu_busy_s": busy,
        "gpu_busy_fraction": busy / wall if wall else 0.0,
        "kernel_time_by_category_s": {k: round(v, 4) for k, v in sorted(split.items(), key=lambda kv: -kv[1])},
        "top_kernels_s": dict(sorted(((k[:120], round(v, 4)) for k, v in kernels.items()), key=lambda kv: -kv[1])[:20]),
    }
    tables = []
    for sort in ("device_time_total", "self_cpu_time_total") if device.type == "cuda" else ("self_cpu_time_total",):
        try:
            tables.append(f"sorted by {sort}\n" + prof.key_averages().table(sort_by=sort, row_limit=45))
        except Exception as err:  # a table is a nicety; the summary above is what the report uses
            tables.append(f"sorted by {sort}: {err!r}")
    path.write_text(json.dumps(summary, indent=2) + "\n\n" + "\n\n".join(tables))
    return summary


def capyft_check(module: Any, info: dict[str, Any], chunk: int) -> None:
    """At the end of training, while the model is still on the GPU: packed == alone on the real shape."""
    dtype = torch.float16 if module.hparams.compute_dtype == "float16" else torch.bfloat16
    device = module.device
    autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()
    try:
        info["packing_check"] = packing_check(module.model, device, autocast, chunk)
    except Exception as err:
        info["packing_check_error"] = repr(err)


@torch.no_grad()
def packing_check(model: Any, device: torch.device, autocast: Any, chunk: int) -> dict[str, Any]:
    """Loss of conversations packed into one row vs each alone, with HF's sdpa mask and with sdpa_packed."""
    from capyft.data import ChatCollator
    from capyft.modeling import PACKED_SDPA, causal_lm_loss_sum, use_packed_sdpa

    rows = make_conversations(3, seed=7, median=500, high=900)
    base = model.get_base_model()
    was = base.config._attn_implementation
    model.eval()  # no dropout: the same function in both layouts
    results = {}
    for attn in ("sdpa", PACKED_SDPA):
        base.config._attn_implementation = attn
        if attn == PACKED_SDPA:
            use_packed_sdpa(base)
        with autocast:
            packed, n_packed = causal_lm_loss_sum(model, to(ChatCollator(0, padding_free=True)(rows), device), chunk)
            alone = [causal_lm_loss_sum(model, to(ChatCollator(0)([r]), device), chunk) for r in rows]
        total = sum(float(s) for s, _ in alone)
        results[attn] = {
            "packed_loss_sum": float(packed),
            "alone_loss_sum": total,
            "relative_difference": abs(float(packed) - total) / max(abs(total), 1e-9),
            "tokens_equal": int(n_packed) == sum(int(n) for _, n in alone),
        }
    base.config._attn_implementation = was
    model.train()
    return results


def to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---- memory at fixed lengths ------------------------------------------------------------------------------------
def run_memory(name: str, device: torch.device, tiny: bool, *, precision: str, levers: dict[str, Any]) -> dict:
    """Peak memory of capyft at batch 1 x 2048 and 1 x 4096 tokens (3 optimizer steps each, one process)."""
    info: dict[str, Any] = {"stack": name, "precision": precision, "levers": levers}
    for length in (2048, 4096):
        allocated_before = fresh_memory(device)
        rows = fixed_length_rows(4, length if not tiny else length // 16, seed=length)
        result = run_capyft(
            f"{name}-{length}",
            rows,
            device,
            tiny,
            precision=precision,
            batch_size=1,
            padding_free=True,
            levers=levers,
            steps=3,
            warmup=1,
        )
        info[str(length)] = {
            "allocated_before_gib": allocated_before,
            **{k: result.get(k) for k in ("peak_allocated_gib", "peak_reserved_gib", "step_s_median", "build_s")},
            "trained_tokens_per_s": result.get("trained_tokens_per_s"),
            "allocated_after_build_gib": result.get("allocated_after_build_gib"),
        }
        save_partial(info)
    return info


# ---- generation -------------------------------------------------------------------------------------------------
def run_generation(name: str, device: torch.device, tiny: bool, *, levers: dict, profile: Path | None = None) -> dict:
    """200 test prompts (~300 tokens), greedy, 100 new tokens, through the LoRA-wrapped 4-bit model.

    Random weights never emit end-of-turn, so every answer runs to 100 tokens: the worst case.
    """
    from capyft import modeling
    from capyft.datamodule import PromptCollator

    count, new_tokens = (16, 8) if tiny else (200, 100)
    info: dict[str, Any] = {"stack": name, "prompts": count, "max_new_tokens": new_tokens, "levers": levers}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    model = build_random_4bit_model(llama_config(tiny), bnb_config(dtype), device, dtype, "sdpa")
    modeling.prepare_base_model(
        model, levers["attn_implementation"], levers["liger_kernels"], levers["offload_embeddings"]
    )
    lora = modeling.build_lora_config(16, 32, 0.05, "all-linear")
    model = modeling.wrap_with_lora(model, lora, gradient_checkpointing=True)
    info["build_s"] = time.perf_counter() - start
    tokenizer = bench_tokenizer()
    lengths = lognormal_lengths(count, 300, 0.5, 20, 1024, seed=11)
    generator = torch.Generator().manual_seed(12)
    prompts = [
        {
            "row": i,
            "prompt": [],
            "reference": "",
            "input_ids": torch.randint(0, 128000, (n,), generator=generator).tolist(),
        }
        for i, n in enumerate(lengths)
    ]
    prompts.sort(key=lambda p: -len(p["input_ids"]))  # longest first, as the test loader batches them
    info["prompt_tokens_median"] = statistics.median(lengths)
    generate, how = generator_fn(tokenizer)
    info["generate"] = how
    collate = PromptCollator(SPECIAL["<|finetune_right_pad_id|>"])
    warm = collate(prompts[:2])
    generate(model, warm["input_ids"].to(device), warm["attention_mask"].to(device), 4)
    for entry in GEN_BATCHES:
        # "64a": batch 64 under autocast (LoRA matmuls in 16 bits instead of fp32 casts), as training runs
        batch_size, autocast = int(entry.rstrip("a")), entry.endswith("a")
        context = torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext()
        fresh_memory(device)
        timer = Steps(device)
        timer.begin()
        produced = 0
        for start_row in range(0, len(prompts), batch_size):
            batch = collate(prompts[start_row : start_row + batch_size])
            with context:
                produced += generate(
                    model, batch["input_ids"].to(device), batch["attention_mask"].to(device), new_tokens
                )
        timer.sync()
        seconds = time.perf_counter() - timer._start
        info[f"batch_{entry}"] = {
            "seconds": seconds,
            "generated_tokens": produced,
            "tokens_per_s": produced / seconds,
            **memory(device),
        }
        print(f"[generate] batch {entry}: {seconds:.1f} s, {produced / seconds:.0f} tokens/s", flush=True)
        save_partial(info)
    if profile:  # one batch of 64 prompts, 8 new tokens: prefill plus 7 decode steps
        batch = collate(prompts[:64])
        profiler = Profiler(device, profile)
        profiler.start()
        generate(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), 8)
        info["profile"] = profiler.stop(1)
    del model
    return info


def run_micro(name: str, device: torch.device, tiny: bool) -> dict[str, Any]:
    """Kernel timings behind the step times: 4-bit dequantize and matmul, and attention over a packed row."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from torch.nn.attention import SDPBackend, sdpa_kernel

    info: dict[str, Any] = {"stack": name}
    if device.type != "cuda":
        return {**info, "skipped": "needs CUDA"}

    def seconds(fn: Any, reps: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    bf16 = torch.bfloat16
    weight = torch.randn(14336, 4096, dtype=bf16, device=device) * 0.02  # one MLP matrix of the 8B model
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    t = seconds(lambda: bnbf.dequantize_4bit(packed, state))
    info["dequantize_4bit_14336x4096_ms"] = t * 1e3
    info["dequantize_4bit_GBps"] = (weight.numel() * 2 + packed.numel()) / t / 1e9
    x = torch.randn(4096, 4096, dtype=bf16, device=device, requires_grad=True)

    def fwd_bwd(fn: Any) -> Any:
        def run() -> None:
            fn().sum().backward()
            x.grad = None

        return run

    info["linear_bf16_fwd_bwd_4096tok_ms"] = seconds(fwd_bwd(lambda: torch.nn.functional.linear(x, weight))) * 1e3
    info["matmul_4bit_fwd_bwd_4096tok_ms"] = (
        seconds(fwd_bwd(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))) * 1e3
    )
    with torch.no_grad():
        for rows in (1, 64, 200):
            x_decode = torch.randn(rows, 4096, dtype=bf16, device=device)
            t = seconds(lambda: bnb.matmul_4bit(x_decode, packed.t(), quant_state=state))  # noqa: B023
            info[f"matmul_4bit_decode_{rows}rows_ms"] = t * 1e3

    # attention over a packed row of 4 conversations (1024 tokens each), laid out as transformers lays it out
    def qkv(heads: int) -> torch.Tensor:
        return torch.randn(1, 4096, heads, 128, dtype=bf16, device=device).transpose(1, 2).requires_grad_()

    q, k, v = qkv(32), qkv(8), qkv(8)
    bounds = [0, 1024, 2048, 3072, 4096]
    same = torch.arange(4096, device=device) // 1024
    block = (same[:, None] == same[None, :]) & torch.ones(4096, 4096, dtype=torch.bool, device=device).tril()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    variants = {
        "one causal row, gqa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
        "per conversation, gqa (sdpa_packed)": lambda: torch.cat(
            [
                sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
                for a, b in zip(bounds[:-1], bounds[1:])
            ],
            dim=2,
        ),
        "dense block mask, repeat_kv (transformers sdpa)": lambda: sdpa(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=block[None, None]
        ),
    }
    attention = {}
    for label, fn in variants.items():

        def run(fn: Any = fn) -> None:
            fn().sum().backward()
            q.grad = k.grad = v.grad = None

        entry: dict[str, Any] = {"fwd_bwd_ms": seconds(run) * 1e3}
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    run()
                entry[backend] = "accepted"
            except Exception as err:
                entry[backend] = f"refused: {str(err)[:100]}"
        attention[label] = entry
    info["attention_packed_row_4x1024"] = attention
    return info


def generator_fn(tokenizer: Any) -> tuple[Any, str]:
    """capyft.evaluation.generate when it exists (the test hook's own path), else model.generate, same settings."""
    try:
        from capyft.evaluation import GenerationSettings, generate
    except ImportError:
        generate = None

    def with_capyft(model, input_ids, attention_mask, new_tokens):
        settings = GenerationSettings(max_new_tokens=new_tokens, do_sample=False)
        answers = generate(model, tokenizer, input_ids, attention_mask, settings, STOP_IDS, 0)
        return sum(a.num_tokens for a in answers)

    @torch.no_grad()
    def with_transformers(model, input_ids, attention_mask, new_tokens):
        model.eval()
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=STOP_IDS,
            pad_token_id=SPECIAL["<|finetune_right_pad_id|>"],
            use_cache=True,
        )
        return int(output[:, input_ids.shape[1] :].numel())

    if generate is not None:
        return with_capyft, "capyft.evaluation.generate"
    return with_transformers, "model.generate"


# ---- the stacks -------------------------------------------------------------------------------------------------
TRAIN = {"steps": 10, "warmup": 2}  # per training stack: 2 warm-up + 8 timed optimizer steps
STACKS = {
    # name: (runner, kwargs); in priority order: the driver runs them in this order until its time is up
    "capyft-bf16-fast": (
        "capyft",
        {"precision": "bf16-mixed", "batch_size": 4, "padding_free": True, "levers": LEAN, "profile": True},
    ),
    "trl-defaults": ("trl", {"batch_size": 4}),
    "trl-padfree-liger": ("trl", {"batch_size": 4, "padding_free": True, "liger": True, "profile": True}),
    "micro": ("micro", {}),
    "memory-fp16-lean": ("memory", {"precision": "16-mixed", "levers": LEAN}),
    "generate": ("generate", {"levers": LEAN, "profile": True}),
    "capyft-fp16-fast": ("capyft", {"precision": "16-mixed", "batch_size": 4, "padding_free": True, "levers": LEAN}),
    "trl-packing-liger": ("trl", {"batch_size": 2, "packing": True, "liger": True}),
    "capyft-bf16-packed": (
        "capyft",
        {"precision": "bf16-mixed", "batch_size": 4, "padding_free": True, "levers": PLAIN},
    ),
    "capyft-bf16-fast-sdpa": (
        "capyft",
        {
            "precision": "bf16-mixed",
            "batch_size": 4,
            "padding_free": True,
            "levers": {**LEAN, "attn_implementation": "sdpa"},
        },
    ),
    "capyft-bf16-fast-keepemb": (
        "capyft",
        {
            "precision": "bf16-mixed",
            "batch_size": 4,
            "padding_free": True,
            "levers": {**LEAN, "offload_embeddings": False},
        },
    ),
    "memory-bf16-lean": ("memory", {"precision": "bf16-mixed", "levers": LEAN}),
    "plain-loop": ("plain", {"batch_size": 4}),
    "memory-bf16-plain": ("memory", {"precision": "bf16-mixed", "levers": PLAIN}),
    "capyft-bf16-fast-nodropout": (
        "capyft",
        {"precision": "bf16-mixed", "batch_size": 4, "padding_free": True, "levers": LEAN, "lora_dropout": 0.0},
    ),
    "capyft-bf16-padded": (
        "capyft",
        {"precision": "bf16-mixed", "batch_size": 4, "padding_free": False, "levers": PLAIN},
    ),
    "capyft-bf16-fast-b8": (
        "capyft",
        {"precision": "bf16-mixed", "batch_size": 8, "padding_free": True, "levers": LEAN},
    ),
}


def run_stack(name: str, out: Path, device: torch.device, tiny: bool) -> dict[str, Any]:
    runner, kwargs = STACKS[name]
    kwargs = dict(kwargs)
    rows = make_conversations(
        160 if not tiny else 40, seed=0, **({"median": 60, "low": 16, "high": 128} if tiny else {})
    )
    train = TRAIN if not tiny else {"steps": 3, "warmup": 1}
    torch.manual_seed(0)
    fresh_memory(device)
    profile = out / f"profile-{name}.txt" if kwargs.pop("profile", False) else None
    if runner == "capyft":
        return run_capyft(name, rows, device, tiny, **kwargs, **train, profile=profile, check=profile is not None)
    if runner == "trl":
        return run_trl(name, rows, device, tiny, **kwargs, **train, profile=profile)
    if runner == "micro":
        return run_micro(name, device, tiny)
    if runner == "plain":
        return run_plain(name, rows, device, tiny, **kwargs, **train)
    if runner == "memory":
        return run_memory(name, device, tiny, **kwargs)
    if runner == "generate":
        return run_generation(name, device, tiny, **kwargs, profile=profile)
    raise ValueError(runner)


# ---- driver: one process per stack, a time budget, tables ------------------------------------------------------
def environment() -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    for package in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "liger-kernel",
        "lightning",
        "accelerate",
        "datasets",
        "triton",
    ):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    env["cpu_count"] = os.cpu_count()
    return env


def drive(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    names = [n for n in (args.only.split(",") if args.only else STACKS) if n]
    unknown = [n for n in names if n not in STACKS]
    if unknown:
        raise SystemExit(f"unknown stacks {unknown}; choose from {', '.join(STACKS)}")
    started = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(), "command": " ".join(sys.argv), "stacks": {}}
    print(json.dumps(report["environment"], indent=1), flush=True)
    for name in names:
        left = args.budget - (time.perf_counter() - started)
        if left < args.min_stack_s:
            report["stacks"][name] = {"stack": name, "skipped": f"time budget: {left:.0f} s left"}
            continue
        part = parts / f"{name}.json"
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--out",
            str(out),
            "--part",
            str(part),
            "--device",
            args.device,
            "--gen-batches",
            args.gen_batches,
        ] + (["--tiny"] if args.tiny else [])
        print(f"\n=== {name} ({left:.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            limit = args.stack_timeout * (1.5 if name == "generate" else 1.0)
            proc = subprocess.run(command, timeout=min(left, limit))
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = "timed out"
        result = json.loads(part.read_text()) if part.exists() else {"stack": name, "error": status}
        result["process_s"] = time.perf_counter() - t0
        report["stacks"][name] = result
        report["total_s"] = time.perf_counter() - started
        write_report(report, out)  # after every stack: a killed run still leaves its results
    print("\n" + markdown(report), flush=True)


def worker(args: argparse.Namespace) -> None:
    global PART, GEN_BATCHES
    PART = Path(args.part)
    GEN_BATCHES = args.gen_batches.split(",")
    device = torch.device(args.device)
    try:
        result = run_stack(args.worker, Path(args.out), device, args.tiny)
    except Exception as err:
        import traceback

        traceback.print_exc()
        result = {"stack": args.worker, "error": f"{type(err).__name__}: {err}"[:2000], **memory(device)}
    Path(args.part).write_text(json.dumps(result, indent=1, default=str))


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    env, stacks = report["environment"], report["stacks"]
    lines = [f"# capyft GPU benchmark, {env.get('date')}", ""]
    lines.append(
        f"{env.get('gpu', 'CPU')} ({env.get('nvidia_smi', '')}); torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, trl {env['trl']}, bitsandbytes {env['bitsandbytes']}, "
        f"liger-kernel {env['liger-kernel']}, lightning {env['lightning']}."
    )
    lines += ["", f"Command: `{report['command']}`", ""]
    lines += [
        "| stack | batch | precision | trained tokens/s | step s (median) | trained tokens/step | "
        "peak allocated GiB | peak reserved GiB | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in stacks.items():
        if name.startswith(("memory", "generate")):
            continue
        note = r.get("error") or r.get("skipped") or ""
        lines.append(
            f"| {name} | {fmt(r.get('batch_size'))} | {r.get('precision', 'bf16')} | "
            f"{fmt(r.get('trained_tokens_per_s'))} | {fmt(r.get('step_s_median'), 3)} | "
            f"{fmt(r.get('trained_tokens_per_step'))} | {fmt(r.get('peak_allocated_gib'), 2)} | "
            f"{fmt(r.get('peak_reserved_gib'), 2)} | {note[:80]} |"
        )
    ours = stacks.get("capyft-bf16-fast", {}).get("trained_tokens_per_s")
    for other, target in (("trl-defaults", 2.0), ("trl-padfree-liger", 1.3), ("trl-packing-liger", 1.3)):
        theirs = stacks.get(other, {}).get("trained_tokens_per_s")
        if ours and theirs:
            lines.append(f"\ncapyft-bf16-fast / {other}: {ours / theirs:.2f}x (target >= {target}x)")
    memory_rows = [(n, r) for n, r in stacks.items() if n.startswith("memory")]
    if memory_rows:
        lines += [
            "",
            "| memory run | tokens | peak allocated GiB | peak reserved GiB | step s | note |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in memory_rows:
            for length, target in (("2048", 6.5), ("4096", 7.5)):
                m = r.get(length, {})
                note = r.get("error") or r.get("skipped") or f"target reserved <= {target}"
                lines.append(
                    f"| {name} | 1 x {length} | {fmt(m.get('peak_allocated_gib'), 2)} | "
                    f"{fmt(m.get('peak_reserved_gib'), 2)} | {fmt(m.get('step_s_median'), 3)} | {note[:80]} |"
                )
    generation = stacks.get("generate", {})
    if generation:
        lines += [
            "",
            "| generation (200 prompts, greedy, 100 new tokens each) | seconds | tokens/s | peak reserved GiB |",
            "| --- | --- | --- | --- |",
        ]
        for key, g in generation.items():
            if key.startswith("batch_"):
                lines.append(
                    f"| batch {key[6:]} | {fmt(g['seconds'], 1)} | {fmt(g['tokens_per_s'])} | "
                    f"{fmt(g.get('peak_reserved_gib'), 2)} |"
                )
        if generation.get("error") or generation.get("skipped"):
            lines.append(f"| {generation.get('error') or generation.get('skipped')} | | | |")
    for name, r in stacks.items():
        profile = r.get("profile")
        if not profile or "wall_s" not in profile:
            continue
        lines += [
            "",
            f"Profile of {name} ({profile['steps']} step(s)): wall {profile['wall_s']:.2f} s, GPU kernels "
            f"{profile['gpu_busy_s']:.2f} s ({profile['gpu_busy_fraction']:.0%} busy).",
        ]
        lines += [f"- {k}: {v:.3f} s" for k, v in profile["kernel_time_by_category_s"].items() if v > 0]
    micro = stacks.get("micro", {})
    if micro and not micro.get("error"):
        lines += ["", "Kernel timings (micro):"]
        lines += [f"- {k}: {v}" for k, v in micro.items() if k not in ("stack", "process_s")]
    check = stacks.get("capyft-bf16-fast", {}).get("packing_check")
    if check:
        lines += [
            "",
            "Packed vs alone (8B shape, loss sum of 3 conversations): "
            + ", ".join(f"{k}: relative difference {v['relative_difference']:.1e}" for k, v in check.items()),
        ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for bench.json, bench.md, profile.txt")
    parser.add_argument("--only", default="", help=f"comma-separated stacks (default: all): {', '.join(STACKS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model: checks the code paths")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds for all stacks (skips the rest)")
    parser.add_argument("--stack-timeout", type=float, default=150.0, help="seconds per stack process")
    parser.add_argument("--min-stack-s", type=float, default=25.0, help="start no stack with less time left")
    parser.add_argument("--gen-batches", default="200,64", help="generation batch sizes, comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
