"""Generation and BERTScore for ``capyft test``: order kept through batching, clean stops, offline scoring, and a
fine-tuned tiny model that beats its own base in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, assert_prefill_matches_one_pass, fit_args, offline_env, one_turn, write_jsonl

from capyft import evaluation
from capyft.assets import minilm_dir
from capyft.chat import encode_prompt, end_of_turn_ids
from capyft.cli import main, run
from capyft.datamodule import PromptCollator
from capyft.evaluation import BERTScoreSettings
from capyft.generation import GenerationSettings, generate
from capyft.modeling import load_tokenizer

MINILM = BERTScoreSettings(model_type=str(minilm_dir()), num_layers=6, batch_size=8)

# prompts of very uneven lengths (31 to ~430 tokens with SmolLM2's template and default system prompt)
PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "tell me about zebras " * 80}],
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b " * 40}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def scorer():
    return evaluation.load_scorer(MINILM)


def load_tiny(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def batch_of(prompts, tokenizer) -> dict:
    examples = [
        {"input_ids": encode_prompt(p, tokenizer), "row": i, "prompt": p, "reference": ""}
        for i, p in enumerate(prompts)
    ]
    return PromptCollator(tokenizer.pad_token_id)(examples)


def test_batched_generation_matches_one_prompt_at_a_time(tiny_model, tokenizer):
    """Left padding and row order: each row of a padded batch gets the answer its prompt gets alone."""
    model, settings, stops = load_tiny(tiny_model), GenerationSettings(max_new_tokens=12), end_of_turn_ids(tokenizer)
    batch = batch_of(PROMPTS, tokenizer)
    assert batch["attention_mask"].sum(1).tolist()[1] > 10 * batch["attention_mask"].sum(1).tolist()[0]
    batched = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, stops)
    alone = []
    for prompt in PROMPTS:
        one = batch_of([prompt], tokenizer)
        alone += generate(model, tokenizer, one["input_ids"], one["attention_mask"], settings, stops)
    assert batched == alone
    assert len({g.text for g in batched}) == len(PROMPTS)  # distinct answers, so a swap would show


def test_generate_uses_kv_cache_with_gradient_checkpointing_on(tiny_model, tokenizer):
    """A training-mode PEFT model with gradient checkpointing generates with the cache and is left in train mode."""
    from capyft.modeling import build_lora_config, wrap_with_lora

    model = wrap_with_lora(load_tiny(tiny_model), build_lora_config(r=4), gradient_checkpointing=True)
    assert model.training and model.config.use_cache is False
    lengths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    batch = batch_of(PROMPTS[:2], tokenizer)
    settings = GenerationSettings(max_new_tokens=5)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, [-1])  # never stops
    hook.remove()
    # the prompt once (the prefill takes all its tokens but the last, generate's first step that one), then one token
    # per step for the 4 new tokens after the first
    assert lengths == [batch["input_ids"].shape[1] - 1, 1, 1, 1, 1, 1]
    assert [g.num_tokens for g in out] == [5, 5] and not any(g.stopped for g in out)
    assert model.training


def uneven_batch(tokenizer, count: int = 6) -> dict:
    """``count`` prompts of 31 to ~430 tokens (PROMPTS, repeated with a varying turn), left-padded."""
    prompts = [[*p[:-1], {**p[-1], "content": p[-1]["content"] + " !" * i}] for i, p in enumerate(PROMPTS * 2)]
    return batch_of(prompts[:count], tokenizer)


def generate_reference(model, batch: dict, new: int, stops: list[int], pad: int) -> torch.Tensor:
    """transformers' own greedy ``generate`` on a left-padded batch: the new tokens, ``pad`` after a row's stop."""
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
        )
    return out[:, ids.shape[1] :]


def test_prefill_in_passes_lays_out_the_cache_generate_computes_in_one(tiny_model, tokenizer):
    """The prompts prefilled in passes of similar length (less padding) give the keys and values that transformers'
    own one-pass prefill of the padded batch gives, at every real token, zeros at the padding, and the same answers."""
    from capyft import generation

    model, batch = load_tiny(tiny_model).eval(), uneven_batch(tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():  # a pad embedding of zeros would give zero keys at the padding without prefill's zeroing
        model.get_input_embeddings().weight[tokenizer.pad_token_id].normal_()
    # 6 prompts of 31-430 tokens in passes of <= 900 tokens: several passes, each padded to its own longest prompt
    assert 1 < assert_prefill_matches_one_pass(model, ids, mask, max_tokens=900) < 6
    settings, stops = GenerationSettings(max_new_tokens=12), end_of_turn_ids(tokenizer)
    ours = generate(model, tokenizer, ids, mask, settings, stops)
    out = generate_reference(model, batch, 12, stops, tokenizer.pad_token_id)
    theirs = [generation.cut_at_stop(tokenizer, row, stops) for row in out.tolist()]
    assert ours == theirs and len({g.text for g in ours}) > 1


def test_greedy_decode_over_a_fixed_cache_gives_generates_tokens_stops_and_padding(tiny_model, tokenizer):
    """decode_greedy (a cache of fixed shape, a mask opening one slot per step: what a CUDA graph replays) returns
    the tokens transformers' greedy generate returns, token for token: rows that stop early get padding after their
    stop token while the others go on, and the batch ends once every row has stopped."""
    from capyft import generation

    model, batch = load_tiny(tiny_model).eval(), uneven_batch(tokenizer)
    ids, mask, pad = batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id

    def theirs(stops: list[int], new: int) -> torch.Tensor:
        return generate_reference(model, batch, new, stops, pad)

    def ours(stops: list[int], new: int) -> torch.Tensor:
        settings = GenerationSettings(max_new_tokens=new)
        with torch.no_grad():
            filled = generation._prefilled(model, ids, mask, 900, new)
            return generation.decode_greedy(model, filled, ids, mask, settings, stops, pad)

    free = theirs([-1], 12)
    assert len({tuple(row) for row in free.tolist()}) > 1
    torch.testing.assert_close(ours([-1], 12), free, rtol=0, atol=0)
    stop = int(free[0, 3])  # row 0 stops at its 4th token; rows without that token run to the end
    expected = theirs([stop], 12)
    got = ours([stop], 12)
    assert (expected == pad).any() and not (expected[:, -1] == pad).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # every row's first token a stop: generate ends after one step, the fixed loop at its next check, all padding
    firsts = sorted({int(t) for t in free[:, 0]})
    expected, got = theirs(firsts, 12), ours(firsts, 12)
    assert expected.shape[1] == 1 and got.shape[1] == generation.STOP_CHECK_EVERY
    torch.testing.assert_close(got[:, :1], expected, rtol=0, atol=0)
    assert (got[:, 1:] == pad).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager: answered by generate's own loop, whatever the config
@pytest.mark.parametrize("setting", ["suppress_tokens", "num_beams"])
def test_a_models_generation_config_adds_its_processors_not_its_search(tiny_model, tokenizer, setting, attention):
    """A model whose own generation config adds a logits processor (suppressed tokens) is answered by transformers'
    generate, which applies it, not by the plain-argmax loop; one that asks for beam search still gets greedy answers
    (capyft's settings decide the search, as for the repetition penalty): in both cases generate's greedy answers."""
    from capyft import generation

    model, batch = load_tiny(tiny_model).eval(), uneven_batch(tokenizer, 4)
    model.set_attn_implementation(attention)
    ids, mask, pad = batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id
    settings, stops = GenerationSettings(max_new_tokens=6), [-1]

    def theirs() -> list:
        return generate_reference(model, batch, 6, stops, pad).tolist()

    plain = theirs()
    if setting == "suppress_tokens":
        model.generation_config.suppress_tokens = [plain[0][0]]
        expected = theirs()
        assert expected != plain
    else:
        model.generation_config.num_beams = 3
        assert theirs() != plain  # beam search, left to the model's config
        expected = plain
    ours = generate(model, tokenizer, ids, mask, settings, stops)
    assert ours == [generation.cut_at_stop(tokenizer, row, stops) for row in expected]


def test_prefilled_cache_takes_the_answer_in_place_then_grows_as_transformers_does(tiny_model, tokenizer):
    """Decoding writes each new token into the room the prefill left (no copy of the cache per token); past the
    room, or once transformers replaces the tensors, the layer grows by concatenation, with the same contents."""
    from capyft import generation

    model, batch = load_tiny(tiny_model).eval(), uneven_batch(tokenizer, 3)
    with torch.no_grad():
        _, cache = generation.prefill(model, batch["input_ids"], batch["attention_mask"], room=2)
    layer = cache.layers[0]
    start, buffer = layer.get_seq_length(), layer.keys.data_ptr()
    assert start == batch["input_ids"].shape[1] - 1
    new = [torch.randn(3, layer.keys.shape[1], 1, layer.keys.shape[-1]) for _ in range(3)]
    expected = torch.cat([layer.keys.clone(), *new], dim=-2)
    for step, token in enumerate(new):
        keys, _ = layer.update(token, token.clone())
        assert layer.get_seq_length() == start + step + 1
        assert (keys.data_ptr() == buffer) == (step < 2)  # in place while there is room
    torch.testing.assert_close(layer.keys, expected, rtol=0, atol=0)
    layer = cache.layers[1]
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()  # replaced, as a crop or reorder would
    keys, _ = layer.update(new[0], new[0])
    assert keys.shape[-2] == start + 1 and torch.equal(keys[..., -1:, :], new[0])


def test_prefill_leaves_models_it_cannot_lay_out_to_generate(tiny_model):
    """Sliding windows (their cache keeps only the window) and single-token prompts: generate's own prefill."""
    import transformers

    from capyft import generation

    config = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,
    )
    mistral = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids, mask = torch.ones(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)
    assert generation.prefill(mistral, ids, mask) is None
    llama = load_tiny(tiny_model).eval()
    assert generation.prefill(llama, ids[:, :1], mask[:, :1]) is None
    assert generation.prefill(llama, ids, mask) is not None


