"""Answering prompts: one generation path and one settings type for ``test``, ``predict`` and ``chat``.

Plain functions over a Hugging Face model and tokenizer; no Lightning. Prompts are left-padded batches; answers are
the newly generated tokens only, cut at the first end-of-turn or end-of-sequence token.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Prompt tokens (left padding included) per forward pass of the prefill. A batch's prompts are encoded in sub-batches
# of similar length, so the prefill computes little padding whatever the spread of lengths in the batch; the
# answers are then decoded for the whole batch at once. 16k tokens keep a Llama-3.1-8B prefill pass near the
# GPU's speed and its transients at ~2.3 GiB (:class:`capyft.sizing.GenerationMemory` counts them).
PREFILL_TOKENS = 16384


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
        cuda_graph: greedy batches on a CUDA GPU replay each decode step as one CUDA graph (:func:`decode_greedy`);
            False launches every kernel of every step from Python, as transformers' ``generate`` does.
    """

    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0
    cuda_graph: bool = True


# Passed to transformers' generate with every batch, so a model's own generation config cannot turn greedy decoding or
# sampling into beam search or return several sequences a prompt (GenerationSettings has neither). Contrastive and
# DoLa search, which transformers 5 moved to the hub and marks for removal from its config, are not overridden.
_ONE_SEQUENCE_SEARCH = {"num_beams": 1, "num_return_sequences": 1}


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
    ``use_cache=True``, which training configs switch off in ``model.config``. A batch of several prompts is
    prefilled in sub-batches of similar length (:func:`prefill`), then decoded together: greedy answers by
    :func:`decode_greedy` (on a CUDA GPU one CUDA graph a step, ``settings.cuda_graph``), sampled ones and models it
    does not apply to (:func:`_greedy_loop_applies`) by transformers' ``generate``. Each answer is cut at its first
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
    rows = len(input_ids)
    greedy = rows > 1 and streamer is None and _greedy_loop_applies(model, settings)
    graph = greedy and settings.cuda_graph and input_ids.is_cuda
    try:
        with torch.random.fork_rng(devices=devices), _autocast(model, input_ids.device, cache=not graph):
            torch.manual_seed(seed)
            filled = _prefilled(model, input_ids, attention_mask, None, settings.max_new_tokens) if rows > 1 else None
            if filled is not None and greedy:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
                new = decode_greedy(model, filled, input_ids, attention_mask, settings, stop_ids, pad, graph)
            else:
                cache = _roomy_cache(filled, input_ids.shape[1]) if filled is not None else None
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
                    **_ONE_SEQUENCE_SEARCH,
                    **sampling,
                    **dict([cache] if cache else []),  # the prefilled cache under the keyword generate takes
                )
                new = output[:, input_ids.shape[1] :]
    finally:
        model.train(was_training)
    return [cut_at_stop(tokenizer, row, stop_ids) for row in new.tolist()]


