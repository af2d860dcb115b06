"""``python -m capyft export`` and ``chat`` on a tiny Llama trained for 2 steps (whole file: ~30 s on CPU)."""

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from capyft import cli
from capyft.assets import smollm2_dir
from capyft.chat import encode_prompt, end_of_turn_ids, render
from capyft.checkpoints import checkpoint_hparams, load_checkpoint
from capyft.conversation import (
    ChatSession,
    generation_config,
    load_for_inference,
    predict_file,
    prompt_and_reference,
    repl,
)
from capyft.data import SAMPLE_DATA
from capyft.export import export
from capyft.levers import disable_cpu_weight_packing
from capyft.tiny import make_tiny_llama

QUESTION = [{"role": "user", "content": "Hello there, what is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), smollm2_dir())


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A real run dir: 2 QLoRA steps (4-bit base) at a high learning rate, so LoRA B is far from its zero init."""
    save_dir = tmp_path_factory.mktemp("runs")
    # fmt: off
    cli.main([
        "fit", "--seed_everything", "0",
        "--model.model_name_or_path", str(tiny), "--model.compute_dtype", "float32",
        "--model.lora_r", "8", "--model.lora_alpha", "16", "--model.learning_rate", "0.02", "--model.warmup_steps", "0",
        "--data.source", str(SAMPLE_DATA), "--data.train_size", "4", "--data.val_size", "2", "--data.test_size", "0",
        "--data.max_length", "256", "--data.batch_size", "2",
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
        "--trainer.max_epochs", "-1", "--trainer.val_check_interval", "2",
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", "tiny",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ])
    # fmt: on
    return save_dir / "tiny" / "version_0"


@pytest.fixture(scope="module")
def ckpt(run):
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def input_ids(tokenizer):
    return torch.tensor([encode_prompt(QUESTION, tokenizer)])


def logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


def plain_base(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)


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
    adapter_out, tiny, tokenizer, input_ids, module_logits
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= set(os.listdir(adapter_out))
    config = json.loads((adapter_out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny)
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
    base4 = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=quant, dtype=torch.float32)
    # as in training: without this, bitsandbytes on AVX512-BF16 CPUs repacks the 4-bit weights for a bf16 kernel
    # during no-grad passes, which moves these logits by ~0.03 (see capyft.levers.disable_cpu_weight_packing)
    disable_cpu_weight_packing(base4)
    base_only = logits(base4, input_ids)
    exported = logits(PeftModel.from_pretrained(base4, adapter_out), input_ids)
    assert torch.allclose(exported, module_logits, atol=1e-5), (exported - module_logits).abs().max()
    assert (exported - base_only).abs().max() > 0.1  # the adapter matters: LoRA B trained away from zero


def test_merged_model_equals_base_plus_adapter(ckpt, run, adapter_out, tiny, tokenizer, input_ids, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    assert (
        cli.main(["export", "--ckpt_path", str(ckpt), "--out", str(merged_dir), "--merge", "--dtype", "float32"]) == 0
    )
    assert not any(name.startswith("adapter_") for name in os.listdir(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain transformers folder, no peft needed
    assert merged.dtype == torch.float32
    assert set(end_of_turn_ids(tokenizer)) <= set(merged.generation_config.eos_token_id)
    merged_logits = logits(merged, input_ids)
    unmerged = logits(PeftModel.from_pretrained(plain_base(tiny), adapter_out), input_ids)
    assert torch.allclose(merged_logits, unmerged, atol=1e-4), (merged_logits - unmerged).abs().max()
    assert (merged_logits - logits(plain_base(tiny), input_ids)).abs().max() > 0.1

    # from the run's PEFT adapter folder instead of the checkpoint: the same merged model
    from_adapter = export(tmp_path / "merged2", adapter=run / "adapter" / "final", merge=True, dtype="float32")
    assert torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(from_adapter), input_ids), merged_logits, atol=1e-5
    )


def test_adapter_export_casts_to_dtype(ckpt, run, adapter_out, tmp_path):
    reference = load_file(adapter_out / "adapter_model.safetensors")
    for name, source in [("ckpt", {"ckpt_path": ckpt}), ("adapter", {"adapter": run / "adapter" / "final"})]:
        out = export(tmp_path / name, dtype="bfloat16", **source)
        weights = load_file(out / "adapter_model.safetensors")
        assert weights.keys() == reference.keys() and {v.dtype for v in weights.values()} == {torch.bfloat16}
        assert all(torch.equal(weights[k], reference[k].bfloat16()) for k in weights)
        assert (out / "adapter_config.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_chat_loads_checkpoint_adapter_folder_or_base_alike(ckpt, run, tiny, loaded, input_ids):
    from_ckpt = logits(loaded[0], input_ids)
    from_adapter, _, _ = load_for_inference(adapter=run / "adapter" / "final")
    assert torch.allclose(logits(from_adapter, input_ids), from_ckpt, atol=1e-5)
    base_only, _, checkpoint = load_for_inference(model=str(tiny))
    assert checkpoint == {} and torch.allclose(logits(base_only, input_ids), logits(plain_base(tiny), input_ids))


class Opaque:  # any pickled class: weights_only loading must refuse it
    pass


def test_export_errors(ckpt, tmp_path):
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
    with pytest.raises(SystemExit):  # argparse: usage + message, exit status 2
        cli.main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_for_inference(ckpt_path=ckpt)


def test_chat_repl_streams_answers_and_keeps_history(loaded, monkeypatch):
    model, tokenizer, _ = loaded
    session = ChatSession(model, tokenizer, generation_config(tokenizer, max_new_tokens=6))
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
    config = generation_config(tokenizer, max_new_tokens=6)
    assert ChatSession(model, tokenizer, config).reply("What is 2+2?") == out[0]["answer"]
    predict_file(model, tokenizer, src, tmp_path / "one_by_one.jsonl", config, batch_size=1)
    one_by_one = [json.loads(line)["answer"] for line in (tmp_path / "one_by_one.jsonl").read_text().splitlines()]
    assert one_by_one == [r["answer"] for r in out]


def test_prompt_and_reference_rules(tmp_path):
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
        predict_file(None, None, bad, tmp_path / "o.jsonl", None)
