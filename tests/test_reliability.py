"""Faults and what a run does on each (docs/faults.md): config and data errors fail early in one line, kills and
preemptions resume, non-finite steps are skipped and counted, out-of-memory names the knobs, checkpoints are safe.

Everything runs on CPU on a tiny plain-LoRA Llama; the kill tests run ``python -m capyft`` in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import PLAIN_LORA, REPO, fit_args, offline_env, one_turn, scalars, write_jsonl

from capyft import checkpoints, checks
from capyft.callbacks import NonFiniteGuard
from capyft.checkpoints import AtomicCheckpointIO
from capyft.cli import main, run
from capyft.model import QLoRAModule

# ModelCheckpoint (monitor val/loss) defers every save until val/loss exists: tests of checkpoints validate
WITH_VAL = "--trainer.limit_val_batches=1.0"


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs" / "tiny").glob("version_*"))


def lora_weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


# ---- 1. config errors: one line, before the model loads --------------------------------------------------------
def test_unknown_key_and_wrong_type_are_one_line(tmp_path, tiny_model, color_words, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["capyft"])  # else LightningCLI warns about pytest's own arguments
    for bad in (["--model.lora_rr=8"], ["--data.batch_size=two"]):
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, *bad))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "usage:" not in err, err
        assert bad[0].split("=")[0].lstrip("-") in err and "--help" in err
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"lora_rr": 8}}))
    with pytest.raises(SystemExit) as exit_info:
        main([*fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA), "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora_rr" in err, err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.model_name_or_path=./no/such/model"], "model.model_name_or_path: ./no/such/model does not exist"),
        (["--data.source=/no/such/data.jsonl"], "data.source: /no/such/data.jsonl does not exist"),
        (["--data.max_length=8"], "data.max_length: 8 tokens cannot hold a conversation"),
        (["--data.train_size=11"], "train_size 11 + val_size 2 + test_size 2 = 15 rows, but the training split has"),
        (["--ckpt_path=/no/such.ckpt"], "ckpt_path: /no/such.ckpt does not exist"),
    ],
)
def test_config_errors_fail_before_the_model_loads(
    tmp_path, tiny_model, color_words, no_model_load, caplog, extra, expected
):
    with caplog.at_level(logging.ERROR, logger="capyft"):
        assert run(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, *extra)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0], errors


def test_hub_id_offline_and_not_cached_is_a_config_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(checks.ConfigError, match="HF_HUB_OFFLINE forbids downloading it"):
        checks.check_model_path("capyft-test/not-a-cached-model")


def test_precision_the_device_cannot_run():
    # CPU: GPU-only precisions become bf16-mixed (the CLI logs it); what CPUs can run stays
    assert checks.resolve_precision("16-mixed", "float16", None) == "bf16-mixed"
    assert checks.resolve_precision("32-true", "float32", None) == "32-true"
    # a GPU without bfloat16 (Turing, 7.5): bf16 is an error that names the fix
    with pytest.raises(checks.ConfigError, match="trainer.precision: bf16-mixed .* use --trainer.precision 16-mixed"):
        checks.resolve_precision("bf16-mixed", "float16", (7, 5))
    with pytest.raises(checks.ConfigError, match="model.compute_dtype: bfloat16 .* use --model.compute_dtype float16"):
        checks.resolve_precision("16-mixed", "bfloat16", (7, 5))
    assert checks.resolve_precision("bf16-mixed", "bfloat16", (8, 0)) == "bf16-mixed"
    assert checks.resolve_precision("16-mixed", "float16", (7, 5)) == "16-mixed"


def test_lora_targets_that_match_nothing(tiny_model):
    from transformers import AutoModelForCausalLM

    from capyft.modeling import build_lora_config, wrap_with_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match=r"target_modules .*nope.* match no layer .*'q_proj'"):
        wrap_with_lora(base, build_lora_config(target_modules=["nope"]), gradient_checkpointing=False)


# ---- 2. data errors name the row; no usable row is an error ----------------------------------------------------
def test_data_errors_name_the_row_and_no_usable_row_fails(tmp_path, tiny_model, no_model_load, caplog):
    no_answer = {"messages": [{"role": "user", "content": "Hello?"}]}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [one_turn("Hi", "Hello"), no_answer, one_turn("Yo", "Hey")])
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [no_answer] * 3)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    sizes = ["--data.train_size=3", "--data.val_size=0", "--data.test_size=0"]
    cases = [
        (mixed, [], "row 1: the conversation has no assistant turn"),
        (all_bad, ["--data.on_bad_row=skip"], "the train split has no usable row left"),
        (empty, [], "data.source: " + str(empty) + " is empty"),
    ]
    for data, extra, expected in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="capyft"):
            assert run(fit_args(tmp_path, tiny_model, data, *PLAIN_LORA, *sizes, *extra)) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and expected in errors[0], errors


# ---- 3. kill -9, SIGTERM, atomic and corrupt checkpoints -------------------------------------------------------
class StepFile(L.Callback):
    """Writes the global step to ``path`` after every training batch (for a test watching a subprocess)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, *args) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        os.replace(tmp, self.path)


