"""``StepProgress``: training progress in optimizer steps, readable in a terminal and in a log file.

Lightning 2.6's Rich bar counts batches per epoch (``Epoch 1/-2`` with ``max_epochs: -1``), and writes nothing until
the run ends when stdout is not a terminal (nohup, SLURM, ``| tee``). This bar counts optimizer steps toward
``max_steps`` (or the estimated total), with loss, tokens/s and ETA: one self-redrawing line in a terminal, a plain
line every ``every_n_steps`` steps otherwise.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

BAR_WIDTH = 24


def total_steps(trainer: Any) -> int | None:
    """Optimizer steps the fit will run: ``max_steps``, or epochs x batches / accumulation; None when unbounded."""
    estimate = trainer.estimated_stepping_batches  # accounts for max_steps, max_epochs -1, accumulation
    return int(estimate) if math.isfinite(estimate) else None


def format_duration(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _count(value: Any) -> int | None:
    total = sum(value) if isinstance(value, list) else value
    return int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None


class StepProgress(ProgressBar):
    """Progress over optimizer steps with loss, tokens/s and ETA; validation, test and predict batches counted.

    Args:
        every_n_steps: when stdout is not a terminal, write a line every this many optimizer steps (and at the
            last); None: about 20 lines a run (every ``total / 20`` steps), or every 10 steps when the total is
            unknown.
        interactive: redraw one line in place (a terminal) or write plain lines (a file); None: whether stdout is a
            terminal.
    """

    def __init__(self, every_n_steps: int | None = None, interactive: bool | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.interactive = every_n_steps, interactive
        self._enabled = True
        self._tty = False
        self._total: int | None = None
        self._every = 10
        self._start_step = 0
        self._last_step = -1
        self._last_written = -1
        self._timer = (0.0, 0)  # (time, step) the rate is measured from
        self._train_start = 0.0
        self._eval_start = 0.0
        self._line_open = False  # a terminal line is being redrawn

    # ---- ProgressBar's contract -----------------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._close_line()
        print(*args, **kwargs)

    # ---- output ---------------------------------------------------------------------------------------------
    def _write_line(self, text: str) -> None:
        self._close_line()
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def _redraw(self, text: str) -> None:
        sys.stdout.write("\r" + text + "\x1b[K")  # carriage return, text, erase the rest of the old line
        sys.stdout.flush()
        self._line_open = True

    def _close_line(self) -> None:
        if self._line_open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._line_open = False

    def _finish(self, text: str) -> None:
        """Writes ``text`` over the line being redrawn (a terminal), or as a new line."""
        if self._line_open:
            self._redraw(text)
            self._close_line()
        else:
            self._write_line(text)

    def _clear(self) -> None:
        if self._line_open:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self._line_open = False

    # ---- training -------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # disables the bar on all ranks but the first
        self._tty = sys.stdout.isatty() if self.interactive is None else self.interactive

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._total = total_steps(trainer)
        self._every = self.every_n_steps or (max(1, self._total // 20) if self._total else 10)
        self._start_step = self._last_step = self._last_written = trainer.global_step
        self._train_start = time.monotonic()
        self._timer = (self._train_start, trainer.global_step)
        if not self._enabled:
            return
        accumulate = trainer.accumulate_grad_batches
        total = f"{self._total}" if self._total else "unbounded (no max_steps, max_epochs -1)"
        resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
        self._write_line(
            f"training: {total} optimizer steps of {accumulate} micro-batch(es) each"
            f"{resumed}; {_count(trainer.num_training_batches)} micro-batches an epoch"
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch inside an accumulation window, or a skipped step
            return
        self._last_step = step
        if step == self._start_step + 1:
            # the first step carries start-up costs (allocation, kernel selection): measure the rate after it
            self._timer = (time.monotonic(), step)
        if not self._enabled:
            return
        if self._tty:
            self._redraw(self.step_text(trainer, bar=True))
        elif step % self._every == 0 or step == self._total:
            self._write_line(self.step_text(trainer))
            self._last_written = step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._enabled:
            return
        if self._tty:
            self._close_line()  # the bar shows the last step
        elif self._last_written != trainer.global_step:
            self._write_line(self.step_text(trainer))
        elapsed = format_duration(time.monotonic() - self._train_start)
        self._write_line(f"training done: step {trainer.global_step} in {elapsed}")

    def step_text(self, trainer: Any, bar: bool = False) -> str:
        """``step 3/6 (50%) | loss 2.0312 | 1,234 tok/s | elapsed 0:00:12 | ETA 0:00:12``."""
        step, total = trainer.global_step, self._total
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if total:
            done = min(step / total, 1.0)
            filled = round(done * BAR_WIDTH)
            parts[0] += f" ({done:.0%})"
            if bar:
                parts[0] = "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "] " + parts[0]
        metrics = trainer.callback_metrics
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "train/tokens_per_sec" in metrics:
            parts.append(f"{float(metrics['train/tokens_per_sec']):,.0f} tok/s")
        now = time.monotonic()
        parts.append(f"elapsed {format_duration(now - self._train_start)}")
        since, from_step = self._timer
        if total and step < total and step > from_step:
            eta = (now - since) / (step - from_step) * (total - step)
            parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    # ---- validation, test, predict: counted in batches ------------------------------------------------------
    def _eval_start_hook(self) -> None:
        self._eval_start = time.monotonic()

    def _eval_batch(self, trainer: Any, stage: str, batch_idx: int, total: Any) -> None:
        if not self._enabled:
            return
        count = _count(total)
        text = f"{stage} batch {batch_idx + 1}" + (f"/{count}" if count else "")
        if self._tty:
            self._redraw(text)
        elif stage in ("test", "predict"):  # generation batches take long enough to report each
            self._write_line(f"{text} | elapsed {format_duration(time.monotonic() - self._eval_start)}")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start_hook()

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        stage = "sanity check" if trainer.sanity_checking else "validation"
        total = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self._eval_batch(trainer, stage, batch_idx, total)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._enabled:
            return
        if trainer.sanity_checking:
            self._clear()
            return
        metrics = trainer.callback_metrics
        loss = f": val/loss {float(metrics['val/loss']):.4f}" if "val/loss" in metrics else ""
        elapsed = format_duration(time.monotonic() - self._eval_start)
        batches = _count(trainer.num_val_batches)
        plural = "" if batches == 1 else "es"
        self._finish(f"validation at step {trainer.global_step}{loss} ({batches} batch{plural}, {elapsed})")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start_hook()

    def on_test_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, "test", batch_idx, trainer.num_test_batches)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        if self._enabled:
            elapsed = format_duration(time.monotonic() - self._eval_start)
            self._finish(f"test done: {_count(trainer.num_test_batches)} batches in {elapsed}")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start_hook()

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, "predict", batch_idx, trainer.num_predict_batches)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self._enabled:
            elapsed = format_duration(time.monotonic() - self._eval_start)
            self._finish(f"predict done: {_count(trainer.num_predict_batches)} batches in {elapsed}")
