"""Padding-free packing: conversations packed into one row must not see each other.

A tiny random Llama on CPU runs the same code paths as the 8B model on a GPU: transformers' SDPA with the
block-diagonal mask it builds from restarting ``position_ids``, and capyft's ``sdpa_packed``, which runs each
conversation on its own. Also checks the levers around it (offloaded embeddings) and the GPU benchmark's
random-weight 4-bit builder and synthetic data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from capyft import attention
from capyft.attention import PACKED_ATTENTION, PACKED_SDPA, PACKED_SDPA_LOOP, PackedRow
from capyft.batching import ChatCollator
from capyft.chat import IGNORE_INDEX
from capyft.levers import OffloadedEmbedding, offload_input_embeddings, prepare_base_model
from capyft.modeling import build_lora_config, causal_lm_loss_sum, wrap_with_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
VOCAB = 256
LENGTHS = [37, 11, 64, 23]  # uneven on purpose, one long enough to dominate a dense mask


def tiny_llama_config(**overrides):
    """A 2-layer Llama config with grouped-query heads (4 query, 2 key/value), head size 16 unless overridden."""
    from transformers import LlamaConfig

    settings = {"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 512} | overrides
    return LlamaConfig(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        **settings,
    )


def tiny_llama(attn: str = "sdpa", seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**overrides)
    config._attn_implementation = "sdpa" if attn in PACKED_ATTENTION else attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return prepare_base_model(model, attn)


def conversations(seed: int = 0) -> list[dict[str, list[int]]]:
    """Random conversations whose labels mask a prompt prefix, like assistant-only training."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(0, VOCAB, (n,), generator=generator).tolist()
        prompt = max(1, n // 4)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def packed_logits(model, batch):
    """Logits of a packed row, called the way ``causal_lm_loss_sum`` calls the decoder.

    ``use_cache=False`` matters: with a cache transformers does not look for restarting positions and silently
    attends across conversations (``sdpa``; ``sdpa_packed`` keeps them apart through ``cu_seq_lens_q``).
    """
    kwargs = PackedRow.from_position_ids(batch["position_ids"]).attention_kwargs("cpu")
    ids, positions = batch["input_ids"], batch["position_ids"]
    return model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).logits[0]


def test_packed_row_bounds():
    kwargs = PackedRow.from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]])).attention_kwargs("cpu")
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6]
    assert kwargs["packed_bounds"] == (0, 3, 5, 6)
    assert kwargs["max_length_q"] == 3