def read_step(path: Path) -> int:
    return int(path.read_text()) if path.exists() else -1


def launch(args: list[str], steps: Path) -> subprocess.Popen:
    callback = {"class_path": "test_reliability.StepFile", "init_args": {"path": str(steps)}}
    command = [sys.executable, "-m", "capyft", *args, f"--trainer.callbacks+={json.dumps(callback)}"]
    return subprocess.Popen(
        command, env=offline_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(proc: subprocess.Popen, steps: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while read_step(steps) < step:
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} within {timeout} s")
        time.sleep(0.05)


def test_kill_9_resumes_from_last_checkpoint(tmp_path, tiny_model, color_words):
    every = 2
    steps = tmp_path / "steps"
    extra = ["--trainer.max_steps=500", f"--checkpoint.every_n_train_steps={every}", WITH_VAL]  # validates at 3, 7
    args = fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, *extra)
    proc = launch(args, steps)
    wait_for_step(proc, steps, 5)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=30)
    done = read_step(steps)
    (run_dir,) = run_dirs(tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = ckpt["global_step"]
    assert 0 < saved <= done and done - saved <= every, (saved, done)

    resumed = main(
        fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, f"--trainer.max_steps={saved + 2}", "--ckpt_path=last")
    )
    assert resumed.trainer.global_step == saved + 2
    assert sorted(scalars(Path(resumed.trainer.log_dir), "train/loss")) == [saved, saved + 1]


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path, tiny_model, color_words):
    steps = tmp_path / "steps"
    # no periodic checkpoints: whatever is saved comes from the SIGTERM handling
    args = fit_args(
        tmp_path,
        tiny_model,
        color_words,
        *PLAIN_LORA,
        "--trainer.max_steps=500",
        "--checkpoint.every_n_train_steps=1000",
    )
    proc = launch(args, steps)
    wait_for_step(proc, steps, 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output[-3000:]
    assert "SIGTERM: saved" in output and "--ckpt_path last" in output
    (run_dir,) = run_dirs(tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == read_step(steps) >= 2  # saved at the step where it stopped: nothing lost

    saved = ckpt["global_step"]
    resumed = main(
        fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, f"--trainer.max_steps={saved + 1}", "--ckpt_path=last")
    )
    assert resumed.trainer.global_step == saved + 1
    assert sorted(scalars(Path(resumed.trainer.log_dir), "train/loss")) == [saved]


# dropout: the RNG state must resume too; validation after step 3 (tiny.yaml: val_check_interval 3)
EXACT = ["--model.lora_dropout=0.2", "--trainer.max_steps=5", WITH_VAL]
UNINTERRUPTED: dict[int, dict[int, float]] = {}  # accumulate_grad_batches -> the uninterrupted run's losses


def uninterrupted_losses(tmp_path_factory, tiny_model, color_words, accumulate: int) -> dict[int, float]:
    if accumulate not in UNINTERRUPTED:
        args = fit_args(tmp_path_factory.mktemp("straight"), tiny_model, color_words, *PLAIN_LORA, *EXACT)
        cli = main([*args, f"--trainer.accumulate_grad_batches={accumulate}"])
        UNINTERRUPTED[accumulate] = scalars(Path(cli.trainer.log_dir), "train/loss")
    return UNINTERRUPTED[accumulate]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, color_words) -> dict[int, float]:
    return uninterrupted_losses(tmp_path_factory, tiny_model, color_words, 1)