def _autocast(model: Any, device: torch.device, cache: bool = True) -> Any:
    """Autocast to the model's 16-bit compute dtype on CUDA: the LoRA weights are float32, and without it every
    adapter matmul casts its input up and its output down (those casts dominated a profile of 8B generation on an
    H200). A no-op on CPU and for float32 models. ``cache=False`` for CUDA graphs, which must not capture the casts
    autocast caches (PyTorch's CUDA graph notes)."""
    dtype = getattr(model.config, "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=cache)


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_tokens: int | None = None,
    room: int = 0,
) -> tuple[str, Any] | None:
    """The KV cache of every prompt token but the last, computed in sub-batches of similar length, laid out as
    transformers' ``generate`` would lay out the cache of the whole left-padded batch.

    transformers prefills a batch in one pass over the batch padded to its longest prompt: for Capybara-like test
    prompts (a few hundred tokens each, the longest over a thousand) most of that pass computes padding. Here the
    rows are sorted by length and encoded in passes of at most ``max_tokens`` tokens, each padded only to its own
    longest prompt, with the position ids ``generate`` gives them (the count of real tokens before each). Their keys
    and values are copied right-aligned into one cache as long as the batch's prompt minus one token, zeros at the
    padding, with ``room`` for the answer behind it; ``generate`` (or :func:`decode_greedy`) then feeds each row's
    last prompt token and decodes the whole batch at once. Padding aside it is the same arithmetic: in float32 on a
    CPU the keys and values match ``generate``'s own prefill to 1e-5 and the answers are the same tokens
    (``tests/test_evaluation.py``, ``tests/test_families.py``); in 16 bits on a GPU, matmuls over other batch shapes
    round differently (keys and values within 1e-2 for a 4-bit model in fp16, ``tests/test_gpu.py``), as any change
    of batch does.

    Args:
        model: the causal LM, peft-wrapped or not, in eval mode, under the autocast ``generate`` runs in.
        input_ids, attention_mask: the left-padded batch.
        max_tokens: most tokens (padding included) per pass, ``PREFILL_TOKENS`` by default; a longer prompt gets a
            pass of its own.
        room: tokens of room left in each layer's cache for the answer (``max_new_tokens``): decoding writes
            into it in place instead of copying the cache at every token.

    Returns:
        ``(name, cache)``: the keyword ``generate`` takes the cache by (``cache``, or ``past_key_values`` before
        transformers renamed it) and a ``DynamicCache``; None where this does not apply and ``generate`` prefills
        as usual: prompts of one token, a model whose cache is not one full-attention layer per decoder layer
        (sliding windows, hybrid or recurrent layers), a decoder it cannot call on its own, FSDP-wrapped modules.
    """
    filled = _prefilled(model, input_ids, attention_mask, max_tokens, room)
    return None if filled is None else _roomy_cache(filled, input_ids.shape[1])


# What a prefill leaves: the cache keyword, a cache factory, and per layer the keys and values buffers
# ``(rows, key heads, prompt - 1 + room, dim)``, right-aligned, zeros at padding and in the room.
Prefilled = tuple[str, Any, list[torch.Tensor], list[torch.Tensor]]


def _prefilled(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_tokens: int | None, room: int
) -> Prefilled | None:
    """:func:`prefill`'s passes, returning the buffers rather than a cache (:func:`decode_greedy` wraps them in
    a cache of its own)."""
    target = _prefill_target(model)
    rows, length = input_ids.shape
    if target is None or length < 2:
        return None
    decoder, name, new_cache = target
    lengths = attention_mask.sum(-1).tolist()
    order = sorted(range(rows), key=lengths.__getitem__)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for chunk in _prefill_chunks(order, lengths, max_tokens or PREFILL_TOKENS):
        longest = max(lengths[row] for row in chunk)
        if longest < 2:
            continue  # these rows have only the token generate feeds: no cache entry
        index = torch.tensor(chunk, device=input_ids.device)
        start = length - longest
        ids, mask = input_ids[index, start:-1], attention_mask[index, start:-1]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        sub = new_cache()
        decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: sub})
        keep = mask.bool()[:, None, :, None]  # padding slots get zeros, never an unmasked value
        for i, layer in enumerate(sub.layers):
            if i == len(keys):
                shape = (rows, layer.keys.shape[1], length - 1 + room)
                keys.append(layer.keys.new_zeros((*shape, layer.keys.shape[-1])))
                values.append(layer.values.new_zeros((*shape, layer.values.shape[-1])))
            keys[i][index, :, start : length - 1] = torch.where(keep, layer.keys, 0)
            values[i][index, :, start : length - 1] = torch.where(keep, layer.values, 0)
        del sub
    return (name, new_cache, keys, values) if keys else None


def _roomy_cache(filled: Prefilled, length: int) -> tuple[str, Any]:
    """``(cache keyword, DynamicCache)`` over prefilled buffers, for transformers' ``generate`` to decode from."""
    name, new_cache, keys, values = filled
    cache = new_cache()
    cache.layers[:] = [_roomy_layer_class()(k, v, length - 1) for k, v in zip(keys, values)]
    return name, cache


