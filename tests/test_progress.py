"""StepProgress: optimizer steps toward the right total, in plain lines when stdout is not a terminal."""

import re

import lightning as L
import pytest
import torch

from capyft.progress import StepProgress, format_duration, total_steps


class Regression(L.LightningModule):
    """A linear model on 12 fixed samples that logs what QLoRAModule logs: train/loss, train/tokens_per_sec."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log_dict({"train/loss": loss.detach(), "train/tokens_per_sec": 1000.0}, on_step=True, batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y), batch_size=len(x))

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    def _loader(self):
        x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


def fit(tmp_path, bar, **trainer_args):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        **trainer_args,
    )
    trainer.fit(Regression())
    return trainer


def step_lines(out):
    return [line for line in out.splitlines() if line.startswith("step ")]


def test_plain_lines_count_optimizer_steps_to_max_steps(tmp_path, capsys):
    # 6 batches an epoch, accumulation 2: 3 optimizer steps an epoch; max_epochs -1 runs to max_steps 6 (2 epochs)
    trainer = fit(
        tmp_path,
        StepProgress(every_n_steps=2, interactive=False),
        max_epochs=-1,
        max_steps=6,
        accumulate_grad_batches=2,
        val_check_interval=6,
        num_sanity_val_steps=1,
    )
    out = capsys.readouterr().out
    assert trainer.global_step == 6
    assert "training: 6 optimizer steps of 2 micro-batch(es) each; 6 micro-batches an epoch" in out
    lines = step_lines(out)
    assert [line.split(" | ")[0] for line in lines] == ["step 2/6 (33%)", "step 4/6 (67%)", "step 6/6 (100%)"]
    assert all(re.search(r" \| loss \d+\.\d{4} \| 1,000 tok/s \| elapsed \d:\d\d:\d\d", line) for line in lines)
    assert "ETA " in lines[1] and "ETA " not in lines[2]  # the rate is measured from step 1; nothing left at 6
    # validation after each epoch's 6 batches: at steps 3 and 6; the sanity check writes no line
    assert re.findall(r"validation at step (\d+): val/loss \d+\.\d{4} \(6 batches", out) == ["3", "6"]
    assert re.search(r"training done: step 6 in \d:\d\d:\d\d", out)
    assert "\r" not in out and "\x1b" not in out  # a log file gets plain lines


def test_total_from_epochs_and_a_last_line_off_the_period(tmp_path, capsys):
    # no max_steps: 2 epochs x ceil(6 batches / accumulation 4) = 2 x 2 = 4 steps; lines every 3 steps + the last
    fit(tmp_path, StepProgress(every_n_steps=3, interactive=False), max_epochs=2, accumulate_grad_batches=4)
    out = capsys.readouterr().out
    assert [line.split(" | ")[0] for line in step_lines(out)] == ["step 3/4 (75%)", "step 4/4 (100%)"]


def test_unbounded_run_has_no_total():
    assert total_steps(L.Trainer(max_epochs=-1, max_steps=-1, logger=False, accelerator="cpu")) is None
    assert total_steps(L.Trainer(max_epochs=-1, max_steps=50, logger=False, accelerator="cpu")) == 50


def test_terminal_redraws_one_line_and_counts_eval_batches(tmp_path, capsys):
    trainer = fit(tmp_path, StepProgress(interactive=True), max_epochs=-1, max_steps=3, limit_val_batches=2)
    out = capsys.readouterr().out
    assert "\r[########################] step 3/3 (100%) | loss" in out
    assert "\rsanity check batch 2/2\x1b[K" in out
    trainer.test(trainer.lightning_module, verbose=False)
    out = capsys.readouterr().out
    assert "\rtest batch 6/6\x1b[K" in out and re.search(r"\rtest done: 6 batches in \d:\d\d:\d\d\x1b\[K\n", out)


def test_default_period_is_a_twentieth_of_the_run(tmp_path, capsys):
    fit(tmp_path, StepProgress(interactive=False), max_epochs=-1, max_steps=40, limit_val_batches=0)
    lines = step_lines(capsys.readouterr().out)
    assert [line.split(" ")[1] for line in lines] == [f"{n}/40" for n in range(2, 41, 2)]


def test_bad_period_and_durations():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        StepProgress(every_n_steps=0)
    assert format_duration(3725.4) == "1:02:05"