# (accumulation, micro-batch during which the signal arrives, signal): every position inside a window and at its end
# for SIGTERM; SIGINT (Ctrl-C) takes the same path, so two positions cover it
SIGNAL_POINTS = [(1, 2), (1, 3), (2, 2), (2, 3), (4, 4), (4, 5), (4, 6), (4, 7)]
SIGNALS = [(*point, signal.SIGTERM) for point in SIGNAL_POINTS] + [(1, 3, signal.SIGINT), (4, 5, signal.SIGINT)]


@pytest.mark.parametrize(
    ("accumulate", "micro_batch", "signum"), SIGNALS, ids=[f"acc{a}-mb{m}-{s.name}" for a, m, s in SIGNALS]
)
def test_signal_at_any_micro_batch_resumes_exactly(
    tmp_path, tmp_path_factory, tiny_model, color_words, monkeypatch, accumulate, micro_batch, signum
):
    """A signal in the middle of an accumulation window: the window is finished and saved whole, so the resumed run
    gives the uninterrupted run's losses. 8 rows in micro-batches of 2: 4 micro-batches an epoch."""
    straight = uninterrupted_losses(tmp_path_factory, tiny_model, color_words, accumulate)
    original, seen = QLoRAModule.training_step, []

    def training_step(self, batch, batch_idx):
        seen.append(batch_idx)
        if len(seen) == micro_batch + 1:  # micro-batches counted from 0 over the run
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(QLoRAModule, "training_step", training_step)
    args = [
        *fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, *EXACT),
        f"--trainer.accumulate_grad_batches={accumulate}",
    ]
    assert run(args) == (143 if signum == signal.SIGTERM else 130)
    monkeypatch.undo()
    (first,) = run_dirs(tmp_path)
    saved = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert saved == micro_batch // accumulate + 1  # the window holding that micro-batch, finished
    assert len(seen) == saved * accumulate  # and nothing past it
    resumed = main([*args, "--ckpt_path=last"])
    losses = {**scalars(first, "train/loss"), **scalars(Path(resumed.trainer.log_dir), "train/loss")}
    assert losses == pytest.approx(straight, rel=1e-5), (losses, straight)


def test_no_checkpoint_inside_the_first_window(tmp_path, tiny_model, color_words):
    """With accumulation, the periodic last.ckpt comes at whole steps only (it was once written at step 0)."""
    args = fit_args(
        tmp_path, tiny_model, color_words, *PLAIN_LORA, "--trainer.max_steps=2", "--checkpoint.every_n_train_steps=1"
    )
    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        saved.append(checkpoint["global_step"])
        return original(self, checkpoint, path, storage_options)

    AtomicCheckpointIO.save_checkpoint = save_checkpoint
    try:
        main([*args, "--trainer.accumulate_grad_batches=2"])
    finally:
        AtomicCheckpointIO.save_checkpoint = original
    assert saved == [1, 2]


def test_resume_from_a_batch_end_checkpoint_is_exact(tmp_path, tiny_model, color_words, uninterrupted, monkeypatch):
    original = QLoRAModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            raise KeyboardInterrupt  # Lightning stops gracefully; last.ckpt is the periodic one of step 2
        return original(self, batch, batch_idx)

    monkeypatch.setattr(QLoRAModule, "training_step", training_step)
    with pytest.raises(SystemExit):
        main(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, *EXACT, "--checkpoint.every_n_train_steps=2"))
    monkeypatch.undo()
    (first,) = run_dirs(tmp_path)
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = main(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, *EXACT, "--ckpt_path=last"))
    losses = {**scalars(first, "train/loss"), **scalars(Path(resumed.trainer.log_dir), "train/loss")}
    assert losses == pytest.approx(uninterrupted, rel=1e-5)


