"""Answering prompts: one generation path and one settings type for ``test``, ``predict`` and ``chat``.

Plain functions over a Hugging Face model and tokenizer; no Lightning. Prompts are left-padded batches; answers are
the newly generated tokens only, cut at the first end-of-turn or end-of-sequence token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GenerationSettings:
    """How the test prompts are answered (``--model.generation.*``).

    Args:
        max_new_tokens: most tokens generated per answer (the reference used 100).
        do_sample: False: greedy, deterministic (default); True: sample with ``temperature``, ``top_p``, ``top_k``.
        temperature: softmax temperature when sampling (the reference sampled with 0.6).
        top_p: nucleus sampling mass when sampling (the reference used 0.9).
        top_k: keep the k likeliest tokens when sampling; 0 keeps all (50 is transformers' default, which the
            reference ran with).
        repetition_penalty: 1.0 is none; set explicitly so a model's own generation config cannot change it.
        seed: seed of sampling; each batch is seeded with ``seed`` + its first row id, so an answer does not depend
            on which batches ran before it.
    """

    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class Generated:
    """One answer: its text (new tokens only, special tokens skipped), how many tokens were generated (the stop
    token included) and whether it ended at an end-of-turn / eos token rather than at ``max_new_tokens``."""

    text: str
    num_tokens: int
    stopped: bool


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    stop_ids: list[int],
    seed: int = 0,
    streamer: Any = None,
) -> list[Generated]:
    """Answers a batch of left-padded prompts with the KV cache; one :class:`Generated` per row, in row order.

    The model runs in eval mode (training-mode gradient checkpointing would turn the cache off) with
    ``use_cache=True``, which training configs switch off in ``model.config``. Each answer is cut at its first
    ``stop_ids`` token, so only new tokens up to the end of the turn are decoded.

    Args:
        model: a causal LM (PEFT-wrapped or not).
        tokenizer: its tokenizer.
        input_ids: ``(batch, length)`` prompts, padded on the left.
        attention_mask: 1 on prompt tokens, 0 on padding.
        settings: decoding settings.
        stop_ids: the ids that end an answer (:func:`stop_ids`).
        seed: seeds sampling (ignored when greedy); the global RNG state is restored afterwards.
        streamer: a transformers streamer (e.g. ``TextStreamer``) that receives the tokens as they are generated
            (batch of one; ``chat`` prints the answer with it).

    Raises:
        ValueError: the prompts are padded on the right, or ``max_new_tokens`` is not positive.
    """
    if settings.max_new_tokens < 1:
        raise ValueError(f"generation.max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be padded on the left for batched generation (attention_mask ends in 0)")
    sampling = {}
    if settings.do_sample:
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    was_training = model.training
    model.eval()
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _autocast(model, input_ids.device):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                repetition_penalty=settings.repetition_penalty,
                eos_token_id=list(stop_ids),
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                streamer=streamer,
                **sampling,
            )
    finally:
        model.train(was_training)
    return [cut_at_stop(tokenizer, row, stop_ids) for row in output[:, input_ids.shape[1] :].tolist()]


def _autocast(model: Any, device: torch.device) -> Any:
    """Autocast to the model's 16-bit compute dtype on CUDA: the LoRA weights are float32, and without it every
    adapter matmul casts its input up and its output down (those casts dominated a profile of 8B generation on an
    H200). A no-op on CPU and for float32 models."""
    dtype = getattr(model.config, "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def stop_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The ids that end an answer: the chat template's end-of-turn and eos (:func:`capyft.chat.end_of_turn_ids`)
    plus the model's own end ids (``model.generation_config.eos_token_id``, an int or a list).

    Llama-3.1 lists ``<|end_of_text|>`` (128001), ``<|eom_id|>`` (128008) and ``<|eot_id|>`` (128009) in its generation
    config; the template alone gives only ``<|eot_id|>``, so an answer that ends in ``<|eom_id|>`` would run on to
    ``max_new_tokens``. ``test``, ``predict`` and ``chat`` all stop with this list.
    """
    from capyft.chat import end_of_turn_ids

    ids = set(end_of_turn_ids(tokenizer))
    config = getattr(model, "generation_config", None) if model is not None else None
    own = getattr(config, "eos_token_id", None)
    ids.update(own if isinstance(own, (list, tuple)) else [own] if own is not None else [])
    return sorted(int(i) for i in ids)


def cut_at_stop(tokenizer: Any, ids: list[int], stop_ids: list[int]) -> Generated:
    """Decodes generated ``ids`` up to the first stop token (special tokens dropped, stripped).

    ``num_tokens`` counts the stop token when there is one; ``stopped`` says whether the answer ended at end-of-turn
    rather than at ``max_new_tokens``.
    """
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(ids) if token in stops), None)
    kept = ids if end is None else ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Generated(text, len(ids) if end is None else end + 1, end is not None)


def answer_batch(
    model: Any, tokenizer: Any, batch: dict[str, Any], settings: GenerationSettings, compare_base: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Answers a prompt batch (``PromptCollator``'s: ids, mask, rows, prompts, references) with the model and, with
    ``compare_base``, again with its adapter disabled; one record per prompt and the number of tokens generated.

    Sampling is seeded with ``settings.seed`` plus the batch's first row id, so an answer does not depend on which
    batches ran before it.
    """
    args = (tokenizer, batch["input_ids"], batch["attention_mask"], settings)
    stops, seed = stop_ids(tokenizer, model), settings.seed + min(batch["row"])
    tuned = generate(model, *args, stops, seed)
    base: list[Any] = [None] * len(tuned)
    if compare_base:
        with model.disable_adapter():
            base = generate(model, *args, stops, seed)
    fields = zip(batch["row"], batch["prompt"], batch["reference"], tuned, base)
    records = [
        {"row": row, "prompt": prompt, "reference": reference, "prediction": t.text}
        | ({"base_prediction": b.text} if b else {})
        | {"num_tokens": t.num_tokens, "stopped": t.stopped}
        | ({"base_num_tokens": b.num_tokens, "base_stopped": b.stopped} if b else {})
        for row, prompt, reference, t, b in fields
    ]
    return records, sum(g.num_tokens for g in [*tuned, *base] if g)
