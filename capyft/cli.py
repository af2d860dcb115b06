"""``python -m capyft fit|validate|test|predict``: LightningCLI over ``QLoRAModule`` and ``ChatDataModule``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from capyft.callbacks import AdapterExport
from capyft.datamodule import ChatDataModule
from capyft.model import MONITOR, QLoRAModule

log = logging.getLogger("capyft")
# Precisions that need a CUDA GPU, and what to run instead on CPU (16-true gives NaN there, see FACTS).
GPU_ONLY_PRECISION = {"16-mixed", "16", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16"}


class SaveFitConfig(SaveConfigCallback):
    """Saves the resolved config into the run dir for ``fit`` only: evaluating a run must not overwrite it."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class CapyCLI(LightningCLI):
    """LightningCLI with capyft's links, checkpointing defaults and device-aware precision."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        if not torch.cuda.is_available() and str(trainer.precision) in GPU_ONLY_PRECISION:
            log.warning("precision %s needs a CUDA GPU; none found, so training runs in bf16-mixed", trainer.precision)
            trainer.precision = "bf16-mixed"
        if self.subcommand != "fit":
            _reuse_run_dir(config)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if trainer.get("enable_progress_bar") is not False and not has_bar:
            kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        return super().instantiate_trainer(**kwargs)


def _reuse_run_dir(config: Any) -> None:
    """Evaluating a checkpoint of ``runs/<name>/<version>/checkpoints/``: log into that same run dir."""
    ckpt = config.get("ckpt_path")
    logger = config.trainer.get("logger")
    if not ckpt or ckpt in ("best", "last") or not hasattr(logger, "init_args"):
        return
    path = Path(ckpt).resolve()
    if path.parent.name == "checkpoints":
        version_dir = path.parent.parent
        logger.init_args.save_dir = str(version_dir.parent.parent)
        logger.init_args.name = version_dir.parent.name
        logger.init_args.version = version_dir.name


def trainer_defaults() -> dict[str, Any]:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "capyft", "default_hp_metric": False},
        },
        "callbacks": [AdapterExport()],
        "log_every_n_steps": 1,
        "use_distributed_sampler": False,  # ChatDataModule shards its own token-aware batches per rank
        "precision": "16-mixed",
    }


def main(args: list[str] | None = None) -> CapyCLI | int:
    """Entry point of ``python -m capyft``: LightningCLI's subcommands, plus ``export`` and ``chat`` (argparse)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import sys

    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in ("export", "chat"):
        from capyft import export, interact

        return (export.main if argv[0] == "export" else interact.main)(argv[1:])
    return CapyCLI(
        QLoRAModule,
        ChatDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_callback=SaveFitConfig,
        args=args,
    )


def run() -> int:
    """Console-script entry (``capyft ...``): exit status 0 after a LightningCLI run."""
    result = main()
    return result if isinstance(result, int) else 0
