"""Model families other than Llama: packed rows and capyft's loss must be exactly what the model computes.

Tiny random configs (hidden 64, 2 layers) built in memory, one per family capyft claims to train: Llama, Mistral
and Phi-3 (a sliding window over every layer), Gemma-2 (sliding and global layers, attention and final logit
softcapping), Gemma-3 (sliding and global layers), Granite (``logits_scaling`` and other multipliers) and Cohere
(``logit_scale``). The windows are 8 tokens, shorter than most conversations here, so a packed row that ignored
them would differ.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_prefill_matches_one_pass

from capyft.attention import PACKED_SDPA, PackedRow, check_packed_sdpa, packed_sdpa_attention
from capyft.batching import ChatCollator
from capyft.chat import IGNORE_INDEX
from capyft.checks import ConfigError
from capyft.levers import prepare_base_model
from capyft.modeling import causal_lm_loss_sum, check_logit_transform, load_base_model

VOCAB = 256
WINDOW = 8
LENGTHS = [37, 5, 64, 23]  # one conversation inside the window, three longer than it
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SLIDING_AND_GLOBAL = {"layer_types": ["sliding_attention", "full_attention"]}
# Random tiny models give small logits: Gemma's cap of 30 moves their loss by ~1e-6, a cap of 0.5 by ~1e-3
SMALL_CAP = {"final_logit_softcapping": 0.5}
# family: (config class, its own settings, the attention it trains with)
FAMILIES = {
    "llama": ("LlamaConfig", {}, PACKED_SDPA),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}, PACKED_SDPA),
    "phi3": ("Phi3Config", {"sliding_window": WINDOW}, PACKED_SDPA),
    # Gemma-2 caps attention logits (attn_logit_softcapping 50): transformers and capyft train it with eager only
    "gemma2": ("Gemma2Config", {"sliding_window": WINDOW, "head_dim": 16, **SLIDING_AND_GLOBAL, **SMALL_CAP}, "eager"),
    "gemma3": (
        "Gemma3TextConfig",
        {"sliding_window": WINDOW, "head_dim": 16, **SLIDING_AND_GLOBAL, **SMALL_CAP},
        PACKED_SDPA,
    ),
    # Granite 3's multipliers (granite-3.0-2b-instruct config.json), logits_scaling larger to make it matter
    "granite": (
        "GraniteConfig",
        {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.1},
        PACKED_SDPA,
    ),
    "cohere": ("CohereConfig", {"logit_scale": 0.0625}, PACKED_SDPA),
}


def family_model(family: str, attn: str | None = None, seed: int = 0):
    import transformers

    config_class, settings, default_attn = FAMILIES[family]
    attn = attn or default_attn
    config = getattr(transformers, config_class)(**COMMON, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa" if attn == PACKED_SDPA else attn
    ).eval()
    return prepare_base_model(model, attn)


def conversations(seed: int = 0) -> list[dict[str, list[int]]]:
    """Random conversations whose labels mask a prompt prefix, like assistant-only training."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
        prompt = max(1, n // 4)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_packed_row_equals_each_conversation_alone(family):
    model = family_model(family)
    rows = conversations()
    packed = ChatCollator(pad_id=0, padding_free=True)(rows)
    kwargs = PackedRow.from_position_ids(packed["position_ids"]).attention_kwargs("cpu")
    logits = model(
        input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False, **kwargs
    ).logits[0]
    loss_sum, n_tokens = causal_lm_loss_sum(model, packed, chunk_size=16)
    start, alone_sum, alone_tokens = 0, 0.0, 0
    for row in rows:
        n = len(row["input_ids"])
        alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[start : start + n], alone, rtol=1e-5, atol=1e-5, msg=f"{family} at {start}")
        row_sum, row_tokens = causal_lm_loss_sum(model, ChatCollator(pad_id=0)([row]), chunk_size=0)
        alone_sum, alone_tokens = alone_sum + row_sum, alone_tokens + int(row_tokens)
        start += n
    assert int(n_tokens) == alone_tokens
    torch.testing.assert_close(loss_sum, alone_sum, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sdpa_packed_uses_a_banded_mask_only_past_the_window(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        mask = kwargs.get("attn_mask")
        calls.append((query.shape[2], kwargs.get("is_causal", False), None if mask is None else int(mask.sum())))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = family_model("mistral")
    packed = ChatCollator(pad_id=0, padding_free=True)(conversations())
    causal_lm_loss_sum(model, packed, chunk_size=0)
    # a conversation of n > 8 tokens: n * 8 - 28 visible pairs (8 x 9 / 2 = 36 in the first 8 rows, then 8 a row)
    banded = [(n, False, n * WINDOW - 28) if n > WINDOW else (n, True, None) for n in LENGTHS]
    assert calls == banded * 2  # 2 layers


def test_sdpa_packed_refuses_attention_softcapping(tmp_path):
    import transformers

    config = transformers.Gemma2Config(**COMMON, **FAMILIES["gemma2"][1])
    message = (
        "model.attn_implementation sdpa_packed: gemma2 caps its attention logits (attn_logit_softcapping 50.0), "
        "which SDPA cannot compute; use --model.attn_implementation eager"
    )
    with pytest.raises(ConfigError) as err:
        check_packed_sdpa(config)
    assert str(err.value) == message
    # capyft's loader refuses before the weights load (transformers' own refusal would be a long ValueError)
    family_model("gemma2").save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_base_model(str(tmp_path), dtype="float32", attn_implementation=PACKED_SDPA)
    assert str(err.value) == message
    # and the attention function itself never drops a softcap it is handed
    q = torch.randn(1, 4, 6, 16)
    with pytest.raises(ConfigError, match="cannot compute attention with softcap"):
        packed_sdpa_attention(torch.nn.Module(), q, q, q, None, softcap=50.0, cu_seq_lens_q=torch.tensor([0, 6]))


def test_sdpa_packed_refuses_layer_types_it_does_not_compute():
    import transformers

    config = transformers.Llama4TextConfig(**COMMON, layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(ConfigError) as err:
        check_packed_sdpa(config)
    assert str(err.value) == (
        "model.attn_implementation sdpa_packed: llama4_text has chunked_attention layers, and sdpa_packed computes "
        "only full_attention and sliding_attention; use --model.attn_implementation sdpa"
    )
    for family, (config_class, settings, _) in FAMILIES.items():  # accepted: full and sliding layers, no softcap
        if family != "gemma2":
            check_packed_sdpa(getattr(transformers, config_class)(**COMMON, **settings))


@pytest.mark.parametrize("chunk_size", [0, 5])
@pytest.mark.parametrize("family", ["llama", "granite", "gemma2", "gemma3", "cohere"])
@torch.no_grad()
def test_loss_equals_the_models_own_loss(family, chunk_size):
    model = family_model(family, attn="eager" if family == "gemma2" else "sdpa")
    check_logit_transform(model)  # accepted
    batch = ChatCollator(pad_id=0)(conversations(seed=1)[:3])  # padded: 3 rows, right padding
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch, chunk_size=chunk_size)
    theirs = model(**inputs(batch), labels=batch["labels"]).loss
    torch.testing.assert_close(loss_sum / n_tokens, theirs, rtol=1e-5, atol=1e-5)
    if family != "llama":  # the check has teeth: without the transform the loss differs by 50x the tolerance
        plain = torch.nn.functional.cross_entropy(
            model.get_output_embeddings()(model.get_decoder()(**inputs(batch)).last_hidden_state)[:, :-1].flatten(0, 1),
            batch["labels"][:, 1:].flatten(),
        )
        assert (plain - theirs).abs() > 5e-4


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_loss_with_gradients_and_lora_equals_the_models_own_loss():
    from capyft.modeling import build_lora_config, wrap_with_lora

    model = wrap_with_lora(family_model("granite", "sdpa"), build_lora_config(r=4, alpha=8, dropout=0.0))
    batch = ChatCollator(pad_id=0)(conversations(seed=2)[:2])
    loss_sum, n_tokens = causal_lm_loss_sum(model, batch, chunk_size=5)  # checkpointed chunks
    (loss_sum / n_tokens).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    theirs = model(**inputs(batch), labels=batch["labels"]).loss
    theirs.backward()
    torch.testing.assert_close(loss_sum / n_tokens, theirs, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_logit_transform_is_refused():
    import transformers
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):  # e.g. a muP output multiplier capyft does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    model = ScaledLlama(transformers.LlamaConfig(**COMMON)).eval()
    with pytest.raises(ConfigError, match=r"^model.model_name_or_path: llama transforms its output logits in a way "):
        check_logit_transform(model)
    assert not model.training  # left in the mode it came in


# families whose cache is one full-attention layer per decoder layer: capyft prefills their prompts in passes
FULL_ATTENTION = {"llama", "granite", "cohere"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_answers_as_the_models_own_generate(family, monkeypatch):
    """capyft's generation (prompts prefilled in passes of similar length where the cache allows it, generate's own
    prefill elsewhere) answers a left-padded batch with the tokens the model's own ``generate`` gives."""
    from capyft import generation
    from capyft.generation import GenerationSettings, cut_at_stop, generate, prefill

    monkeypatch.setattr(generation, "PREFILL_TOKENS", 100)  # several passes: 7+12 tokens, 40, 55, 90
    model = family_model(family)
    with torch.no_grad():  # padding with a non-zero embedding, so padding keys are not zeros by themselves
        model.get_input_embeddings().weight[0].normal_()
    generator = torch.Generator().manual_seed(1)
    lengths = [40, 7, 90, 12, 55]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, VOCAB, (n,), generator=generator)
        mask[row, -n:] = 1
    if family in FULL_ATTENTION:
        assert assert_prefill_matches_one_pass(model, ids, mask, max_tokens=100) == 4  # 7+12, 40, 55, 90
    else:
        assert prefill(model, ids, mask) is None
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "decode": lambda self, ids, **kw: " ".join(map(str, ids))})()
    ours = generate(model, tokenizer, ids, mask, GenerationSettings(max_new_tokens=8), [2])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[2], pad_token_id=0
        )
    theirs = [cut_at_stop(tokenizer, row, [2]) for row in out[:, ids.shape[1] :].tolist()]
    assert ours == theirs
    # and as transformers' own attention answers (capyft's decodes grouped heads without expanding the cache)
    plain = family_model(family, "sdpa" if FAMILIES[family][2] == PACKED_SDPA else None)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = plain.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[2], pad_token_id=0
        )
    assert ours == [cut_at_stop(tokenizer, row, [2]) for row in out[:, ids.shape[1] :].tolist()]


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_decode_attention_with_grouped_heads_equals_expanded_heads(mask):
    """One new token a row: the grouped-query decode attention (no copy of the cache per query head) equals
    transformers' SDPA attention over expanded heads, padding masks included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 4
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 50, 16), torch.randn(3, 2, 50, 16)
    keep = torch.ones(3, 1, 1, 50, dtype=torch.bool)
    keep[0, ..., :20] = keep[2, ..., :45] = False  # left padding of 20 and 45 keys
    attention_mask = {"none": None, "bool": keep, "additive": torch.zeros(keep.shape).masked_fill(~keep, -1e9)}[mask]
    ours, _ = packed_sdpa_attention(module, query, key, value, attention_mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.3)
    assert ours.shape == theirs.shape == (3, 1, 8, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if mask != "none":  # the padding matters: attending to it would give other outputs
        unmasked, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
        assert not torch.allclose(unmasked[0], theirs[0], atol=1e-3)


@pytest.mark.parametrize("family", [name for name, (_, _, attn) in FAMILIES.items() if attn != "eager"])
def test_activation_estimate_bounds_each_familys_layers(family):
    """``gradient_checkpointing: auto`` turns recomputation off from :func:`activation_bytes_per_token`, with the
    norms it counts in the model's layer: per token the estimate covers what autograd keeps for backward in every
    family it decides for (LoRA with dropout on every linear layer, packed rows), and is not far above it. Gemma-2
    trains with eager attention, which keeps its probabilities: ``auto`` keeps recomputation there."""
    from helpers import saved_activation_bytes

    from capyft.modeling import build_lora_config, wrap_with_lora
    from capyft.sizing import activation_bytes_per_token, adapter_input_bytes, norms_per_layer

    model = wrap_with_lora(
        family_model(family).to(torch.bfloat16), build_lora_config(r=4, alpha=8, dropout=0.1), False
    ).train()
    decoder = model.get_base_model().get_decoder()

    def kept(count: int) -> int:  # conversations as long as the window: no banded mask, as in a long packed row
        generator = torch.Generator().manual_seed(count)
        ids = torch.randint(3, VOCAB, (count, WINDOW), generator=generator).tolist()
        batch = ChatCollator(pad_id=0, padding_free=True)([{"input_ids": i, "labels": i} for i in ids])
        packed = PackedRow.from_position_ids(batch["position_ids"]).attention_kwargs("cpu")
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        return saved_activation_bytes(model, lambda: decoder(**inputs, **packed))

    per_token = (kept(48) - kept(16)) / (32 * WINDOW)
    config = model.config.get_text_config()
    norms = norms_per_layer(model)
    assert norms == {"gemma3": 6, "cohere": 1}.get(family, 2)
    estimate = activation_bytes_per_token(
        config, False, adapter_input_bytes(False, 0.1, 2), norms=norms, in_flight=False
    )
    assert per_token <= estimate <= 1.5 * per_token, (per_token, estimate)
