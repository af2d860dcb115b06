"""Callbacks: what a run writes (checkpoints, PEFT adapters) and what it does on a fault (preemption, Ctrl-C,
non-finite steps, CUDA out of memory). docs/faults.md lists each fault and what happens on it. Callbacks meet the
Lightning module through its hooks and ``save_adapter``, never by importing it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from capyft import checks
from capyft.checkpoints import run_dir

log = logging.getLogger(__name__)


class RunCheckpoints(ModelCheckpoint):
    """Every checkpoint a run writes, each at the moment its name promises (the ``checkpoint:`` config section).

    - ``checkpoints/last.ckpt``: after every ``every_n_train_steps``-th optimizer step (at the end of the
      accumulation window, never inside one), when a stop is requested (:class:`GracefulStop`) and when training
      ends, so ``last`` is always the newest whole step and, after ``fit``, the final weights.
    - the best checkpoint (``step{N}-val_loss{X}.ckpt``, ``save_top_k`` of them) and ``adapter/best``: judged right
      after each validation on the ``val/loss`` that validation measured, the last validation included.
    - ``adapter/final``: when training ends. Adapters are in PEFT's own format (``adapter_config.json`` +
      ``adapter_model.safetensors``, tokenizer and chat template); ``peft.PeftModel.from_pretrained`` loads them.

    Lightning's own ``ModelCheckpoint`` judges ``best`` at its periodic save, before that step's validation has run,
    and never after the last validation; it also saves ``last`` inside accumulation windows. This subclass keeps its
    arguments and its top-k bookkeeping (so ``--ckpt_path best`` resolves across processes) and changes when.
    """

    # ModelCheckpoint's own __init__ is kept, so that its arguments are the `checkpoint:` section's keys
    _step_at_batch_start = 0
    last_saved_step: int | None = None

    # ---- last.ckpt ------------------------------------------------------------------------------------------
    def write_last(self, trainer: L.Trainer, reason: str = "") -> str:
        """Writes ``last.ckpt`` now (optimizer, scheduler, loop and RNG state too) and returns its path."""
        path = self.last_path(trainer)
        self.last_model_path = path  # before saving, as ModelCheckpoint does: it is part of the saved state
        trainer.save_checkpoint(path, weights_only=False)
        self.last_saved_step = self._last_global_step_saved = trainer.global_step
        if reason:
            log.info("%s: saved %s at step %d", reason, path, trainer.global_step)
        return path

    def last_path(self, trainer: L.Trainer) -> str:
        directory = self.dirpath or str(run_dir(trainer) / "checkpoints")
        return self.last_model_path or os.path.join(directory, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside an accumulation window: no whole step to save
        every = self._every_n_train_steps
        if self.save_last and every and trainer.global_step % every == 0 and not trainer.fast_dev_run:
            self.write_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        pass  # Lightning's epoch-end saves would judge best without a fresh val/loss; validation ends do it here

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.save_last and not trainer.fast_dev_run and self.last_saved_step != trainer.global_step:
            self.write_last(trainer, "training done")
        _save_adapter(trainer, pl_module, "final")

    # ---- best -----------------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit" or self.monitor is None:
            return
        candidates = self._monitor_candidates(trainer)
        current = candidates.get(self.monitor)
        if current is None or self.save_top_k == 0:
            return
        before = self.best_model_path
        self._save_topk_checkpoint(trainer, candidates)
        if self.best_model_path != before:
            log.info(
                "best %s %.4f at step %d: %s", self.monitor, float(current), trainer.global_step, self.best_model_path
            )
            _save_adapter(trainer, pl_module, "best")


def _save_adapter(trainer: L.Trainer, pl_module: Any, name: str) -> None:
    if trainer.is_global_zero and getattr(pl_module, "model", None) is not None:
        path = pl_module.save_adapter(run_dir(trainer) / "adapter" / name)
        log.info("adapter saved: %s", path)
    trainer.strategy.barrier()


class ValidateFinalStep(L.Callback):
    """Validates the final weights: when the last optimizer step (``max_steps``, or the last batch of the last epoch)
    is not a validation step, Lightning would end without validating it, and ``best`` could never be the end."""

    def __init__(self) -> None:
        self._step_at_batch_start = 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return
        loop = trainer.fit_loop
        last_steps = loop.max_steps > 0 and trainer.global_step >= loop.max_steps
        last_epoch = loop.max_epochs is not None and 0 < loop.max_epochs <= trainer.current_epoch + 1
        if last_steps or (last_epoch and loop.epoch_loop.batch_progress.is_last_batch):
            trainer.should_stop = True  # Lightning then validates at this batch end (when validation is on)


class StopRequested(SIGTERMException):
    """Training stopped at a step boundary after SIGTERM or SIGINT, with ``last.ckpt`` saved."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class GracefulStop(L.Callback):
    """On SIGTERM (preemption, ``scancel``) or SIGINT (Ctrl-C): finish the optimizer step in progress, save
    ``last.ckpt``, stop.

    Lightning stops at the end of any micro-batch, inside an accumulation window too, and the gradients accumulated
    so far are in no checkpoint: the resumed step would train on part of its window. Stopping only at the end of a
    window costs at most ``accumulate_grad_batches - 1`` more micro-batches and makes the resumed run equal the
    uninterrupted one. A second Ctrl-C stops at once (nothing new saved). Under DDP every rank agrees at the step
    boundary (one small all-reduce per step, only while several ranks run).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0
        self._stopping: str | None = None  # set once last.ckpt is saved: stop at the next hook
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._trainer, self.requested, self._stopping = trainer, None, None
        if trainer.received_sigterm:  # arrived while the model loaded: Lightning would stop mid-window, we do not
            self.requested = "SIGTERM"
            trainer._signal_connector.received_sigterm = False
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        first = self.requested is None
        self.requested = self.requested or name
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if launcher is not None and first:
            launcher.kill(signum)  # DDP launched from this process: its other ranks stop at the same step
        if first:
            log.warning(
                "%s: finishing the optimizer step in progress, then saving last.ckpt%s",
                name,
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_batch_start or self._stopping:
            return  # inside an accumulation window: finish it first
        stop = self.requested is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        callback = trainer.checkpoint_callback
        if isinstance(callback, RunCheckpoints):
            path = callback.write_last(trainer)
        else:
            path = str(run_dir(trainer) / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(path, weights_only=False)
        self._stopping = self.requested or "SIGTERM"
        log.warning(
            "%s: saved %s at step %d; resume with `fit --ckpt_path last`", self._stopping, path, trainer.global_step
        )
        # stop once Lightning has logged this step: at the next batch, or before a validation that would follow

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._stopping:
            raise StopRequested(self._stopping)
        self._step_at_batch_start = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._stopping and not trainer.sanity_checking:
            raise StopRequested(self._stopping)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients for too many optimizer steps in a row."""


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps with a non-finite loss or gradient, counts them (``train/skipped_steps``), and stops the
    run after ``max_nonfinite_steps`` of them in a row.

    With ``16-mixed`` a gradient scaler multiplies the loss by a large scale (65,536 at first) so that small fp16
    gradients do not underflow; when gradients overflow instead, it skips the step and halves the scale. Those
    skips are calibration, not failure (a run may start with several): they are counted apart
    (``train/scaler_skips``) and never toward ``max_nonfinite_steps``. The guard keeps what the scaler cannot fix:
    a non-finite loss (the forward pass overflowed, or a bad batch), and non-finite gradients at a scale below
    ``min_loss_scale`` (they overflow unscaled, so halving again cannot help). Without a scaler (bf16, fp32) every
    non-finite step is the guard's. A skipped step leaves the weights and the optimizer state as they were (the
    guard drops the gradients, or the scaler skips the update). No checkpoint ever holds non-finite weights:
    saving one is refused.

    Args:
        max_nonfinite_steps: stop after this many consecutive non-finite steps (0: never stop, only skip).
        min_loss_scale: with a gradient scaler, non-finite gradients at a smaller scale count as non-finite steps
            (1: the gradients overflow even unscaled).
    """

    def __init__(self, max_nonfinite_steps: int = 10, min_loss_scale: float = 1.0) -> None:
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.min_loss_scale = min_loss_scale
        self.skipped = 0  # all skipped steps of the run, kept in checkpoints
        self.in_a_row = 0
        self.scaler_skips = 0  # steps the gradient scaler skipped while calibrating its scale
        self._bad_loss: torch.Tensor | None = None  # any micro-batch loss of this step non-finite (no host sync)

    def on_before_backward(self, trainer: L.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # the scaler's scaled fp32 loss: finite exactly when the loss is
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # one fused norm kernel and one host sync: a gradient holds a NaN or inf exactly when its norm does
        bad_grads = bool((~torch.stack(torch._foreach_norm(grads)).isfinite()).any()) if grads else False
        bad_loss = bool(self._bad_loss) if self._bad_loss is not None else False
        self._bad_loss = None
        if trainer.world_size > 1:  # one decision for all ranks (FSDP ranks hold different gradient shards)
            flags = torch.tensor([bad_grads, bad_loss], dtype=torch.float32, device=pl_module.device)
            bad_grads, bad_loss = (bool(f) for f in trainer.strategy.reduce(flags, reduce_op="sum") > 0)
        scaler = self._active_grad_scaler(trainer)
        if not (bad_grads or bad_loss):
            self.in_a_row = 0
        elif not bad_loss and scaler is not None and float(scaler.get_scale()) >= self.min_loss_scale:
            self.scaler_skips += 1  # the scaler skips this step and halves its scale: no weight or state changes
            log.info(
                "step %d: fp16 gradients overflowed at loss scale %g; the gradient scaler skips the step and "
                "halves the scale",
                trainer.global_step,
                float(scaler.get_scale()),
            )
        else:
            self.skipped += 1
            self.in_a_row += 1
            optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            what = "loss" if bad_loss else "gradient"
            if scaler is not None and not bad_loss:
                what += f" at loss scale {float(scaler.get_scale()):g} (below guard.min_loss_scale)"
            log.warning("step %d: non-finite %s; step skipped", trainer.global_step, what)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if scaler is not None:
            pl_module.log("train/scaler_skips", float(self.scaler_skips), on_step=True, on_epoch=False, batch_size=1)
        if self.max_nonfinite_steps and self.in_a_row >= self.max_nonfinite_steps:
            last = getattr(trainer.checkpoint_callback, "last_model_path", "")
            kept = f"the last checkpoint ({last}) holds finite ones" if last else "no checkpoint was saved yet"
            first = trainer.global_step - self.in_a_row + 1
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row (steps {first}-{trainer.global_step}) had a non-finite "
                f"loss or gradient, so training stopped; none of them changed the weights, and {kept}. Lower "
                "model.learning_rate, use trainer.precision bf16-mixed instead of 16-mixed, check the data of these "
                "steps, or raise guard.max_nonfinite_steps"
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        bad = [
            k for k, v in checkpoint.get("state_dict", {}).items() if v.is_floating_point() and not v.isfinite().all()
        ]
        if bad:
            raise NonFiniteError(
                f"refusing to save a checkpoint with non-finite weights ({bad[0]} and {len(bad) - 1} "
                "more); the previous checkpoint is kept"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row, "scaler_skips": self.scaler_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.in_a_row = state_dict.get("in_a_row", 0)
        self.scaler_skips = state_dict.get("scaler_skips", 0)

    @staticmethod
    def _active_grad_scaler(trainer: L.Trainer) -> Any:
        """The precision plugin's enabled gradient scaler (``16-mixed``), or None (bf16, fp32)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None


class OutOfMemoryAdvice(L.Callback):
    """On a CUDA out-of-memory error, logs which settings to lower, with the run's current values."""

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, torch.cuda.OutOfMemoryError):
            return
        data = getattr(trainer.datamodule, "hparams", {})
        model = getattr(pl_module, "hparams", {})
        values = {
            "data.max_length": data.get("max_length"),
            "data.batch_size": data.get("batch_size"),
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
            "model.gradient_checkpointing": _checkpointing_value(pl_module, model.get("gradient_checkpointing")),
            "data.padding_free": data.get("padding_free"),
        }
        log.error("%s", checks.oom_advice(values))


def _checkpointing_value(pl_module: Any, setting: Any) -> Any:
    """The setting as the advice shows it: ``auto`` with what it resolved to."""
    active = getattr(pl_module, "checkpointing", None) if getattr(pl_module, "model", None) is not None else None
    return f"auto (resolved to {active})" if setting == "auto" and active is not None else setting