@functools.cache
def _roomy_layer_class() -> type:
    """A transformers ``DynamicLayer`` whose keys and values are views of buffers with room for the answer.

    ``DynamicLayer`` appends a token with ``torch.cat``, a copy of the layer's whole cache at every new token: for a
    batch of long prompts, twice the cache's bytes moved per step besides the attention's one read. Here a new token
    is written into the room left after the prompt and the views grow; once the room is used up, or when
    transformers replaces the tensors itself (cropping, reordering), the layer grows by ``torch.cat`` as before.
    """
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            super().__init__()
            self._buffers, self._length = (keys, values), length
            self.device, self.is_initialized = keys.device, True
            self.keys, self.values = keys[..., :length, :], values[..., :length, :]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            buffers, end = self._buffers, self._length + key_states.shape[-2]
            kept = buffers is not None and self.keys is not None and self.keys.data_ptr() == buffers[0].data_ptr()
            kept = kept and self.keys.shape[-2] == self._length and self.keys.shape[0] == buffers[0].shape[0]
            if not kept or end > buffers[0].shape[-2]:
                self._buffers = None  # replaced, cropped or full: from here on, grow as transformers does
                return super().update(key_states, value_states, *args, **kwargs)
            buffers[0][..., self._length : end, :] = key_states
            buffers[1][..., self._length : end, :] = value_states
            self._length = end
            self.keys, self.values = buffers[0][..., :end, :], buffers[1][..., :end, :]
            return self.keys, self.values

    return RoomyLayer


# Generation settings that add logits processors to transformers' greedy search: where a model's generation config
# sets one, its answers come from ``generate`` itself rather than from decode_greedy's plain argmax. (Settings that
# would turn the search into another one are overridden for every path: _ONE_SEQUENCE_SEARCH.)
_PROCESSOR_FIELDS = (
    "min_length",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "guidance_scale",
    "watermarking_config",
)
# Decode steps run eagerly before a CUDA graph is captured (PyTorch's CUDA graph notes: warm up on a side stream)
GRAPH_WARMUP_STEPS = 2
# Decode steps between checks (one host sync) of whether every row has stopped
STOP_CHECK_EVERY = 8


def _greedy_loop_applies(model: Any, settings: GenerationSettings) -> bool:
    """Whether :func:`decode_greedy` gives ``generate``'s answers: greedy with no repetition penalty, an SDPA
    attention that takes a boolean ``(rows, 1, 1, keys)`` mask, and no logits processor in the model's own
    generation config."""
    if settings.do_sample or settings.repetition_penalty != 1.0:
        return False
    from capyft.attention import PACKED_ATTENTION

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", *PACKED_ATTENTION):
        return False
    config = getattr(model, "generation_config", None)
    return not any(getattr(config, field, None) not in (None, 0, False, [], 1.0) for field in _PROCESSOR_FIELDS)


