"""``python -m capyft export`` and ``chat`` on a tiny_model Llama trained for 2 steps (whole file: ~60 s on CPU)."""

import io
import json
import os

import pytest
import torch
from helpers import fit_args
from safetensors.torch import load_file

from capyft import cli
from capyft.answers import ContextError, fit_to_context, predict_file, prompt_and_reference
from capyft.chat import encode_prompt, end_of_turn_ids, render
from capyft.checkpoints import checkpoint_hparams, load_checkpoint, load_for_inference
from capyft.conversation import ChatSession, repl
from capyft.data import SAMPLE_DATA
from capyft.export import export
from capyft.generation import GenerationSettings
from capyft.levers import disable_cpu_weight_packing

QUESTION = [{"role": "user", "content": "Hello there, what is the capital of France?"}]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """A real run dir: 2 QLoRA steps (4-bit base) at a high learning rate, so LoRA B is far from its zero init; its
    config.yaml saves 7 new tokens as the generation setting (chat's default)."""
    root = tmp_path_factory.mktemp("export-run")
    extra = ["--seed_everything=0", "--model.learning_rate=0.02", "--model.warmup_steps=0"]
    extra += ["--model.generation.max_new_tokens=7", "--data.train_size=4", "--trainer.max_steps=2"]
    extra += ["--trainer.val_check_interval=2", "--trainer.enable_model_summary=false"]
    cli.main(fit_args(root, tiny_model, SAMPLE_DATA, *extra))
    return root / "runs" / "tiny" / "version_0"


@pytest.fixture(scope="module")
def ckpt(run):
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def input_ids(tokenizer):
    return torch.tensor([encode_prompt(QUESTION, tokenizer)])


def logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


def plain_base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def module_logits(ckpt, input_ids):
    """Logits of the trained QLoRAModule itself: 4-bit base plus the checkpoint's adapter."""
    from capyft.model import QLoRAModule

    checkpoint = load_checkpoint(ckpt)
    hparams = {k: v for k, v in checkpoint_hparams(checkpoint).items() if not k.startswith("_")}
    module = QLoRAModule(**hparams)
    module.configure_model()
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not result.unexpected_keys
    return logits(module.model, input_ids)