def chain_model(model_dir: Path, chain: list[int]):
    """The tiny Llama rewired so each token of ``chain`` is followed by the next one, whatever the prompt.

    Attention and MLP outputs are zeroed, so the residual stream at a position is its token's embedding; each chain
    token gets its own embedding axis and the output head maps that axis to the next chain token.
    """
    model = load_tiny(model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for axis, (token, following) in enumerate(zip(chain, chain[1:])):
            embed[token] = 0.0
            embed[token, axis] = 1.0
            head[following, axis] = 10.0
    return model


def test_generation_stops_at_end_of_turn_and_holds_no_prompt_text(tiny_model, tokenizer):
    batch = batch_of(PROMPTS[:2], tokenizer)
    newline = int(batch["input_ids"][0, -1])  # the generation prompt "<|im_start|>assistant\n" ends the prompt
    words = tokenizer.encode(" red green blue", add_special_tokens=False)
    end_of_turn = end_of_turn_ids(tokenizer)
    assert end_of_turn == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model = chain_model(tiny_model, [newline, *words, end_of_turn[0], *words])
    settings = GenerationSettings(max_new_tokens=20)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, end_of_turn)
    assert [(g.text, g.num_tokens, g.stopped) for g in out] == [("red green blue", 4, True)] * 2


