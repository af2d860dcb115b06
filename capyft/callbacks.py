"""Callbacks: PEFT-format adapter export next to the checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: the logger's version dir (``runs/<name>/version_N``) or the root dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


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
