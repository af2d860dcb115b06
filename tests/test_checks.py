"""Up-front checks: impossible values, folders without tokenizer files, malformed JSONL, unwritable outputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from helpers import fit_args

from capyft import checks
from capyft.checks import ConfigError
from capyft.data import SAMPLE_DATA


def parsed_model(*args: str) -> dict:
    """The ``model`` section as the CLI parses it (jsonargparse over ``QLoRAModule``), as a dict."""
    from jsonargparse import ArgumentParser

    from capyft.model import QLoRAModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(QLoRAModule, "model")
    return parser.parse_args(["--model.model_name_or_path=m", *args]).model.as_dict()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.learning_rate=-1"], "model.learning_rate: -1.0 is not a usable learning rate; give a positive"),
        (["--model.learning_rate=0"], "model.learning_rate: 0.0 is not a usable learning rate"),
        (["--model.lora_r=-4"], "model.lora_r: -4 must be a LoRA rank >= 1"),
        (["--model.lora_r=0"], "model.lora_r: 0 must be a LoRA rank >= 1"),
        (["--model.lora_alpha=0"], "model.lora_alpha: 0 must be > 0"),
        (["--model.lora_dropout=1.0"], "model.lora_dropout: 1.0 must be in [0, 1)"),
        (["--model.lora_dropout=-0.1"], "model.lora_dropout: -0.1 must be in [0, 1)"),
        (["--model.warmup_steps=-1"], "model.warmup_steps: -1 must be a whole number of steps >= 0"),
        (["--model.weight_decay=-0.5"], "model.weight_decay: -0.5 must be a number >= 0"),
        (["--model.loss_chunk_size=-1"], "model.loss_chunk_size: -1 must be >= 0 tokens"),
        (["--model.generation.max_new_tokens=0"], "model.generation.max_new_tokens: 0 must be >= 1 token"),
        (["--model.generation.top_p=0"], "model.generation.top_p: 0.0 must be in (0, 1]"),
        (["--model.generation.temperature=0"], "model.generation.temperature: 0.0 must be > 0"),
    ],
)
def test_impossible_model_values(args, message):
    with pytest.raises(ConfigError) as raised:
        checks.check_model_values(parsed_model(*args))
    assert str(raised.value).startswith(message)


def test_usable_model_values_pass():
    checks.check_model_values(parsed_model())  # QLoRAModule's defaults
    checks.check_model_values(parsed_model("--model.lora_dropout=0", "--model.warmup_steps=0", "--model.lora_r=1"))
    checks.check_model_values({})  # keys not given are not checked
    with pytest.raises(ConfigError, match="model.learning_rate: nan is not a usable learning rate"):
        checks.check_model_values({"learning_rate": float("nan")})  # from a dict built in code (the parser refuses it)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 0}, "data.batch_size: 0 must be >= 1 conversation per micro-batch"),
        ({"batch_size": -2}, "data.batch_size: -2 must be >= 1"),
        ({"eval_batch_size": 0}, "data.eval_batch_size: 0 must be >= 1"),
        ({"max_length": 0}, "data.max_length: 0 must be a positive number of tokens, or null"),
        ({"train_size": -1}, "data.train_size: -1 must be >= 0 conversations, or null"),
        ({"val_size": -1}, "data.val_size: -1 must be >= 0"),
        ({"pad_to_multiple_of": 0}, "data.pad_to_multiple_of: 0 must be >= 1, or null"),
    ],
)
def test_impossible_data_values(values, message):
    with pytest.raises(ConfigError) as raised:
        checks.check_data_values(values)
    assert str(raised.value).startswith(message)


def test_usable_data_values_pass():
    checks.check_data_values({"batch_size": 1, "eval_batch_size": 8, "max_length": None, "train_size": None})
    checks.check_data_values({"batch_size": "auto"})  # resolved elsewhere


def test_model_folder_without_tokenizer_files(tmp_path, tiny_model):
    folder = tmp_path / "weights-only"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    with pytest.raises(ConfigError) as raised:
        checks.check_model_path(str(folder))
    assert str(raised.value) == (
        f"model.model_name_or_path: {folder} has no tokenizer files (expected tokenizer.json, or tokenizer.model / "
        "spiece.model for SentencePiece, or vocab.json + merges.txt, with tokenizer_config.json); copy them from "
        "the base model's folder or hub repo"
    )
    checks.check_model_path(str(tiny_model))  # the complete folder passes


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"{GOOD}\n{GOOD[:-2]}\n", f"line 2 is not valid JSON (Expecting ',' delimiter at column {len(GOOD) - 1})"),
        (f"{GOOD}\n\n{GOOD}}}\n", f"line 3 is not valid JSON (Extra data at column {len(GOOD) + 1})"),
        (f"{GOOD}\n[1, 2]\n", "line 2 holds a JSON list, not an object; each line must be one conversation"),
        (f"{GOOD}\n{GOOD[:30]}\x00{GOOD[30:]}\n", "line 2 holds a raw NUL byte (column 31): the file is damaged"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        checks.check_jsonl(path)
    assert str(raised.value).startswith(f"data.source: {path} {message}")


def test_jsonl_not_utf8_and_good_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.replace("Hello", "H\xe9llo").encode("latin-1") + b"\n")
    with pytest.raises(ConfigError, match=r"line 2 is not UTF-8 text .*; save the file as UTF-8"):
        checks.check_jsonl(path)
    path.write_text(f"{GOOD}\n\n{GOOD}\n", encoding="utf-8")
    assert checks.check_jsonl(path) == 2


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write to: chmod 555, or for root (whom permissions do not stop) /sys."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        yield folder
    else:
        probe.unlink()
        yield Path("/sys")  # sysfs refuses new files, to root too
    folder.chmod(0o755)


def test_unwritable_paths(read_only, tmp_path):
    with pytest.raises(ConfigError) as raised:
        checks.check_writable(read_only / "runs" / "tiny", "trainer.logger.init_args.save_dir")
    message = str(raised.value)
    assert message.startswith(
        f"trainer.logger.init_args.save_dir: cannot write to {read_only / 'runs' / 'tiny'} (its nearest existing "
        f"folder {read_only}): "
    )
    assert message.endswith("; choose a writable location or make it writable")
    with pytest.raises(ConfigError, match=f"--output: cannot write to {read_only}/answers.jsonl"):
        checks.check_writable(read_only / "answers.jsonl", "--output")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=f"checkpoint.dirpath: cannot create {a_file}/ckpt: {a_file} is a file"):
        checks.check_writable(a_file / "ckpt", "checkpoint.dirpath")
    # writable: passes and creates nothing
    checks.check_writable(tmp_path / "new" / "deeper", "checkpoint.dirpath")
    checks.check_writable(a_file, "--output")
    assert sorted(os.listdir(tmp_path)) == sorted(["a-file", "read-only"]) and a_file.read_text() == "x"


def test_run_outputs_from_the_parsed_trainer_and_checkpoint_sections(read_only, tmp_path):
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}}
    trainer = {"logger": logger, "default_root_dir": None}
    assert checks.run_output_dirs(trainer, {"dirpath": None}) == [("trainer.logger.init_args.save_dir", str(tmp_path))]
    assert checks.run_output_dirs({"logger": False}, {"dirpath": "ck"}) == [("checkpoint.dirpath", "ck")]
    assert checks.run_output_dirs({"logger": True, "default_root_dir": "root"}) == [
        ("trainer.default_root_dir", "root")
    ]
    checks.check_run_outputs(trainer, {"dirpath": str(tmp_path / "ckpt")})
    with pytest.raises(ConfigError, match=f"checkpoint.dirpath: cannot write to {read_only}/ckpt"):
        checks.check_run_outputs(trainer, {"dirpath": str(read_only / "ckpt")})
    bad_logger = {**logger, "init_args": {"save_dir": str(read_only / "runs")}}
    with pytest.raises(ConfigError, match="trainer.logger.init_args.save_dir: cannot write to"):
        checks.check_run_outputs({"logger": [bad_logger]}, None)


# ---- through the command line (checks already wired into `python -m capyft fit`) ------------------------------
def test_fit_names_the_bad_jsonl_line_and_the_tokenizerless_folder(tmp_path, tiny_model, no_model_load, caplog):
    from capyft.cli import run

    rows = [line for line in SAMPLE_DATA.read_text().splitlines()]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(rows[:5] + [rows[5][:-1]] + rows[6:]) + "\n", encoding="utf-8")
    weights_only = tmp_path / "weights-only"
    shutil.copytree(tiny_model, weights_only, ignore=shutil.ignore_patterns("tokenizer*"))
    for model, data, expected in [
        (tiny_model, broken, f"data.source: {broken} line 6 is not valid JSON (Expecting ',' delimiter at column"),
        (weights_only, SAMPLE_DATA, f"model.model_name_or_path: {weights_only} has no tokenizer files"),
    ]:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="capyft"):
            assert run(fit_args(tmp_path, model, data)) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith(expected), errors