def test_generation_stops_at_any_stop_id(tiny_model, tokenizer):
    """With several stop ids (Llama-3: <|eot_id|> and <|end_of_text|>), whichever comes first ends the answer."""
    batch = batch_of(PROMPTS[:1], tokenizer)
    newline, eos = int(batch["input_ids"][0, -1]), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    red, green = tokenizer.encode(" red green", add_special_tokens=False)
    model = chain_model(tiny_model, [newline, red, eos, green])
    settings = GenerationSettings(max_new_tokens=20)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, [2, eos])
    assert (out[0].text, out[0].num_tokens, out[0].stopped) == ("red", 2, True)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, [2])  # eos not a stop
    assert out[0].num_tokens == 20 and not out[0].stopped


def test_sampling_is_seeded(tiny_model, tokenizer):
    model, stops = load_tiny(tiny_model), end_of_turn_ids(tokenizer)
    batch = batch_of(PROMPTS[:2], tokenizer)
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    args = (model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, stops)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, second, other = generate(*args, seed=1), generate(*args, seed=1), generate(*args, seed=2)
    assert first == second != other
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched


def test_right_padding_is_refused(tiny_model, tokenizer):
    ids, mask = torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left"):
        generate(load_tiny(tiny_model), tokenizer, ids, mask, GenerationSettings(), [2])