def test_lightning_advances_the_batch_order_each_epoch(tiny_model, color_words):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    from capyft.datamodule import ChatDataModule

    data = ChatDataModule(str(tiny_model), source=str(color_words), train_size=8, val_size=0, test_size=0)
    data.setup("fit")
    loader = data.train_dataloader()
    _set_sampler_epoch(loader, 1)  # what Lightning's fit loop does at the start of epoch 1
    assert loader.batch_sampler.epoch == 1


KEEP_SAVING = """
import sys, torch
from capyft.checkpoints import AtomicCheckpointIO
io, i = AtomicCheckpointIO(), 0
while True:
    io.save_checkpoint({"i": i, "w": torch.full((4_000_000,), float(i))}, sys.argv[1])  # 16 MB a save
    print(i, flush=True)
    i += 1
"""


def test_kill_during_save_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    command = [sys.executable, "-c", KEEP_SAVING, str(path)]
    proc = subprocess.Popen(command, env=offline_env(), stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # three saves done; the kill then lands at a random point of the next ones
        proc.stdout.readline()
    time.sleep(random.uniform(0.0, 0.2))
    proc.kill()
    proc.wait(timeout=30)
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["i"])))
    checkpoints.check_checkpoint_file(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def torch_save_then_die(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_then_die)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, color_words) -> Path:
    """A short fit with a secret-looking HF_TOKEN in the environment; returns its run dir."""
    tmp_path = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", "secret-xyz-123")
        cli = main(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, "--trainer.max_steps=2"))
    return Path(cli.trainer.log_dir)


def test_corrupt_checkpoint_is_reported_clearly(tmp_path, finished_run, tiny_model, color_words, no_model_load, caplog):
    data = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    truncated, flipped = tmp_path / "truncated.ckpt", tmp_path / "flipped.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # torch.load would read this one without complaint
    flipped.write_bytes(bytes(damaged))
    for path, reason in ((truncated, "not a complete zip archive"), (flipped, "fails its CRC check")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="capyft"):
            assert run(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, f"--ckpt_path={path}")) == 2
        (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert f"checkpoint {path} is truncated or corrupt (" in error and reason in error
        assert "delete it or pass another --ckpt_path" in error
        with pytest.raises(checks.ConfigError, match="truncated or corrupt"):
            AtomicCheckpointIO().load_checkpoint(path)


# ---- 6. safety ---------------------------------------------------------------------------------------------
def test_checkpoint_loads_with_weights_only_and_holds_no_secret(finished_run):
    ckpt = torch.load(finished_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["trust_remote_code"] is False
    files = [p for p in finished_run.rglob("*") if p.is_file()]
    assert {"config.yaml", "hparams.yaml", "last.ckpt"} <= {p.name for p in files}
    leaked = [p for p in files if b"secret-xyz-123" in p.read_bytes()]
    assert not leaked


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tiny_model):
    import inspect

    seen = []

    class Loaded(Exception):
        pass

    def load_tokenizer(name, trust_remote_code=False):
        seen.append(("tokenizer", trust_remote_code))

    def load_base_model(*args, **kwargs):
        seen.append(("model", args[5]))  # (name, quantization, dtype, attn, device, trust_remote_code)
        raise Loaded

    monkeypatch.setattr("capyft.model.load_tokenizer", load_tokenizer)
    monkeypatch.setattr("capyft.model.load_base_model", load_base_model)
    assert inspect.signature(QLoRAModule).parameters["trust_remote_code"].default is False
    for asked in (False, True):
        kwargs = {"trust_remote_code": True} if asked else {}
        with pytest.raises(Loaded):
            QLoRAModule(str(tiny_model), load_in_4bit=False, **kwargs).configure_model()
    assert seen == [("tokenizer", False), ("model", False), ("tokenizer", True), ("model", True)]


# ---- 4. non-finite steps ------------------------------------------------------------------------------------
class Snapshots(L.Callback):
    """LoRA weights after each optimizer step, by global step."""

    latest: Snapshots | None = None

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        Snapshots.latest = self

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights[trainer.global_step] = lora_weights(pl_module)


def poison_steps(monkeypatch, bad: set[int] | None = None, from_step: int | None = None) -> None:
    """Makes the loss NaN at the given optimizer steps, like an fp16 overflow or a bad batch."""
    original = QLoRAModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        step = self.trainer.global_step
        return loss * float("nan") if (bad and step in bad) or (from_step is not None and step >= from_step) else loss

    monkeypatch.setattr(QLoRAModule, "training_step", training_step)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def callback(cli, kind):
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


SNAPSHOTS = '--trainer.callbacks+={"class_path": "test_reliability.Snapshots"}'


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, tiny_model, color_words, monkeypatch):
    poison_steps(monkeypatch, bad={2, 3})
    cli = main(
        fit_args(
            tmp_path,
            tiny_model,
            color_words,
            *PLAIN_LORA,
            "--trainer.max_steps=6",
            "--model.learning_rate=0.01",
            SNAPSHOTS,
        )
    )
    assert cli.trainer.global_step == 6
    assert callback(cli, NonFiniteGuard).skipped == 2
    snaps = callback(cli, Snapshots).weights
    assert same(snaps[2], snaps[3]) and same(snaps[3], snaps[4])  # steps 2 and 3 left the weights alone
    assert not same(snaps[4], snaps[5]) and not same(snaps[1], snaps[2])  # the others trained
    assert all(torch.isfinite(w).all() for w in snaps[6].values())
    skipped = scalars(Path(cli.trainer.log_dir), "train/skipped_steps")
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[5] == 2


