"""What a run leaves behind and when: ``best`` is the lowest ``val/loss`` of all validations (the last included),
``last`` is the final weights, the end of training is validated, TensorBoard steps continue across a resume, a
checkpoint's fixed settings are checked against the command line, and validation answers are logged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PLAIN_LORA_VALIDATED, fit_args, scalars, texts
from safetensors.torch import load_file

from capyft import assets
from capyft.cli import main, run
from capyft.tiny import make_tiny_llama


class Validations(L.Callback):
    """Records ``(global_step, val/loss)`` after every validation of a fit."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.seen.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def lora_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if "lora_" in k}


def same_adapter(folder: Path, checkpoint: Path) -> bool:
    saved = load_file(folder / "adapter_model.safetensors")
    expected = lora_tensors(checkpoint)
    # PEFT's saved names drop the adapter name ("default")
    expected = {k.replace(".default", ""): v for k, v in expected.items()}
    return saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def fit_with_validations(args: list[str]) -> tuple[object, Validations]:
    cli = main([*args, '--trainer.callbacks+={"class_path": "test_run_outputs.Validations"}'])
    (validations,) = [c for c in cli.trainer.callbacks if isinstance(c, Validations)]
    return cli, validations


def test_best_is_the_lowest_val_loss_of_all_validations_the_last_included(tmp_path, tiny_model, color_words):
    args = fit_args(
        tmp_path,
        tiny_model,
        color_words,
        *PLAIN_LORA_VALIDATED,
        "--trainer.max_steps=5",
        "--trainer.val_check_interval=2",
        "--checkpoint.every_n_train_steps=2",
    )
    cli, validations = fit_with_validations(args)
    assert [step for step, _ in validations.seen] == [2, 4, 5]  # every second step, and the final one
    best_step, best_loss = min(validations.seen, key=lambda s: s[1])
    assert best_step == 5  # lr 0.02 on a learnable set: the end is best, which a save-time judgement never saw
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert torch.load(best, weights_only=True)["global_step"] == best_step
    assert f"val_loss{best_loss:.4f}" in best.name
    run_dir = Path(cli.trainer.log_dir)
    assert same_adapter(run_dir / "adapter" / "best", best)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5  # last = the final weights
    assert same_adapter(run_dir / "adapter" / "final", last)


def test_the_end_of_training_is_validated_and_saved(tmp_path, tiny_model, color_words):
    """6 steps, validation every 4 and last.ckpt every 4: the end (step 6) gets both anyway."""
    args = fit_args(
        tmp_path,
        tiny_model,
        color_words,
        *PLAIN_LORA_VALIDATED,
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=4",
        "--checkpoint.every_n_train_steps=4",
    )
    cli, validations = fit_with_validations(args)
    assert [step for step, _ in validations.seen] == [4, 6]
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("saved_at", ["batch-end", "train-end", "validation-end"])
def test_tensorboard_steps_continue_after_an_epoch_end_resume(tmp_path, tiny_model, color_words, saved_at):
    """4 steps are one epoch: resuming from a checkpoint of that moment logs steps 4 and 5, as the uninterrupted run
    does. ``validation-end`` resumes from the best checkpoint, written right after the epoch-end validation."""

    def fit(*extra: str):
        return main(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA_VALIDATED, *extra))

    first_args = {
        "batch-end": ["--trainer.limit_val_batches=0", "--checkpoint.every_n_train_steps=4"],
        "train-end": ["--trainer.limit_val_batches=0"],
        "validation-end": ["--trainer.val_check_interval=4"],
    }[saved_at]
    first = fit("--trainer.max_steps=4", *first_args)
    assert sorted(scalars(Path(first.trainer.log_dir), "train/loss")) == [0, 1, 2, 3]
    ckpt = first.trainer.checkpoint_callback.best_model_path if saved_at == "validation-end" else "last"
    resumed = fit("--trainer.max_steps=6", "--trainer.limit_val_batches=0", f"--ckpt_path={ckpt}")
    assert sorted(scalars(Path(resumed.trainer.log_dir), "train/loss")) == [4, 5]


def test_command_line_wins_and_the_checkpoint_fixed_settings_must_agree(tmp_path, tiny_model, color_words, caplog):
    base = fit_args(
        tmp_path,
        tiny_model,
        color_words,
        *PLAIN_LORA_VALIDATED,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
    )
    main(base)  # tiny.yaml: lora_r 8
    resume = [*base, "--trainer.max_steps=3", "--ckpt_path=last"]
    assert run([*resume, "--model.lora_r=16"]) == 2
    assert "model.lora_r is 16 here but 8 in the checkpoint" in caplog.text

    other = make_tiny_llama(tmp_path / "other", assets.smollm2_dir(), layers=3)
    assert run([*resume, f"--model.model_name_or_path={other}"]) == 2
    assert "is another model than the checkpoint's" in caplog.text and "num_hidden_layers 2 vs 3" in caplog.text

    moved = tmp_path / "moved"
    shutil.copytree(tiny_model, moved)  # the same base in a new folder: accepted, and it trains on
    resumed = main([*resume, f"--model.model_name_or_path={moved}"])
    assert resumed.trainer.global_step == 3

    other_data = tmp_path / "other.jsonl"
    shutil.copy(color_words, other_data)
    main([*resume, "--trainer.max_steps=4", f"--data.source={other_data}"])  # allowed, but said
    assert f"the checkpoint was trained on {color_words}, this command reads {other_data}" in caplog.text


def test_validation_answers_are_logged_at_each_validation(tmp_path, tiny_model, color_words):
    args = fit_args(
        tmp_path,
        tiny_model,
        color_words,
        *PLAIN_LORA_VALIDATED,
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--model.val_answers=2",
        "--model.val_answer_tokens=3",
    )
    cli = main(args)
    logged = texts(Path(cli.trainer.log_dir), "val/answers")
    val_steps = sorted(scalars(Path(cli.trainer.log_dir), "val/loss"))
    assert sorted(logged) == val_steps and len(val_steps) == 2  # answers sit beside the val/loss they belong to
    references = cli.datamodule.sample_prompts(2)["reference"]
    for text in logged.values():
        assert all(f"*reference:* {ref}" in text for ref in references) and text.count("*prediction:*") == 2
    seconds = scalars(Path(cli.trainer.log_dir), "val/answer_seconds")  # what the answers cost, per validation
    assert sorted(seconds) == val_steps and all(s > 0 for s in seconds.values())