def test_bertscore_pairs_each_prediction_with_its_reference(scorer):
    """Offline with the local MiniLM; identical pairs of very uneven lengths score 1.0, in the order given."""
    texts = [
        "Paris.",
        "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation. " * 6,
        "Use a hash map to count occurrences, then sort the keys by frequency.",
        "Yes",
    ]
    same = evaluation.score(scorer, MINILM, texts, texts)
    assert set(same) == {"precision", "recall", "f1"}
    for values in same.values():
        assert values == pytest.approx([1.0] * len(texts), abs=1e-5)
    shifted = evaluation.score(scorer, MINILM, texts, texts[1:] + texts[:1])
    assert all(f < 0.9 for f in shifted["f1"])
    assert "L6_no-idf" in evaluation.score_hash(scorer, MINILM)


def test_rescaling_uses_the_baseline_file(scorer, tmp_path):
    with pytest.raises(ValueError, match="baseline_path"):
        evaluation.load_scorer(
            BERTScoreSettings(model_type=MINILM.model_type, num_layers=6, rescale_with_baseline=True)
        )
    baseline = tmp_path / "baseline.tsv"  # bert-score's format: one row per layer, columns LAYER,P,R,F
    baseline.write_text("LAYER,P,R,F\n" + "".join(f"{i},0.5,0.4,0.45\n" for i in range(7)))
    settings = BERTScoreSettings(
        model_type=MINILM.model_type, num_layers=6, rescale_with_baseline=True, baseline_path=str(baseline)
    )
    rescaling = evaluation.load_scorer(settings)
    scores = evaluation.score(rescaling, settings, ["a cat sat", "hello"], ["a dog sat", "hello"])
    assert scores["f1_rescaled"] == pytest.approx([(f - 0.45) / 0.55 for f in scores["f1"]], abs=1e-5)
    assert scores["precision_rescaled"][1] == pytest.approx(1.0, abs=1e-5)
    assert "-custom-rescaled" in evaluation.score_hash(rescaling, settings)


def test_local_encoder_needs_valid_num_layers():
    with pytest.raises(ValueError, match="num_layers"):
        evaluation.load_scorer(BERTScoreSettings(model_type=MINILM.model_type, num_layers=None))
    with pytest.raises(ValueError, match="has 6 layers"):
        evaluation.load_scorer(BERTScoreSettings(model_type=MINILM.model_type, num_layers=17))


def test_evaluate_adds_per_example_scores_base_and_delta(scorer):
    records = [
        {"row": 0, "reference": "The sky is blue.", "prediction": "The sky is blue.", "base_prediction": "zebra"},
        {"row": 1, "reference": "Water boils at 100 C.", "prediction": "Water boils.", "base_prediction": "qq"},
    ]
    records, metrics, comparisons = evaluation.evaluate(records, scorer, MINILM)
    assert records[0]["f1"] == pytest.approx(1.0, abs=1e-5) and records[0]["base_f1"] < 0.9
    assert metrics["test/bertscore_f1"] == pytest.approx((records[0]["f1"] + records[1]["f1"]) / 2)
    delta = metrics["test/bertscore_f1"] - metrics["test/base_bertscore_f1"]
    assert metrics["test/bertscore_f1_delta"] == pytest.approx(delta) and delta > 0
    for record in records:  # each record carries both scores and their difference
        for name in ("f1", "precision", "recall"):
            assert record[f"{name}_delta"] == pytest.approx(record[name] - record[f"base_{name}"])
    assert set(comparisons) == {"f1", "precision", "recall"}
    assert (metrics["test/bertscore_f1_wins"], metrics["test/bertscore_f1_losses"]) == (2.0, 0.0)
    assert metrics["test/bertscore_f1_sign_test_p"] == pytest.approx(0.5)  # 2 of 2: 2 x (1/2)^2
    assert metrics["test/bertscore_f1_delta_ci_low"] == comparisons["f1"].ci_low > 0