def test_consecutive_nonfinite_steps_stop_and_keep_the_last_good_checkpoint(
    tmp_path, tiny_model, color_words, monkeypatch, caplog
):
    poison_steps(monkeypatch, from_step=2)
    args = ["--trainer.max_steps=50", "--checkpoint.every_n_train_steps=1", "--guard.max_nonfinite_steps=3", SNAPSHOTS]
    with caplog.at_level(logging.WARNING):
        assert run(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, *args)) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("3 optimizer steps in a row (steps 2-4) had a non-finite loss or gradient" in e for e in errors)
    (run_dir,) = run_dirs(tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # saved after steps 2 and 3 were skipped: still the finite weights of step 2
    assert same(ckpt["state_dict"], Snapshots.latest.weights[2])
    assert not (run_dir / "adapter" / "final").exists()  # a failed run exports no final adapter


def test_checkpoint_with_nonfinite_weights_is_refused():
    from capyft.callbacks import NonFiniteError

    checkpoint = {"state_dict": {"lora_A": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3])}}
    with pytest.raises(NonFiniteError, match="refusing to save a checkpoint with non-finite weights"):
        NonFiniteGuard().on_save_checkpoint(None, None, checkpoint)


# ---- 5. CUDA out of memory ----------------------------------------------------------------------------------
def test_out_of_memory_names_the_knobs(tmp_path, tiny_model, color_words, monkeypatch, caplog):
    def training_step(self, batch, batch_idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 8 GiB")

    monkeypatch.setattr(QLoRAModule, "training_step", training_step)
    with caplog.at_level(logging.ERROR):
        assert run(fit_args(tmp_path, tiny_model, color_words, *PLAIN_LORA, "--trainer.max_steps=2")) == 1
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for knob in ("data.max_length 256", "data.batch_size 2", "model.gradient_checkpointing False"):
        assert knob in text, text
    assert "data.padding_free" in text and "accumulate_grad_batches" in text
    assert "Tried to allocate 20.00 GiB" in text


def test_every_command_reports_a_bad_subcommand_or_key_in_one_line(capsys, monkeypatch):
    """One error format for LightningCLI's commands and capyft's own (data, export, chat): the fix names
    ``python -m capyft ... --help``, never ``__main__.py``."""
    monkeypatch.setattr(sys, "argv", ["capyft"])
    cases = [
        (["nope"], "invalid choice: 'nope'", "`python -m capyft --help`"),
        (["export", "--nope", "1"], "unrecognized arguments: --nope", "`python -m capyft export --help`"),
        (["chat", "--nope", "1"], "unrecognized arguments: --nope", "`python -m capyft chat --help`"),
        (["data", "--nope", "1"], "--nope", "`python -m capyft data --help`"),
    ]
    for args, problem, hint in cases:
        try:
            status = main(args)
        except SystemExit as exit_info:
            status = exit_info.code
        assert status == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and problem in err[0] and hint in err[0] and "__main__" not in err[0], (args, err)
