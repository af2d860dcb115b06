"""Callbacks and checkpoint IO: PEFT-format adapter export, atomic checkpoints, and what a run does on a fault
(preemption, non-finite steps, CUDA out of memory). docs/faults.md lists each fault and what happens on it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from capyft import checks
from capyft.checkpoints import run_dir

log = logging.getLogger(__name__)


class AdapterExport(L.Callback):
    """Saves the adapter in PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``, tokenizer
    and chat template) as ``<run>/adapter/best`` whenever validation improves the monitored metric, and as
    ``<run>/adapter/final`` when training ends. ``peft.PeftModel.from_pretrained(base, dir)`` loads either.
    """

    def __init__(self) -> None:
        self._best: float | None = None

    def _save(self, trainer: L.Trainer, pl_module: Any, name: str) -> None:
        if trainer.is_global_zero and pl_module.model is not None:
            path = pl_module.save_adapter(run_dir(trainer) / "adapter" / name)
            log.info("adapter saved: %s", path)
        trainer.strategy.barrier()

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        from capyft.model import MONITOR

        value = trainer.callback_metrics.get(MONITOR)
        if value is None:
            return
        value = float(value)
        if self._best is None or value < self._best:
            self._best = value
            self._save(trainer, pl_module, "best")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._save(trainer, pl_module, "final")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self._best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._best = state_dict.get("best")


class LastCheckpoint(L.Callback):
    """Keeps ``last.ckpt`` fresh for resuming (``fit --ckpt_path last``): every ``checkpoint.every_n_train_steps``
    optimizer steps whatever validation does, and on SIGTERM.

    Lightning's ``ModelCheckpoint`` watching ``val/loss`` defers its saves, ``last.ckpt`` included, until
    ``val/loss`` exists and past epoch ends, so a kill could lose more than ``every_n_train_steps`` steps; saving
    here bounds the loss. On SIGTERM (a preempted or cancelled job) Lightning's own handler sets
    ``trainer.received_sigterm`` and stops the run once the current batch is done (``SIGTERMException``): this
    callback saves then, or just before a validation that follows the batch, so that nothing trained is lost and the
    resumed run continues exactly (``python -m capyft`` exits with status 143). A SIGTERM in the middle of a
    validation run saves nothing new (a half-run validation loop is no state to resume from): the run then resumes
    from the last periodic checkpoint.
    """

    def __init__(self) -> None:
        self.saved_step: int | None = None
        self.saved_on_sigterm = False

    def _save(self, trainer: L.Trainer) -> str:
        path = _last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # optimizer, scheduler and loop state too
        self.saved_step = trainer.global_step
        return path

    def _on_sigterm(self, trainer: L.Trainer) -> None:
        if trainer.state.fn != "fit" or self.saved_on_sigterm:
            return
        path = self._save(trainer)
        self.saved_on_sigterm = True
        log.warning("SIGTERM: saved %s at step %d; resume with `fit --ckpt_path last`", path, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        callback = trainer.checkpoint_callback
        every = getattr(callback, "_every_n_train_steps", 0) if callback is not None and callback.save_last else 0
        due = every > 0 and trainer.global_step % every == 0 and self.saved_step != trainer.global_step
        if due and not trainer.fast_dev_run:
            self._save(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.received_sigterm and not trainer.sanity_checking:
            self._on_sigterm(trainer)  # the validation would stop at its first batch

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not trainer.validating:
            self._on_sigterm(trainer)


def _last_checkpoint_path(trainer: L.Trainer) -> str:
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return str(run_dir(trainer) / "checkpoints" / "last.ckpt")
    path = callback.last_model_path or os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + ".ckpt")
    callback.last_model_path = path  # set before saving, as ModelCheckpoint does: it is part of the saved state
    return path


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients for too many optimizer steps in a row."""


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose gradients are not finite, counts them (``train/skipped_steps``), and stops the
    run after ``max_nonfinite_steps`` of them in a row.

    With ``16-mixed`` on a GPU the gradient scaler already skips such a step (fp16 overflow) and lowers its scale;
    in bf16 and fp32 this callback drops the gradients, so the step leaves the weights, and the optimizer state,
    as they were. Either way no checkpoint ever holds non-finite weights: saving one is refused.

    Args:
        max_nonfinite_steps: stop after this many consecutive non-finite steps (0: never stop, only skip).
    """

    def __init__(self, max_nonfinite_steps: int = 10) -> None:
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped = 0  # all skipped steps of the run, kept in checkpoints
        self.in_a_row = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # one fused norm kernel and one host sync: a gradient holds a NaN or inf exactly when its norm does
        finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)  # FSDP ranks hold different shards
        if finite:
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1
            optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            log.warning("step %d: non-finite loss or gradient; step skipped", trainer.global_step)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
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
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.in_a_row = state_dict.get("in_a_row", 0)


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
            "model.gradient_checkpointing": model.get("gradient_checkpointing"),
            "data.padding_free": data.get("padding_free"),
        }
        log.error("%s", checks.oom_advice(values))