def test_empty_answers_score_zero_without_crashing(scorer):
    """bert-score 0.3.13 under transformers 5 raises AttributeError on an empty candidate; capyft scores it 0."""
    scores = evaluation.score(scorer, MINILM, ["", "  ", "a cat"], ["a cat", "a cat", "a cat"])
    assert scores["f1"][:2] == [0.0, 0.0] and scores["precision"][:2] == [0.0, 0.0]
    assert scores["recall"][:2] == [0.0, 0.0]
    assert scores["f1"][2] == pytest.approx(1.0, abs=1e-5)
    idf = BERTScoreSettings(model_type=MINILM.model_type, num_layers=6, idf=True)
    assert evaluation.score(evaluation.load_scorer(idf), idf, ["", "a dog"], ["a cat", "a cat"])["f1"][0] == 0.0
    assert evaluation.score(scorer, MINILM, ["", " "], ["a", "b"]) == {
        "precision": [0.0, 0.0],
        "recall": [0.0, 0.0],
        "f1": [0.0, 0.0],
    }


def tiny_roberta(path: Path) -> Path:
    """A RoBERTa-style byte-level BPE tokenizer and a 2-layer random RobertaModel whose token vectors ignore context.

    Position embeddings, attention outputs and feed-forward outputs are zero, so every layer returns a LayerNorm of
    the token's own embedding: a token scores 1.0 against the same token anywhere, and any other token less.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    path.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    corpus = ["the cat sat on the mat", "cat and dog", "a dog sat", "sat the cat"] * 10
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(path))
    tokenizer = RobertaTokenizer(
        vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), mask_token="<unk>", model_max_length=64
    )
    tokenizer.save_pretrained(path)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    model = RobertaModel(config)
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
        for layer in model.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
    model.save_pretrained(path)
    return path


def test_roberta_first_word_gets_its_space_prefixed_token(tmp_path):
    """bert-score 0.3.13 asks for add_prefix_space=True, which transformers 5 ignores; capyft restores it."""
    from bert_score.utils import sent_encode

    settings = BERTScoreSettings(model_type=str(tiny_roberta(tmp_path / "roberta")), num_layers=2)
    scorer = evaluation.load_scorer(settings)
    tokenizer = scorer._tokenizer
    spaced, bare = tokenizer.convert_tokens_to_ids(["Ġcat", "cat"])
    assert spaced != bare and tokenizer.unk_token_id not in (spaced, bare)
    assert sent_encode(tokenizer, "cat sat")[1:-1] == tokenizer.convert_tokens_to_ids(["Ġcat", "Ġsat"])
    # the score path: "cat sat" is two tokens of "the cat sat", so its precision is exactly 1 (0.76 without the fix)
    scores = evaluation.score(scorer, settings, ["cat sat", "the cat sat"], ["the cat sat", "cat sat"])
    assert scores["precision"][0] == pytest.approx(1.0, abs=1e-5)
    assert scores["recall"][1] == pytest.approx(1.0, abs=1e-5)
    assert evaluation.score_hash(scorer, settings).startswith(settings.model_type + "_L2_no-idf_version=0.3.12")


def test_gather_records_in_one_process_sorts_by_row_and_drops_repeats():
    records = [{"row": 3, "x": "c"}, {"row": 1, "x": "a"}, {"row": 2, "x": "b"}, {"row": 1, "x": "a"}]
    assert [r["row"] for r in evaluation.gather_records(records)] == [1, 2, 3]


GATHER_WORKER = """
import json, sys
import torch
from capyft.evaluation import gather_records

rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
# rank 0 answered rows 4, 0, 2; rank 1 rows 3, 1 and a padded repeat of row 0 (as a distributed sampler pads)
mine = [[4, 0, 2], [3, 1, 0]][rank]
print(json.dumps(gather_records([{"row": row, "rank": rank} for row in mine])), file=open(out, "w"))
torch.distributed.destroy_process_group()
"""


def test_gather_records_across_two_processes(tmp_path):
    """Under DDP every rank gets all ranks' records, one per row, in row order."""
    import subprocess
    import sys

    init, outs = tmp_path / "init", [tmp_path / f"{rank}.json" for rank in (0, 1)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", GATHER_WORKER, str(rank), str(init), str(outs[rank])], cwd=REPO, env=offline_env()
        )
        for rank in (0, 1)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    for out in outs:
        assert [r["row"] for r in json.loads(out.read_text())] == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def colour_sentences(tmp_path_factory) -> Path:
    """30 one-turn conversations, "Name the colour red" -> "The colour is red." over 6 colours: learnable, and each
    answer is a sentence that names the colour of its question."""
    words = ["red", "green", "blue", "amber", "violet", "black"]
    rows = [one_turn(f"Name the colour {w}", f"The colour is {w}.") for w in (words[k % len(words)] for k in range(30))]
    return write_jsonl(tmp_path_factory.mktemp("colour_sentences") / "colour_sentences.jsonl", rows)


# 24 training, 2 validation, 4 test rows of colour_sentences; no validation while fitting
COLOUR_SPLITS = ["--data.train_size=24", "--data.val_size=2", "--data.test_size=4", "--trainer.limit_val_batches=0"]


