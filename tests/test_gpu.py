"""CUDA-only checks of the levers that run only on a GPU: the one-call varlen flash attention for packed rows and
regional compile over it (with bitsandbytes 4-bit layers). Skipped without a CUDA GPU (CI has none); run them on
one with ``python -m pytest tests/test_gpu.py``.

Each lever is compared with the path it replaces, which the CPU suite tests against each conversation alone: the
varlen kernel with the per-conversation loop (``sdpa_packed_loop``), compiled layers with eager ones.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import saved_activation_bytes
from test_packing import conversations, load_bench, tiny_llama_config

from capyft.attention import PACKED_SDPA, PACKED_SDPA_LOOP, varlen_usable
from capyft.batching import ChatCollator
from capyft.levers import compile_decoder_layers, prepare_base_model
from capyft.modeling import build_lora_config, causal_lm_loss_sum, wrap_with_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LENGTHS = [37, 300, 5, 129]


def reference_attention(q, k, v, lengths):
    """Causal attention per sequence in float32, grouped heads expanded: ``(tokens, heads, dim)`` in and out."""
    outputs, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
        start += n
    return torch.cat(outputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("longest", ["exact", "row"])
def test_varlen_attention_equals_causal_attention_per_sequence(dtype, longest):
    """One flash call over a packed batch equals each sequence's own causal attention, grouped-query heads and
    gradients included, whether ``max_length`` is the longest sequence or the whole row (what compiled layers pass)."""
    torch.manual_seed(0)
    total = sum(LENGTHS)
    q = torch.randn(total, 8, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(total, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(total, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    assert varlen_usable(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    max_length = max(LENGTHS) if longest == "exact" else total
    out, _ = torch.ops.capyft.varlen_causal_attention(q, k, v, cu, max_length, 64**-0.5)
    grad = torch.randn_like(out)
    (out.float() * grad.float()).sum().backward()
    got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, LENGTHS)
    (ref * grad.float()).sum().backward()
    want = [ref.detach(), *(t.grad for t in leaves)]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


def tiny_lora_model(
    attn: str, dtype: torch.dtype = torch.float16, four_bit: bool = False, dropout: float = 0.0, checkpointing=True
):
    """A tiny random Llama on the GPU (head size 64, grouped heads) with LoRA, loaded the way capyft loads one."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = tiny_llama_config(hidden_size=256, intermediate_size=512, max_position_embeddings=1024)
    torch.manual_seed(0)
    if four_bit:
        bench = load_bench()
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = bench.build_random_4bit_model(config, quantization, "cuda", dtype, attn)
    else:
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config).to("cuda", dtype)
    prepare_base_model(model, attn)
    return wrap_with_lora(model, build_lora_config(r=8, alpha=16, dropout=dropout), checkpointing).train()


def copy_adapter(source, target) -> None:
    """Gives ``target`` the LoRA weights of ``source`` (the frozen bases are built from the same seed)."""
    adapter = {k: v for k, v in source.state_dict().items() if "lora_" in k}
    assert adapter and not target.load_state_dict(adapter, strict=False).unexpected_keys


def packed_batch(count: int, seed: int, cut: int = 0) -> dict[str, torch.Tensor]:
    rows = [{k: r[k][: len(r[k]) - cut] for k in ("input_ids", "labels")} for r in conversations(seed)[:count]]
    batch = ChatCollator(pad_id=0, padding_free=True)(rows)
    return {k: v.cuda() for k, v in batch.items()}


def loss_and_grads(model, batch):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss, _ = causal_lm_loss_sum(model, batch, 0)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(a, b, rtol=2e-3):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=1e-3)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        scale = float(b[1][name].abs().max()) + 1e-6
        assert float((a[1][name] - b[1][name]).abs().max()) <= 3e-2 * scale, name


def test_packed_training_step_equals_with_varlen_and_per_conversation_attention():
    """The default ``sdpa_packed`` (one varlen call per layer on the GPU) trains like ``sdpa_packed_loop``: the same
    loss and LoRA gradients on a packed row of four conversations, in fp16 autocast."""
    varlen, loop = tiny_lora_model(PACKED_SDPA), tiny_lora_model(PACKED_SDPA_LOOP)
    copy_adapter(varlen, loop)
    batch = packed_batch(4, seed=1)
    assert_same_training(loss_and_grads(varlen, batch), loss_and_grads(loop, batch))