@pytest.mark.parametrize("attn", ["sdpa", PACKED_SDPA, PACKED_SDPA_LOOP, "eager"])
@torch.no_grad()
def test_packed_logits_equal_each_conversation_alone(attn):
    model = tiny_llama(attn)
    rows = conversations()
    logits = packed_logits(model, ChatCollator(pad_id=0, padding_free=True)(rows))
    start = 0
    for row in rows:
        alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        n = len(row["input_ids"])
        torch.testing.assert_close(logits[start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n
    assert start == logits.shape[0]


@torch.no_grad()
def test_sdpa_packed_runs_one_causal_attention_per_conversation(monkeypatch):
    from capyft import modeling

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        calls.append((query.shape[2], kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", spy)
    packed_logits(tiny_llama(PACKED_SDPA), ChatCollator(pad_id=0, padding_free=True)(conversations()))
    assert calls == [(n, True, None) for n in LENGTHS] * 2  # 2 layers, no dense mask


@pytest.mark.parametrize("attn", ["sdpa", PACKED_SDPA])
@torch.no_grad()
def test_changing_one_conversation_leaves_the_others_alone(attn):
    model = tiny_llama(attn)
    rows = conversations()
    collate = ChatCollator(pad_id=0, padding_free=True)
    before = packed_logits(model, collate(rows))
    changed = [dict(r) for r in rows]
    changed[1] = {"input_ids": [(t + 7) % VOCAB for t in rows[1]["input_ids"]], "labels": rows[1]["labels"]}
    after = packed_logits(model, collate(changed))
    a, b = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    assert not torch.allclose(before[a:b], after[a:b])  # the changed conversation changed
    torch.testing.assert_close(before[:a], after[:a], rtol=0, atol=0)
    torch.testing.assert_close(before[b:], after[b:], rtol=1e-6, atol=1e-6)  # later ones saw nothing of it

    # the check has teeth: one causal row without restarting positions lets conversation 3 see conversation 2
    plain = model(input_ids=collate(rows)["input_ids"], use_cache=False).logits[0]
    plain_changed = model(input_ids=collate(changed)["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(plain[b:], plain_changed[b:])


@pytest.mark.parametrize("attn", ["sdpa", PACKED_SDPA])
def test_packed_loss_and_lora_gradients_equal_padded(attn):
    torch.manual_seed(0)
    model = wrap_with_lora(tiny_llama(attn), build_lora_config(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    rows = conversations(seed=1)

    def loss_and_grads(batch):
        model.zero_grad()
        loss_sum, n_tokens = causal_lm_loss_sum(model, batch, chunk_size=16)
        loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss_sum.detach(), int(n_tokens), grads

    packed = loss_and_grads(ChatCollator(pad_id=0, padding_free=True)(rows))
    padded = loss_and_grads(ChatCollator(pad_id=0)(rows))
    alone = [causal_lm_loss_sum(model, ChatCollator(pad_id=0)([r]), 0) for r in rows]
    assert packed[1] == padded[1] == sum(int(n) for _, n in alone)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0], sum(s for s, _ in alone).detach(), rtol=1e-5, atol=1e-5)
    assert packed[2].keys() == padded[2].keys() and packed[2]
    for name in packed[2]:
        torch.testing.assert_close(packed[2][name], padded[2][name], rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def test_packed_4bit_model_matches_alone():
    from transformers import BitsAndBytesConfig

    bench = load_bench()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = bench.build_random_4bit_model(bench.tiny_config(VOCAB), quantization, "cpu", torch.float32, PACKED_SDPA)
    prepare_base_model(model, PACKED_SDPA)
    rows = conversations(seed=2)
    logits = packed_logits(model, ChatCollator(pad_id=0, padding_free=True)(rows))
    start = 0
    for row in rows:
        alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        n = len(row["input_ids"])
        torch.testing.assert_close(logits[start : start + n], alone, rtol=1e-4, atol=1e-4)
        start += n


@torch.no_grad()
def test_sdpa_packed_generates_like_sdpa():
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    out = {
        attn: tiny_llama(attn).generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        for attn in ("sdpa", PACKED_SDPA)
    }
    assert torch.equal(out["sdpa"], out[PACKED_SDPA])


def test_offloaded_embedding_matches_and_stays_on_cpu():
    embedding = torch.nn.Embedding(VOCAB, 16)
    offloaded = OffloadedEmbedding(embedding)
    ids = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(offloaded(ids), embedding(ids))
    assert list(offloaded.parameters()) == [] and list(offloaded.buffers()) == []
    offloaded.to("meta")  # what Lightning's model.to(device) does: the table is no parameter, so it stays
    assert offloaded.weight_cpu.device.type == "cpu"
    # a CPU model keeps its embeddings: there is nothing to save
    assert offload_input_embeddings(tiny_llama()) is False


def test_offloaded_embedding_generates_trains_and_saves_like_the_table(tmp_path):
    """Swapped in by hand (on a GPU, offload_input_embeddings does it): generate, train and save still work."""
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    model = tiny_llama()
    with torch.no_grad():
        before = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        model.set_input_embeddings(OffloadedEmbedding(model.get_input_embeddings()))
        after = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)
    model = wrap_with_lora(model, build_lora_config(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    loss_sum, _ = causal_lm_loss_sum(model, ChatCollator(pad_id=0, padding_free=True)(conversations()), 0)
    loss_sum.backward()
    grads = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]  # A: 0 at B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # through checkpointed layer 0 too
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").exists()


# ---- the GPU benchmark's building blocks, checked on CPU ---------------------------------------------------------
def load_bench():
    """The benchmark's model and data builders (``scripts/bench``), as one namespace."""
    import sys
    from types import SimpleNamespace

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    from bench import common, data, model

    return SimpleNamespace(
        tiny_config=common.tiny_config,
        build_random_4bit_model=model.build_random_4bit_model,
        make_conversations=data.make_conversations,
    )


def structure(model) -> dict[str, object]:
    """Module types, parameter types / dtypes / shapes / flags, 4-bit state keys, buffers and model-level flags."""
    out: dict[str, object] = {}
    for name, module in model.named_modules():
        out[f"module {name}"] = (type(module).__name__, module.training)
    for name, p in model.named_parameters():
        quant = getattr(p, "quant_state", None)
        extra = {k: v for k, v in vars(p).items() if k not in ("module", "quant_state", "_is_hf_initialized")}
        out[f"param {name}"] = (type(p).__name__, p.dtype, tuple(p.shape), p.requires_grad, p.device.type, extra)
        if quant is not None:
            out[f"quant {name}"] = sorted(quant.as_dict())
    for name, b in model.named_buffers():
        out[f"buffer {name}"] = (b.dtype, tuple(b.shape), b.device.type)
    for key in ("is_quantized", "is_loaded_in_4bit", "quantization_method"):
        out[key] = getattr(model, key, None)
    out["hf_quantizer"] = type(getattr(model, "hf_quantizer", None)).__name__
    config = model.config.to_dict()
    out["config"] = {k: config[k] for k in sorted(config) if k not in ("_name_or_path", "transformers_version")}
    return out


def test_bench_random_4bit_model_has_the_structure_of_a_4bit_load(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    bench = load_bench()
    config = bench.tiny_config(VOCAB)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    built = bench.build_random_4bit_model(config, quantization, "cpu", torch.bfloat16, "sdpa")
    LlamaForCausalLM(bench.tiny_config(VOCAB)).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cpu"
    )
    a, b = structure(built), structure(loaded)
    assert {k: v for k, v in a.items() if a.get(k) != b.get(k)} == {}
    assert {k: v for k, v in b.items() if a.get(k) != b.get(k)} == {}
    torch.testing.assert_close(built.model.rotary_emb.inv_freq, loaded.model.rotary_emb.inv_freq)
    assert torch.isfinite(built(torch.tensor([[1, 2, 3]])).logits).all()


def test_bench_conversations_look_like_capybara():
    bench = load_bench()
    rows = bench.make_conversations(400, seed=0)
    lengths = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.float)
    assert lengths.min() >= 200 and lengths.max() <= 2048
    assert 750 <= lengths.median() <= 1050
    trained = sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)
    assert 0.85 <= trained / lengths.sum() <= 0.95
    assert rows == bench.make_conversations(400, seed=0)  # the same sequences for every stack
    assert all(r["labels"][0] == IGNORE_INDEX for r in rows)


def test_bench_wall_phases_gives_each_sample_the_first_matching_phase():
    """The whole-command sampler's accounting: each sample stands for the time since the previous one, an import
    inside model loading counts as importing, Lightning's teardown is its own phase."""
    load_bench()
    from bench.wall_phases import summarize

    load = ["__main__.py:<module>", "cli.py:run", "model.py:configure_model", "auto_factory.py:from_pretrained"]
    samples = [
        (0.5, ["__main__.py:<module>", "<frozen importlib._bootstrap>:_find_and_load"]),
        (1.0, load),
        (1.5, [*load, "<frozen importlib._bootstrap>:_find_and_load"]),
        (3.0, load),
        (3.5, ["cli.py:run", "trainer.py:_teardown", "strategy.py:teardown", "module.py:cpu"]),
    ]
    phases = {phase: (round(seconds, 3), first, last) for phase, seconds, first, last in summarize(samples)}
    assert phases == {"import": (1.0, 0.5, 1.5), "load model": (2.0, 1.0, 3.0), "lightning teardown": (0.5, 3.5, 3.5)}


@pytest.mark.slow
def test_compiled_layers_train_like_eager_and_reuse_one_graph_across_lengths():
    """Regional compile (aot_eager here: the traced graph and its autograd, without code generation on CPU)."""
    import torch._dynamo

    from capyft.levers import compile_decoder_layers

    def lora_model():
        model = wrap_with_lora(tiny_llama(PACKED_SDPA), build_lora_config(r=4, alpha=8, dropout=0.0), True)
        return model.train()

    eager, compiled = lora_model(), lora_model()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs counted by tests that ran before in this process
    assert compile_decoder_layers(compiled, backend="aot_eager") == 2
    for seed in range(3):  # three conversations a row, new lengths every time
        batch = ChatCollator(pad_id=0, padding_free=True)(
            [
                {**r, "input_ids": r["input_ids"][: 40 - 7 * seed], "labels": r["labels"][: 40 - 7 * seed]}
                for r in conversations(seed)[:3]
            ]
        )
        losses, grads = [], []
        for model in (eager, compiled):
            model.zero_grad()
            loss, _ = causal_lm_loss_sum(model, batch, 0)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # dynamic lengths: no recompile


# ---- the varlen path's glue on CPU -------------------------------------------------------------------------------
# Flash attention is CUDA-only (tests/test_gpu.py runs the real kernel). On CPU, a per-sequence SDPA kernel stands in
# for it, so what capyft wraps around the kernel runs here: layouts, grouped heads, the autograd of the custom op and
# its backward op, and the longest-sequence bound compiled layers pass. Inert unless a test makes varlen_usable true.
STAND_IN_CALLS: list[int] = []


def _per_sequence_attention(q, k, v, cu_seq_lens, scale):
    bounds, groups, outputs = cu_seq_lens.tolist(), q.shape[1] // k.shape[1], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


@torch.library.register_kernel("capyft::varlen_causal_attention", "cpu")
def _stand_in_forward(q, k, v, cu_seq_lens, max_length, scale):
    assert max_length >= int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    STAND_IN_CALLS.append(1)
    lse = q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)
    return _per_sequence_attention(q, k, v, cu_seq_lens, scale).contiguous(), lse


@torch.library.register_kernel("capyft::varlen_causal_attention_backward", "cpu")
def _stand_in_backward(grad_out, q, k, v, out, lse, cu_seq_lens, max_length, scale):
    _, vjp = torch.func.vjp(lambda *qkv: _per_sequence_attention(*qkv, cu_seq_lens, scale), q, k, v)
    return tuple(g.contiguous() for g in vjp(grad_out))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_varlen_path_trains_like_per_conversation_attention(monkeypatch, compiled):
    """``sdpa_packed``'s varlen call, with the stand-in kernel, gives the loss and LoRA gradients of
    ``sdpa_packed_loop`` on packed rows; compiled (aot_eager), one graph serves rows of new lengths and counts."""
    import torch._dynamo

    from capyft.levers import compile_decoder_layers

    monkeypatch.setattr(attention, "varlen_usable", lambda *tensors: True)
    models = {}
    for attn in (PACKED_SDPA, PACKED_SDPA_LOOP):
        models[attn] = wrap_with_lora(tiny_llama(attn), build_lora_config(r=4, alpha=8, dropout=0.0), True).train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if compiled:
        compile_decoder_layers(models[PACKED_SDPA], backend="aot_eager")
    STAND_IN_CALLS.clear()
    for seed, count in [(0, 3), (1, 4), (2, 2)]:
        batch = ChatCollator(pad_id=0, padding_free=True)(conversations(seed)[:count])
        results = {}
        for attn, model in models.items():
            model.zero_grad()
            loss, _ = causal_lm_loss_sum(model, batch, 0)
            loss.backward()
            results[attn] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        (loss, grads), (loop_loss, loop_grads) = results[PACKED_SDPA], results[PACKED_SDPA_LOOP]
        torch.testing.assert_close(loss, loop_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == loop_grads.keys() and grads
        for name in grads:  # float32; the stand-in expands grouped heads where the loop lets SDPA group them
            torch.testing.assert_close(grads[name], loop_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert len(STAND_IN_CALLS) == 3 * 2 * 2  # three rows, two layers, forward and checkpoint recompute
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