def test_fine_tuned_beats_base_in_one_test_run(tmp_path, tiny_model, colour_sentences):
    """fit, then ``test --ckpt_path ... --model.compare_base true`` through the real CLI, 4-bit tiny Llama on CPU."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit = main(
        fit_args(
            tmp_path,
            tiny_model,
            colour_sentences,
            *COLOUR_SPLITS,
            "--trainer.max_steps=30",
            "--model.learning_rate=0.01",
            "--model.warmup_steps=0",
            "--model.lr_schedule=constant",
        )
    )
    run = Path(fit.trainer.log_dir)
    test = main(
        [
            "test",
            "--config",
            str(run / "config.yaml"),
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "--model.compare_base=true",
            f"--model.bertscore.model_type={MINILM.model_type}",
            "--model.bertscore.num_layers=6",
            "--model.generation.max_new_tokens=12",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert Path(test.trainer.log_dir) == run  # the test run writes into the run it evaluates
    logged = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    saved = json.loads((run / "test-last" / "test_metrics.json").read_text())
    assert logged["test/bertscore_f1"] > logged["test/base_bertscore_f1"] + 0.2
    assert logged["test/bertscore_f1_delta"] == pytest.approx(saved["test/bertscore_f1_delta"])
    assert logged["test/gen_tokens_per_sec"] > 0 and logged["test/gen_seconds"] > 0
    assert saved["bertscore_hash"].startswith(MINILM.model_type) and saved["num_examples"] == 4

    records = [json.loads(line) for line in (run / "test-last" / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == [26, 27, 28, 29]  # the 4 rows after train (24) and val (2), in order
    for record in records:
        assert record["reference"] == f"The colour is {record['prompt'][-1]['content'].split()[-1]}."
        assert record["prediction"] != record["base_prediction"]
        assert {"f1", "precision", "recall", "base_f1", "base_precision", "base_recall"} <= set(record)
        assert record["f1_delta"] == pytest.approx(record["f1"] - record["base_f1"])
        for leak in ("Name the colour", "SmolLM", "<|im_", "assistant"):
            assert leak not in record["prediction"]
    assert sum(r["stopped"] for r in records) > 0  # the fine-tuned model learned to end its turn

    events = EventAccumulator(str(sorted(run.glob("events.out.tfevents.*"))[-1]))
    events.Reload()
    assert "test/bertscore_f1_per_example" in events.Tags()["histograms"]
    assert "test/base_bertscore_f1_per_example" in events.Tags()["histograms"]
    assert any("test/examples" in tag for tag in events.Tags()["tensors"])

    # the paired comparison: in test_metrics.json, in the logged metrics and in TensorBoard (scalars and text)
    wins, ties, losses = (saved[f"test/bertscore_f1_{k}"] for k in ("wins", "ties", "losses"))
    deltas = [r["f1_delta"] for r in records]
    assert (wins, losses) == (sum(d > 0.005 for d in deltas), sum(d < -0.005 for d in deltas)) and wins >= 3
    assert wins + ties + losses == 4
    assert saved["test/bertscore_f1_delta_ci_low"] > 0  # 4 large gains: the interval excludes zero
    assert saved["paired"]["f1"]["shown"] and "fine-tuned scores higher" in saved["paired"]["summary"][0]
    assert logged["test/bertscore_f1_sign_test_p"] == pytest.approx(saved["test/bertscore_f1_sign_test_p"])
    assert "test/bertscore_f1_delta_ci_high" in events.Tags()["scalars"]
    assert any("test/paired" in tag for tag in events.Tags()["tensors"])
    assert "test/bertscore_f1_delta_per_example" in events.Tags()["histograms"]


# ---- test / predict through the CLI on a short tiny run: outputs kept, scorer checked first, stop ids ----------
@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, tiny_model, colour_sentences) -> Path:
    """A 2-step tiny run with ``last.ckpt`` (colour_sentences: 24 train, 2 val, 4 test rows)."""
    tmp = tmp_path_factory.mktemp("fitted")
    fit = main(fit_args(tmp, tiny_model, colour_sentences, *COLOUR_SPLITS, "--trainer.max_steps=2"))
    return Path(fit.trainer.log_dir)


def folders(run: Path) -> set[Path]:
    return {p for p in run.iterdir() if p.is_dir()}


def evaluate_run(run: Path, subcommand: str, *extra: str) -> Any:
    return main(
        [
            subcommand,
            "--config",
            str(run / "config.yaml"),
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "--model.generation.max_new_tokens=4",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )


def test_predict_writes_the_answers_to_the_run_dir(fitted_run):
    before = folders(fitted_run)
    predicted = evaluate_run(fitted_run, "predict")
    (out,) = folders(fitted_run) - before
    assert out.name == "predict-last" and [p.name for p in out.iterdir()] == ["predictions.jsonl"]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    returned = [r for batch in predicted.trainer.predict_loop.predictions for r in batch]
    assert records == returned and [r["row"] for r in records] == [26, 27, 28, 29]
    assert all(isinstance(r["prediction"], str) and "f1" not in r for r in records)
    evaluate_run(fitted_run, "predict")
    assert (fitted_run / "predict-last-2" / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()


def test_the_cli_leaves_the_model_where_it_ran_when_its_process_ends(fitted_run, monkeypatch):
    """Lightning moves the module to CPU memory at a run's end (its strategy's teardown), which took 3.4 s for an
    8B model on an H200; the CLI's process ends there, so the CLI skips it. Outside the CLI the module still moves."""
    import lightning as L

    from capyft.model import QLoRAModule

    moved = []
    monkeypatch.setattr(L.LightningModule, "cpu", lambda self: moved.append(type(self).__name__) or self)
    predicted = evaluate_run(fitted_run, "predict")
    assert predicted.model.stays_on_device_at_teardown and moved == []
    predicted.model.stays_on_device_at_teardown = False
    assert QLoRAModule.cpu(predicted.model) is predicted.model and moved == ["QLoRAModule"]