@pytest.fixture(scope="module")
def adapter_out(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "adapter"
    assert cli.main(["export", "--ckpt_path", str(ckpt), "--out", str(out)]) == 0
    return out


def test_adapter_export_loads_with_plain_peft_and_gives_the_module_logits(
    adapter_out, tiny_model, tokenizer, input_ids, module_logits
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= set(os.listdir(adapter_out))
    config = json.loads((adapter_out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    weights = load_file(adapter_out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights) and {v.dtype for v in weights.values()} == {torch.float32}
    assert AutoTokenizer.from_pretrained(adapter_out).chat_template == tokenizer.chat_template

    # the same 4-bit base the module trained on, built with plain transformers, plus the exported adapter
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base4 = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, dtype=torch.float32)
    # as in training: without this, bitsandbytes on AVX512-BF16 CPUs repacks the 4-bit weights for a bf16 kernel
    # during no-grad passes, which moves these logits by ~0.03 (see capyft.levers.disable_cpu_weight_packing)
    disable_cpu_weight_packing(base4)
    base_only = logits(base4, input_ids)
    exported = logits(PeftModel.from_pretrained(base4, adapter_out), input_ids)
    assert torch.allclose(exported, module_logits, atol=1e-5), (exported - module_logits).abs().max()
    assert (exported - base_only).abs().max() > 0.1  # the adapter matters: LoRA B trained away from zero


def evaluated_logits(ckpt, input_ids):
    """The model as evaluated, 4-bit base + adapter, unmerged, computed in float32."""
    model, _, _ = load_for_inference(ckpt_path=ckpt, dtype="float32", device="cpu")
    with torch.no_grad():
        with_adapter = logits(model, input_ids)
        with model.disable_adapter():
            without = logits(model, input_ids)
    return with_adapter, without


def kl(reference, candidate):
    ref = torch.log_softmax(reference, -1)
    return float((ref.exp() * (ref - torch.log_softmax(candidate, -1))).sum(-1).mean())


def test_merge_defaults_to_the_evaluated_quantized_base_and_reports_fidelity(
    ckpt, run, adapter_out, tiny_model, tokenizer, input_ids, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    assert cli.main(["export", "--ckpt_path", str(ckpt), "--out", str(merged_dir), "--merge"]) == 0
    assert not any(name.startswith("adapter_") for name in os.listdir(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain transformers folder: no peft, no 4-bit
    assert merged.dtype == torch.float32 and getattr(merged.config, "quantization_config", None) is None
    assert set(end_of_turn_ids(tokenizer)) <= set(merged.generation_config.eos_token_id)
    evaluated, without_adapter = evaluated_logits(ckpt, input_ids)
    merged_logits = logits(merged, input_ids)
    # the merged model is the evaluated one: KL < 1e-6 (measured ~1e-12) and the same greedy token everywhere
    assert kl(evaluated, merged_logits) < 1e-6
    assert torch.equal(merged_logits.argmax(-1), evaluated.argmax(-1))
    assert kl(evaluated, without_adapter) > 0.01  # while the adapter itself matters

    fidelity = json.loads((merged_dir / "fidelity.json").read_text())
    assert fidelity["merge_base"] == "quantized" and fidelity["saved_dtype"] == "float32"
    assert fidelity["mean_kl"] < 1e-6 and fidelity["next_token_agreement"] == 1.0
    assert fidelity["adapter_kl"] > 0.01 and fidelity["adapter_effect_kept"] == pytest.approx(1.0, abs=1e-3)
    assert fidelity["conversations"] == f"test rows of {SAMPLE_DATA}" and fidelity["tokens"] > 100
    assert "warning" not in fidelity
    assert f"mean KL {fidelity['mean_kl']:.3g}, next-token agreement 100.0%" in capsys.readouterr().out

    # the original 16/32-bit base, on request: equal to that base + adapter, and measured as further from what
    # was evaluated (the tiny_model model's random weights lose much to NF4)
    original_dir = export(tmp_path / "original", ckpt_path=ckpt, merge=True, merge_base="original")
    original = logits(AutoModelForCausalLM.from_pretrained(original_dir), input_ids)
    unmerged = logits(PeftModel.from_pretrained(plain_base(tiny_model), adapter_out), input_ids)
    assert torch.allclose(original, unmerged, atol=1e-4), (original - unmerged).abs().max()
    original_fidelity = json.loads((original_dir / "fidelity.json").read_text())
    assert original_fidelity["merge_base"] == "original"
    assert original_fidelity["mean_kl"] > 1000 * max(fidelity["mean_kl"], 1e-9)

    # from the run's PEFT adapter folder instead of the checkpoint (quantization read from the run's config.yaml)
    from_adapter = export(tmp_path / "merged2", adapter=run / "adapter" / "final", merge=True)
    assert torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(from_adapter), input_ids), merged_logits, atol=1e-5
    )


def test_bfloat16_merge_is_measured_as_saved_and_warns_past_the_tolerance(ckpt, input_ids, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from capyft import export as export_module

    out = export(tmp_path / "bf16", ckpt_path=ckpt, merge=True, dtype="bfloat16")
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["saved_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # fidelity.json measures the saved (rounded) weights: recompute it from the saved folder
    evaluated, _ = evaluated_logits(ckpt, input_ids)
    assert kl(evaluated, logits(saved, input_ids)) > 1e-6  # rounding to bf16 costs something ...
    assert fidelity["mean_kl"] > 1e-6 and fidelity["kl_share_of_adapter_effect"] < 0.1  # ... little here
    # past the tolerance export warns, in fidelity.json too (SmolLM2 with a small adapter: bf16 loses ~1/3)
    monkeypatch.setattr(export_module, "FIDELITY_TOLERANCE", fidelity["kl_share_of_adapter_effect"] / 2)
    warned = json.loads(
        (export(tmp_path / "bf16b", ckpt_path=ckpt, merge=True, dtype="bfloat16") / "fidelity.json").read_text()
    )
    assert "merge with --merge_base quantized --dtype float32" in warned["warning"]


def test_adapter_export_casts_to_dtype(ckpt, run, adapter_out, tmp_path):
    reference = load_file(adapter_out / "adapter_model.safetensors")
    for name, source in [("ckpt", {"ckpt_path": ckpt}), ("adapter", {"adapter": run / "adapter" / "final"})]:
        out = export(tmp_path / name, dtype="bfloat16", **source)
        weights = load_file(out / "adapter_model.safetensors")
        assert weights.keys() == reference.keys() and {v.dtype for v in weights.values()} == {torch.bfloat16}
        assert all(torch.equal(weights[k], reference[k].bfloat16()) for k in weights)
        assert (out / "adapter_config.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_chat_loads_checkpoint_adapter_folder_or_base_alike(ckpt, run, tiny_model, loaded, input_ids):
    from_ckpt = logits(loaded[0], input_ids)
    from_adapter, _, _ = load_for_inference(adapter=run / "adapter" / "final")
    assert torch.allclose(logits(from_adapter, input_ids), from_ckpt, atol=1e-5)
    base_only, _, checkpoint = load_for_inference(model=str(tiny_model))
    assert checkpoint == {} and torch.allclose(logits(base_only, input_ids), logits(plain_base(tiny_model), input_ids))


class Opaque:  # any pickled class: weights_only loading must refuse it
    pass


def test_export_errors(ckpt, adapter_out, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path)
    (tmp_path / "corrupt.ckpt").write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "corrupt.ckpt")
    flipped = bytearray(ckpt.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one damaged byte inside a tensor record: torch.load would read it silently
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="fails its CRC check"):
        load_checkpoint(tmp_path / "flipped.ckpt")
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not a capyft checkpoint"):
        load_checkpoint(tmp_path / "x.ckpt")
    torch.save({"state_dict": {}, "extra": Opaque()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="Python objects"):
        load_checkpoint(tmp_path / "pickled.ckpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export(tmp_path / "full", ckpt_path=ckpt)
    with pytest.raises(ValueError, match="exactly one source"):
        export(tmp_path / "out", ckpt_path=ckpt, adapter=tmp_path)
    with pytest.raises(ValueError, match="not inside a capyft run dir .* or merge into --merge_base original"):
        export(tmp_path / "out", adapter=adapter_out, merge=True)  # how the base was quantized is unknown
    with pytest.raises(SystemExit):  # argparse: usage + message, exit status 2
        cli.main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_for_inference(ckpt_path=ckpt)


def test_chat_repl_streams_answers_and_keeps_history(loaded, monkeypatch):
    model, tokenizer, _ = loaded
    session = ChatSession(model, tokenizer, GenerationSettings(max_new_tokens=6))
    prompts, histories = [], []
    generate = model.generate

    def recording_generate(**kwargs):
        prompts.append(tokenizer.decode(kwargs["input_ids"][0]))
        histories.append(list(session.messages))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    stdout = io.StringIO()
    repl(session, io.StringIO("hello\nhow are you\n/reset\nhi\n/exit\nnever read\n"), stdout)

    assert len(prompts) == 3
    first_exchange = histories[1]
    assert [m["role"] for m in first_exchange] == ["user", "assistant"] and first_exchange[0]["content"] == "hello"
    second_turn = [*first_exchange, {"role": "user", "content": "how are you"}]
    assert prompts[1] == render(tokenizer, second_turn, add_generation_prompt=True)  # the whole first exchange
    assert histories[2] == [] and prompts[2] == render(tokenizer, [{"role": "user", "content": "hi"}], True)
    assert [m["content"] for m in session.messages][:1] == ["hi"] and len(session.messages) == 2
    text = stdout.getvalue()
    assert "(conversation cleared)" in text and text.count("assistant> ") == 3
    assert first_exchange[1]["content"] in text  # the streamed answer is the one kept in the history


def test_chat_cli_answers_from_stdin(ckpt, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhi\n/exit\n"))
    assert cli.main(["chat", "--ckpt_path", str(ckpt), "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "(conversation cleared)" in out


def test_batch_prediction_writes_one_answer_per_row_in_order(ckpt, loaded, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        {
            "conversation": [
                {"input": "Name a colour.", "output": "Blue."},
                {"input": "Another, longer?", "output": "Red."},
            ]
        },
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]
    src, dst = tmp_path / "convs.jsonl", tmp_path / "answers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["chat", "--ckpt_path", str(ckpt), "--input", str(src), "--output", str(dst), "--max_new_tokens", "6"]
    assert cli.main([*args, "--batch_size", "2"]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["index"] for r in out] == [0, 1, 2]
    assert [r.get("reference") for r in out] == ["4", "Red.", None]
    assert out[1]["messages"][:3] == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, longer?"},
    ]
    assert all(r["messages"][-1] == {"role": "assistant", "content": r["answer"]} for r in out)

    # left-padded batches answer exactly as one prompt at a time (greedy)
    model, tokenizer, _ = loaded
    settings = GenerationSettings(max_new_tokens=6)
    assert ChatSession(model, tokenizer, settings).reply("What is 2+2?") == out[0]["answer"]
    predict_file(model, tokenizer, src, tmp_path / "one_by_one.jsonl", settings, batch_size=1)
    one_by_one = [json.loads(line)["answer"] for line in (tmp_path / "one_by_one.jsonl").read_text().splitlines()]
    assert one_by_one == [r["answer"] for r in out]


def test_prompt_and_reference_rules(loaded, tmp_path):
    user, bot = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    assert prompt_and_reference([user, bot, user]) == ([user, bot, user], None)
    assert prompt_and_reference([user, bot, user, bot]) == ([user, bot, user], "a")
    with pytest.raises(ValueError, match="end with a user message"):
        prompt_and_reference([{"role": "system", "content": "s"}])
    with pytest.raises(ValueError, match="known role"):
        prompt_and_reference([{"role": "robot", "content": "x"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        predict_file(loaded[0], loaded[1], bad, tmp_path / "o.jsonl", GenerationSettings())


def test_chat_serves_the_scored_4bit_model_and_answers_as_the_test_hook(ckpt, run, loaded, input_ids, tmp_path):
    """chat on CPU loads the 4-bit base + adapter that `test` scored, with the run's generation settings (7 new
    tokens, from its config.yaml), and `chat --input` answers each test prompt exactly as `test` did."""
    import bitsandbytes as bnb

    from capyft.assets import minilm_dir
    from capyft.model import QLoRAModule

    checkpoint = load_checkpoint(ckpt)
    hparams = {k: v for k, v in checkpoint_hparams(checkpoint).items() if not k.startswith("_")}
    module = QLoRAModule(**hparams)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    model = loaded[0]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # 4-bit on CPU, as trained
    assert torch.equal(logits(model, input_ids), logits(module.model, input_ids))

    # fmt: off
    cli.main([
        "test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
        "--model.bertscore.model_type", str(minilm_dir()), "--model.bertscore.num_layers", "6",
    ])
    # fmt: on
    predictions = max(run.glob("**/predictions.jsonl"), key=lambda p: p.stat().st_mtime)
    hook = [json.loads(line) for line in predictions.read_text().splitlines()]
    src, dst = tmp_path / "test_rows.jsonl", tmp_path / "answers.jsonl"
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()][6:8]  # test rows: after 4 + 2
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli.main(["chat", "--ckpt_path", str(ckpt), "--input", str(src), "--output", str(dst)]) == 0
    answers = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [a["reference"] for a in answers] == [r["reference"] for r in hook]  # the same prompts
    assert [a["answer"] for a in answers] == [r["prediction"] for r in hook] and len(hook) == 2
    assert any(r["num_tokens"] == 7 and not r["stopped"] for r in hook)  # the run's 7 tokens, not a chat default


def test_fit_to_context_drops_the_oldest_turns_and_keeps_system_and_newest(tokenizer):
    system = {"role": "system", "content": "Be brief."}
    turns = [
        [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
        for i in range(3)
    ]
    newest = {"role": "user", "content": "and now?"}
    messages = [system, *turns[0], *turns[1], *turns[2], newest]
    kept_two_turns_ago = [system, *turns[2], newest]
    budget = len(encode_prompt(kept_two_turns_ago, tokenizer))
    ids, kept, dropped = fit_to_context(messages, tokenizer, None, budget)
    assert (kept, dropped) == (kept_two_turns_ago, 2) and ids == encode_prompt(kept, tokenizer)
    assert fit_to_context(messages, tokenizer, None, None)[1:] == (messages, 0)
    alone = len(encode_prompt([system, newest], tokenizer))
    assert fit_to_context(messages, tokenizer, None, alone)[1:] == ([system, newest], 3)
    with pytest.raises(ContextError, match=f"the message is {alone} tokens .* but only {alone - 1} fit"):
        fit_to_context(messages, tokenizer, None, alone - 1)


def test_chat_trims_history_to_the_context_and_refuses_a_message_too_long(loaded, monkeypatch):
    model, tokenizer, _ = loaded
    settings = GenerationSettings(max_new_tokens=6)
    first = [{"role": "user", "content": "hello " * 10}]
    max_context = len(encode_prompt(first, tokenizer)) + 6 + 8  # room for one exchange, not for two
    session = ChatSession(model, tokenizer, settings, max_context=max_context)
    lengths = []
    generate = model.generate

    def recording_generate(**kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    stdout = io.StringIO()
    repl(
        session,
        io.StringIO("hello " * 10 + "\n" + "second " * 8 + "\n" + "long " * 200 + "\n" + "third " * 8 + "\n/exit\n"),
        stdout,
    )
    text = stdout.getvalue()
    assert text.count("(dropped 1 old turn to fit the context)") == 2  # at "second" and at "third"
    assert "(not sent: the message is" in text and "shorten it, or lower --max_new_tokens" in text
    assert len(lengths) == 3 and all(n + 6 <= max_context for n in lengths)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] and session.messages[0]["content"] == (
        "third " * 8
    ).strip()


def test_chat_cli_max_context(ckpt, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nhi again\n/exit\n"))
    assert cli.main(["chat", "--ckpt_path", str(ckpt), "--max_new_tokens", "4", "--max_context", "40"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "(dropped 1 old turn to fit the context)" in out


def test_chat_output_that_cannot_be_written_fails_before_the_model_loads(ckpt, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr("capyft.conversation.load_for_inference", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"messages": QUESTION}) + "\n")
    output = blocker / "answers.jsonl"  # its parent is a file: nothing can be written there, root or not
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", "--ckpt_path", str(ckpt), "--input", str(rows), "--output", str(output)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--output" in err and str(blocker) in err and len(err.strip().splitlines()) == 1