def test_4bit_training_step_is_the_same_without_checkpointing():
    """``gradient_checkpointing: auto`` turns recomputation off on large GPUs: with bitsandbytes 4-bit layers, LoRA
    dropout and fp16 autocast the loss and gradients are those of the checkpointed step (the same dropout masks)."""
    on = tiny_lora_model(PACKED_SDPA, four_bit=True, dropout=0.1, checkpointing=True)
    off = tiny_lora_model(PACKED_SDPA, four_bit=True, dropout=0.1, checkpointing=False)
    copy_adapter(on, off)
    batch = packed_batch(4, seed=1)
    steps = []
    for model in (on, off):
        torch.manual_seed(0)
        steps.append(loss_and_grads(model, batch))
    torch.testing.assert_close(steps[0][0], steps[1][0], rtol=1e-4, atol=1e-4)
    assert steps[0][1].keys() == steps[1][1].keys() and steps[0][1]
    for name in steps[0][1]:
        torch.testing.assert_close(steps[1][1][name], steps[0][1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_activation_estimate_bounds_what_4bit_layers_keep_under_autocast():
    """The estimate ``gradient_checkpointing: auto`` decides from, on the path it decides for: 4-bit layers with
    LoRA dropout under fp16 autocast, varlen attention. Per token it neither undercounts what autograd keeps for
    backward nor overcounts it by much."""
    from capyft.sizing import activation_bytes_per_token, adapter_input_bytes

    model = tiny_lora_model(PACKED_SDPA, four_bit=True, dropout=0.05, checkpointing=False)

    def kept_bytes(batch) -> int:
        def forward():
            with torch.autocast("cuda", torch.float16):
                model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)

        return saved_activation_bytes(model, forward)

    small, large = packed_batch(2, seed=1), packed_batch(4, seed=1)
    tokens = large["input_ids"].numel() - small["input_ids"].numel()
    per_token = (kept_bytes(large) - kept_bytes(small)) / tokens
    config = model.config
    estimate = activation_bytes_per_token(config, False, adapter_input_bytes(True, 0.05, 2), in_flight=False)
    print(f"kept {per_token:.0f} bytes a token, estimated {estimate}")
    assert per_token <= estimate <= 1.4 * per_token, (per_token, estimate)


@pytest.mark.parametrize("four_bit", [False, True], ids=["16-bit", "4-bit"])
def test_compiled_layers_train_like_eager_without_recompiling(four_bit):
    """Regional compile (inductor) over varlen attention and, with ``four_bit``, bitsandbytes 4-bit linears: the
    loss and gradients of eager layers, and one graph for rows of new lengths and new numbers of conversations."""
    import torch._dynamo

    eager, compiled = tiny_lora_model(PACKED_SDPA, four_bit=four_bit), tiny_lora_model(PACKED_SDPA, four_bit=four_bit)
    copy_adapter(eager, compiled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_decoder_layers(compiled) == 2
    for count, seed in [(3, 0), (4, 1), (2, 2), (4, 3)]:
        batch = packed_batch(count, seed, cut=seed * 3)
        assert_same_training(loss_and_grads(compiled, batch), loss_and_grads(eager, batch))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def trained_looking_4bit_model():
    """``tiny_lora_model`` in 4-bit, eval mode, with a trained-looking adapter (B starts at zero), so the model with
    its adapter and without it differ."""
    model = tiny_lora_model(PACKED_SDPA, four_bit=True).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def left_padded_prompts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths`` tokens, left-padded into one batch on the GPU: ``(input_ids, attention_mask)``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 250, (n,), generator=generator)
        mask[row, -n:] = 1
    return ids.cuda(), mask.cuda()


def test_prefill_in_passes_matches_one_pass_in_4_bit_for_both_models():
    """The test hook's prefill on the GPU (bitsandbytes 4-bit, fp16 autocast), with the adapter and with it disabled
    (``compare_base``): the keys and values at every real token are the ones the one-pass prefill gives."""
    from helpers import assert_prefill_matches_one_pass

    from capyft.generation import _autocast

    model = trained_looking_4bit_model()
    ids, mask = left_padded_prompts([300, 37, 129, 5, 64, 200], seed=3)
    with _autocast(model, torch.device("cuda")):
        assert assert_prefill_matches_one_pass(model, ids, mask, 400, tolerance=1e-2) >= 3
        with model.disable_adapter():
            assert assert_prefill_matches_one_pass(model, ids, mask, 400, tolerance=1e-2) >= 3


@pytest.mark.parametrize("offload", [False, True], ids=["embeddings-on-gpu", "offload_embeddings"])
def test_cuda_graph_decode_steps_give_the_eager_steps_tokens_for_both_models(monkeypatch, offload):
    """The test hook's decode on the GPU (bitsandbytes 4-bit, fp16 autocast), with the adapter and with it disabled,
    the input embeddings on the GPU or in CPU memory (the reference config's offload_embeddings): the steps
    replayed from one captured CUDA graph choose the tokens the same steps launched from Python choose, rows
    stopping mid-batch included."""
    from capyft import generation
    from capyft.levers import offload_input_embeddings

    model = trained_looking_4bit_model()
    assert not offload or offload_input_embeddings(model.get_base_model())
    ids, mask = left_padded_prompts([90, 13, 57, 140, 33], seed=5)
    captured = []
    capture = generation._captured
    monkeypatch.setattr(generation, "_captured", lambda step: captured.append(capture(step)) or captured[-1])

    def decode(stops: list[int], graph: bool) -> torch.Tensor:
        settings = generation.GenerationSettings(max_new_tokens=24)
        with generation._autocast(model, ids.device, cache=not graph), torch.no_grad():
            filled = generation._prefilled(model, ids, mask, 2048, settings.max_new_tokens)
            return generation.decode_greedy(model, filled, ids, mask, settings, stops, 0, graph)

    for adapter in (True, False):
        with model.disable_adapter() if not adapter else contextlib.nullcontext():
            eager = decode([-1], graph=False)
            assert len({tuple(row) for row in eager.tolist()}) > 1
            torch.testing.assert_close(decode([-1], graph=True), eager, rtol=0, atol=0)
            stops = [int(eager[0, 5])]
            eager = decode(stops, graph=False)
            assert (eager == 0).any()
            torch.testing.assert_close(decode(stops, graph=True), eager, rtol=0, atol=0)
    assert len(captured) == 4 and all(replay is not None for replay in captured)