def test_a_second_test_keeps_the_first_ones_outputs(fitted_run):
    minilm = (f"--model.bertscore.model_type={MINILM.model_type}", "--model.bertscore.num_layers=6")
    before = folders(fitted_run)
    evaluate_run(fitted_run, "test", *minilm)
    (first,) = folders(fitted_run) - before
    kept = {name: (first / name).read_text() for name in ("predictions.jsonl", "test_metrics.json")}
    evaluate_run(fitted_run, "test", *minilm, "--model.generation.max_new_tokens=2")
    (second,) = folders(fitted_run) - before - {first}
    assert (first.name, second.name) == ("test-last", "test-last-2")
    assert {name: (first / name).read_text() for name in kept} == kept  # untouched
    metrics = [json.loads((d / "test_metrics.json").read_text()) for d in (first, second)]
    assert [m["generation"]["max_new_tokens"] for m in metrics] == [4, 2]
    assert all(m["ckpt_path"] == str(fitted_run / "checkpoints" / "last.ckpt") for m in metrics)


def test_a_scorer_that_cannot_load_stops_test_before_any_generation(fitted_run, monkeypatch):
    """roberta-large offline: one line naming the keys and the shipped encoder, before a single answer."""
    from capyft import generation
    from capyft.checks import ConfigError

    calls = []
    monkeypatch.setattr(generation, "generate", lambda *args, **kwargs: calls.append(1))
    before = folders(fitted_run)
    with pytest.raises(ConfigError) as error:
        evaluate_run(fitted_run, "test", "--model.bertscore.model_type=roberta-large")
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.bertscore.model_type: cannot load the BERTScore encoder")
    assert f"--model.bertscore.model_type {minilm_dir()} --model.bertscore.num_layers 6" in message
    assert calls == [] and folders(fitted_run) == before
    args = [
        "test",
        "--config",
        str(fitted_run / "config.yaml"),
        "--ckpt_path=last",
        "--trainer.enable_progress_bar=false",
    ]
    assert run([*args, "--model.bertscore.model_type=roberta-large"]) == 2  # `python -m capyft`: one line, status 2


def test_answers_are_written_before_scoring(fitted_run, monkeypatch):
    """A scoring failure after generation leaves every answer on disk."""

    def broken(*args, **kwargs):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(evaluation, "score", broken)
    before = folders(fitted_run)
    minilm = (f"--model.bertscore.model_type={MINILM.model_type}", "--model.bertscore.num_layers=6")
    with pytest.raises(RuntimeError, match="scoring failed"):
        evaluate_run(fitted_run, "test", *minilm, "--model.compare_base=true")
    (out,) = folders(fitted_run) - before
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == [26, 27, 28, 29] and not (out / "test_metrics.json").exists()
    assert all(isinstance(r["prediction"], str) and isinstance(r["base_prediction"], str) for r in records)


def test_stop_ids_add_the_models_own_end_ids(llama3_tokenizer, tiny_model, tokenizer):
    """Llama-3.1 lists <|end_of_text|>, <|eom_id|> and <|eot_id|> as its end ids; the template gives <|eot_id|>."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from capyft.conversation import ChatSession
    from capyft.generation import stop_ids

    assert end_of_turn_ids(llama3_tokenizer) == [128009]
    llama = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[128001, 128008, 128009]))
    assert stop_ids(llama3_tokenizer, llama) == [128001, 128008, 128009]
    assert stop_ids(llama3_tokenizer, SimpleNamespace(generation_config=GenerationConfig(eos_token_id=128008))) == [
        128008,
        128009,
    ]
    assert stop_ids(llama3_tokenizer) == [128009]
    chat = ChatSession(llama, llama3_tokenizer, GenerationSettings(), max_context=4096)
    assert chat.stop_ids == [128001, 128008, 128009]

    # generation ends at a token only the model's generation config names (as <|eom_id|> for Llama-3.1)
    batch = batch_of(PROMPTS[:1], tokenizer)
    newline, eom = int(batch["input_ids"][0, -1]), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    red, green = tokenizer.encode(" red green", add_special_tokens=False)
    model = chain_model(tiny_model, [newline, red, eom, green])
    model.generation_config.eos_token_id = [eom]
    assert eom not in end_of_turn_ids(tokenizer)
    settings = GenerationSettings(max_new_tokens=20)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, stop_ids(tokenizer, model))
    assert (out[0].text, out[0].num_tokens, out[0].stopped) == ("red", 2, True)
