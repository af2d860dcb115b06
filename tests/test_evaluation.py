"""Generation and BERTScore for ``capyft test``: order kept through batching, clean stops, offline scoring, and a
fine-tuned tiny model that beats its own base in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capyft import evaluation
from capyft.assets import minilm_dir, smollm2_dir
from capyft.chat import encode_prompt, end_of_turn_ids
from capyft.cli import main
from capyft.datamodule import PromptCollator
from capyft.evaluation import BERTScoreSettings
from capyft.generation import GenerationSettings, generate
from capyft.modeling import load_tokenizer
from capyft.tiny import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
MINILM = BERTScoreSettings(model_type=str(minilm_dir()), num_layers=6, batch_size=8)

# prompts of very uneven lengths (31 to ~430 tokens with SmolLM2's template and default system prompt)
PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "tell me about zebras " * 80}],
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b " * 40}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir())


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="module")
def scorer():
    return evaluation.load_scorer(MINILM)


def load_tiny(tiny_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)


def batch_of(prompts, tokenizer) -> dict:
    examples = [
        {"input_ids": encode_prompt(p, tokenizer), "row": i, "prompt": p, "reference": ""}
        for i, p in enumerate(prompts)
    ]
    return PromptCollator(tokenizer.pad_token_id)(examples)


def test_batched_generation_matches_one_prompt_at_a_time(tiny_dir, tokenizer):
    """Left padding and row order: each row of a padded batch gets the answer its prompt gets alone."""
    model, settings, stops = load_tiny(tiny_dir), GenerationSettings(max_new_tokens=12), end_of_turn_ids(tokenizer)
    batch = batch_of(PROMPTS, tokenizer)
    assert batch["attention_mask"].sum(1).tolist()[1] > 10 * batch["attention_mask"].sum(1).tolist()[0]
    batched = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, stops)
    alone = []
    for prompt in PROMPTS:
        one = batch_of([prompt], tokenizer)
        alone += generate(model, tokenizer, one["input_ids"], one["attention_mask"], settings, stops)
    assert batched == alone
    assert len({g.text for g in batched}) == len(PROMPTS)  # distinct answers, so a swap would show


def test_generate_uses_kv_cache_with_gradient_checkpointing_on(tiny_dir, tokenizer):
    """A training-mode PEFT model with gradient checkpointing generates with the cache and is left in train mode."""
    from capyft.modeling import build_lora_config, wrap_with_lora

    model = wrap_with_lora(load_tiny(tiny_dir), build_lora_config(r=4), gradient_checkpointing=True)
    assert model.training and model.config.use_cache is False
    lengths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    batch = batch_of(PROMPTS[:2], tokenizer)
    settings = GenerationSettings(max_new_tokens=5)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, [-1])  # never stops
    hook.remove()
    assert lengths == [batch["input_ids"].shape[1], 1, 1, 1, 1]  # whole prompt once, then one token per step
    assert [g.num_tokens for g in out] == [5, 5] and not any(g.stopped for g in out)
    assert model.training


def chain_model(tiny_dir: Path, chain: list[int]):
    """The tiny Llama rewired so each token of ``chain`` is followed by the next one, whatever the prompt.

    Attention and MLP outputs are zeroed, so the residual stream at a position is its token's embedding; each chain
    token gets its own embedding axis and the output head maps that axis to the next chain token.
    """
    model = load_tiny(tiny_dir)
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


def test_generation_stops_at_end_of_turn_and_holds_no_prompt_text(tiny_dir, tokenizer):
    batch = batch_of(PROMPTS[:2], tokenizer)
    newline = int(batch["input_ids"][0, -1])  # the generation prompt "<|im_start|>assistant\n" ends the prompt
    words = tokenizer.encode(" red green blue", add_special_tokens=False)
    end_of_turn = end_of_turn_ids(tokenizer)
    assert end_of_turn == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model = chain_model(tiny_dir, [newline, *words, end_of_turn[0], *words])
    settings = GenerationSettings(max_new_tokens=20)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, end_of_turn)
    assert [(g.text, g.num_tokens, g.stopped) for g in out] == [("red green blue", 4, True)] * 2


def test_generation_stops_at_any_stop_id(tiny_dir, tokenizer):
    """With several stop ids (Llama-3: <|eot_id|> and <|end_of_text|>), whichever comes first ends the answer."""
    batch = batch_of(PROMPTS[:1], tokenizer)
    newline, eos = int(batch["input_ids"][0, -1]), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    red, green = tokenizer.encode(" red green", add_special_tokens=False)
    model = chain_model(tiny_dir, [newline, red, eos, green])
    settings = GenerationSettings(max_new_tokens=20)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, [2, eos])
    assert (out[0].text, out[0].num_tokens, out[0].stopped) == ("red", 2, True)
    out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, [2])  # eos not a stop
    assert out[0].num_tokens == 20 and not out[0].stopped


def test_sampling_is_seeded(tiny_dir, tokenizer):
    model, stops = load_tiny(tiny_dir), end_of_turn_ids(tokenizer)
    batch = batch_of(PROMPTS[:2], tokenizer)
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    args = (model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, stops)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, second, other = generate(*args, seed=1), generate(*args, seed=1), generate(*args, seed=2)
    assert first == second != other
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched


def test_right_padding_is_refused(tiny_dir, tokenizer):
    ids, mask = torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left"):
        generate(load_tiny(tiny_dir), tokenizer, ids, mask, GenerationSettings(), [2])


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
    records, metrics = evaluation.evaluate(records, scorer, MINILM)
    assert records[0]["f1"] == pytest.approx(1.0, abs=1e-5) and records[0]["base_f1"] < 0.9
    assert metrics["test/bertscore_f1"] == pytest.approx((records[0]["f1"] + records[1]["f1"]) / 2)
    delta = metrics["test/bertscore_f1"] - metrics["test/base_bertscore_f1"]
    assert metrics["test/bertscore_f1_delta"] == pytest.approx(delta) and delta > 0


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
        subprocess.Popen([sys.executable, "-c", GATHER_WORKER, str(rank), str(init), str(outs[rank])], cwd=REPO)
        for rank in (0, 1)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    for out in outs:
        assert [r["row"] for r in json.loads(out.read_text())] == [0, 1, 2, 3, 4]


def toy_data(path: Path) -> Path:
    """Learnable toy chat: the answer is a fixed function of the question."""
    words = ["red", "green", "blue", "amber", "violet", "black"]
    with path.open("w") as f:
        for k in range(30):
            word = words[k % len(words)]
            messages = [
                {"role": "user", "content": f"Name the colour {word}"},
                {"role": "assistant", "content": f"The colour is {word}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_fine_tuned_beats_base_in_one_test_run(tmp_path, tiny_dir):
    """fit, then ``test --ckpt_path ... --model.compare_base true`` through the real CLI, 4-bit tiny Llama on CPU."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = toy_data(tmp_path / "toy.jsonl")
    fit = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            f"--model.model_name_or_path={tiny_dir}",
            f"--data.source={data}",
            "--data.train_size=24",
            "--data.val_size=2",
            "--data.test_size=4",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=30",
            "--trainer.limit_val_batches=0",
            "--model.learning_rate=0.01",
            "--model.warmup_steps=0",
            "--model.lr_schedule=constant",
        ]
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
    saved = json.loads((run / "test_metrics.json").read_text())
    assert logged["test/bertscore_f1"] > logged["test/base_bertscore_f1"] + 0.2
    assert logged["test/bertscore_f1_delta"] == pytest.approx(saved["test/bertscore_f1_delta"])
    assert logged["test/gen_tokens_per_sec"] > 0
    assert saved["bertscore_hash"].startswith(MINILM.model_type) and saved["num_examples"] == 4

    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == [26, 27, 28, 29]  # the 4 rows after train (24) and val (2), in order
    for record in records:
        assert record["reference"] == f"The colour is {record['prompt'][-1]['content'].split()[-1]}."
        assert record["prediction"] != record["base_prediction"]
        assert {"f1", "precision", "recall", "base_f1", "base_precision", "base_recall"} <= set(record)
        for leak in ("Name the colour", "SmolLM", "<|im_", "assistant"):
            assert leak not in record["prediction"]
    assert sum(r["stopped"] for r in records) > 0  # the fine-tuned model learned to end its turn

    events = EventAccumulator(str(sorted(run.glob("events.out.tfevents.*"))[-1]))
    events.Reload()
    assert "test/bertscore_f1_per_example" in events.Tags()["histograms"]
    assert "test/base_bertscore_f1_per_example" in events.Tags()["histograms"]
    assert any("test/examples" in tag for tag in events.Tags()["tensors"])