@torch.no_grad()
def decode_greedy(
    model: Any,
    filled: Prefilled,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    stop_ids: list[int],
    pad_id: int,
    graph: bool = False,
) -> torch.Tensor:
    """Greedy answers of a prefilled batch over a cache of fixed shape: ``(rows, steps)`` new token ids, ``pad_id``
    after a row's stop token, ``steps <= max_new_tokens``.

    The same decoding as transformers' greedy ``generate`` (argmax of the last logits; a row that has stopped gets
    ``pad_id`` and is still fed through the model; the batch ends when every row has stopped), over a cache whose
    shapes never change: each layer's keys and values are the prefill's buffers, a new token is written at the slot
    ``slot`` (a device tensor) and attention reads the whole buffer under a boolean mask that opens one slot per
    step. Nothing a step computes depends on a Python value that changes between steps, so on a CUDA GPU (``graph``)
    the step after the embedding lookup is captured once as a CUDA graph and replayed: one launch a step instead of
    thousands of kernels from Python (for an 8B model, seven 4-bit linear layers with adapters in each of 32
    layers). The answers equal ``generate``'s on a CPU in float32 (``tests/test_evaluation.py``,
    ``tests/test_families.py``); a captured step computes what the eager step does (``tests/test_gpu.py``).
    """
    name, new_cache, keys, values = filled
    rows, length = input_ids.shape
    device, steps = input_ids.device, settings.max_new_tokens
    slot = torch.full((1,), length - 1, dtype=torch.long, device=device)  # where the fed token's keys go
    visible = torch.zeros((rows, 1, 1, keys[0].shape[-2]), dtype=torch.bool, device=device)
    visible[:, 0, 0, : length - 1] = attention_mask[:, :-1].bool()
    position = attention_mask.long().sum(-1, keepdim=True) - 1  # generate's position ids: real tokens before
    embed = model.get_input_embeddings()
    embeds = embed(input_ids[:, -1:])  # fed as embeddings: a lookup in CPU memory (offload_embeddings) is no graph
    cache = new_cache()
    cache.layers[:] = [_slot_layer_class()(k, v, slot) for k, v in zip(keys, values)]
    stops = torch.tensor(stop_ids, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    out = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        visible.index_fill_(-1, slot, True)
        inputs = {"inputs_embeds": embeds, "attention_mask": visible, "position_ids": position, name: cache}
        return model(**inputs, use_cache=True).logits[:, -1].argmax(-1)

    run, side, done = step, None, steps
    if graph:  # warm-up steps on a side stream, then capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
    for i in range(steps):
        if side is not None and i == GRAPH_WARMUP_STEPS:
            torch.cuda.current_stream(device).wait_stream(side)
            run, side = _captured(step) or step, None  # a step that cannot be captured is launched as before
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            chosen = torch.where(stopped, pad_id, run())
            out[:, i] = chosen
            stopped |= torch.isin(chosen, stops)
            if i + 1 < steps:
                embeds.copy_(embed(chosen[:, None]))
            position.add_(1)
            slot.add_(1)
            if (i + 1) % STOP_CHECK_EVERY == 0 and bool(stopped.all()):
                done = i + 1
                break
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    return out[:, :done]


def _captured(step: Any) -> Any:
    """``step`` captured as a CUDA graph: a function that replays it and returns the captured output tensor; None,
    with a warning, where capturing fails."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = step()
    except RuntimeError as error:
        log.warning("generation: decode steps run without a CUDA graph, capturing failed: %s", error)
        return None

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


@functools.cache
def _slot_layer_class() -> type:
    """A transformers ``DynamicLayer`` of fixed shape for :func:`decode_greedy`: a new token's keys and values are
    written at ``slot`` (a one-element device tensor) and the whole buffers are returned."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values, self.slot = keys, values, slot
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.keys.index_copy_(-2, self.slot, key_states)
            self.values.index_copy_(-2, self.slot, value_states)
            return self.keys, self.values

    return SlotLayer


def _prefill_chunks(order: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive rows of ``order`` (shortest prompt first) in passes whose padded size, rows x longest prompt,
    stays within ``max_tokens``; a prompt longer than that gets a pass of its own."""
    chunks: list[list[int]] = []
    for row in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[row] <= max_tokens:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


def _prefill_target(model: Any) -> tuple[Any, str, Any] | None:
    """``(decoder, cache keyword, cache factory)`` for :func:`prefill`, or None where it does not apply."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base or getattr(base.config, "is_encoder_decoder", False):
        return None
    if any(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in model.modules()):
        return None  # FSDP's units gather their shards in forward hooks of the modules it wrapped
    parameters = inspect.signature(decoder.forward).parameters
    name = next((n for n in ("cache", "past_key_values") if n in parameters), None)
    if name is None or "position_ids" not in parameters:
        return None
    try:
        probe = DynamicCache(config=base.config)
    except (TypeError, ValueError):
        return None
    layers = getattr(probe, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None  # sliding-window, chunked, hybrid or recurrent layers: generate's own prefill
    return decoder, name, lambda: DynamicCache(config=base.config)


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
