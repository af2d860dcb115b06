"""``python -m capyft fit|validate|test|predict``: LightningCLI over ``QLoRAModule`` and ``ChatDataModule``."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from capyft import checkpoints, checks
from capyft.callbacks import (
    GracefulStop,
    NonFiniteError,
    NonFiniteGuard,
    OutOfMemoryAdvice,
    RunCheckpoints,
    StopRequested,
    ValidateFinalStep,
)
from capyft.checkpoints import AtomicCheckpointIO
from capyft.datamodule import ChatDataModule
from capyft.model import MONITOR, QLoRAModule
from capyft.parsing import one_line, raised_by_capyft
from capyft.progress import StepProgress

log = logging.getLogger("capyft")


class SaveFitConfig(SaveConfigCallback):
    """Saves the resolved config into the run dir for ``fit`` only: evaluating a run must not overwrite it."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class CapyArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad key or value in one line instead of a 130-line usage block."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.split()
        if message.startswith("invalid choice") or "subcommand" in message:
            message += f" (also: {', '.join(EXTRA_COMMANDS)})"
        sys.stderr.write(one_line(message, "python -m capyft" + (f" {prog[-1]}" if len(prog) > 1 else "")))
        self.exit(2)


class CapyCLI(LightningCLI):
    """LightningCLI with capyft's links, checkpointing defaults and device-aware precision."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.add_lightning_class_args(RunCheckpoints, "checkpoint")
        parser.add_lightning_class_args(NonFiniteGuard, "guard")
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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            parser.set_defaults({"verbose": False})  # capyft prints its own table, not Lightning's of 30 raw metrics
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # before LightningCLI reads the checkpoint's hyperparameters: resolve `last`, refuse a damaged file
        if self.config.get("subcommand"):
            checkpoints.resolve_ckpt_path(self.config[self.config.subcommand])

    def _parse_ckpt_path(self) -> None:
        """Checks a ``--ckpt_path``'s settings against the command's instead of letting the checkpoint's win.

        LightningCLI copies every ``model.*`` value of a checkpoint over the command line, so ``--model.lora_r 16`` on
        an r=8 checkpoint silently trained at r=8 and a moved base folder could not be given. Here the command's
        values apply; those the checkpoint fixes (adapter shape, quantization, base architecture) must agree.
        """
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = checkpoints.checkpoint_metadata(ckpt_path)
        saved = ckpt.get("hyper_parameters") or {}
        conflicts = checkpoints.checkpoint_conflicts(saved, dict(config.model), ckpt.get("base_model") or {})
        if conflicts:
            raise checks.ConfigError(
                f"ckpt_path: {ckpt_path} does not fit this command: {'; '.join(conflicts)}. Pass the checkpoint's "
                "values (its run's config.yaml holds them: --config runs/<name>/version_N/config.yaml) or start a new "
                "run without --ckpt_path"
            )
        saved_data = ckpt.get("datamodule_hyper_parameters") or {}
        if saved_data.get("source") not in (None, config.data.get("source")):
            log.warning(
                "ckpt_path: the checkpoint was trained on %s, this command reads %s",
                saved_data["source"],
                config.data.get("source"),
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        on_gpu = torch.cuda.is_available() and str(trainer.accelerator) != "cpu"
        capability = torch.cuda.get_device_capability() if on_gpu else None
        precision = checks.resolve_precision(trainer.precision, config.model.compute_dtype, capability)
        if precision != str(trainer.precision):
            log.warning(
                "precision %s needs a CUDA GPU; none found, so training runs in %s", trainer.precision, precision
            )
            trainer.precision = precision
        checks.check_model_path(config.model.model_name_or_path)
        checks.check_data_source(config.data.source)
        checks.check_model_values(config.model.as_dict())
        if self.subcommand == "fit":
            checks.check_compile(config.model.get("compile_layers"), on_gpu)
        checks.check_data_values(config.data.as_dict())
        if self.subcommand != "fit":
            checkpoints.log_into_run_dir(config)
        checks.check_run_outputs(config.trainer.as_dict(), config.checkpoint.as_dict())
        checks.check_gpu_memory_cap()

    def before_fit(self) -> None:
        self._check_max_length()
        self._exit_after_run()

    def before_validate(self) -> None:
        self._check_max_length()
        self._exit_after_run()

    def before_test(self) -> None:
        self._exit_after_run()

    def before_predict(self) -> None:
        self._exit_after_run()

    def _exit_after_run(self) -> None:
        """The process ends after the subcommand: the module need not be moved to CPU memory at its end."""
        if isinstance(self.model, QLoRAModule):
            self.model.stays_on_device_at_teardown = True

    def _check_max_length(self) -> None:
        """Loads the tokenizer (kept for the data module) and checks data.max_length against its chat header."""
        from capyft.modeling import load_tokenizer

        data = self.datamodule
        if data is None or data.tokenizer is not None:
            return
        try:
            data.tokenizer = load_tokenizer(data.hparams.tokenizer_name_or_path)
        except OSError as err:
            raise checks.ConfigError(
                f"model.model_name_or_path: no tokenizer in {data.hparams.tokenizer_name_or_path}: {err}"
            ) from err
        checks.check_max_length(data.hparams.max_length, data.tokenizer, data.hparams.system_prompt)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if trainer.get("enable_progress_bar") is not False and not has_bar:
            kwargs["callbacks"] = [*callbacks, StepProgress()]
        # atomic checkpoint writes unless the user chose a CheckpointIO (as a plugin or on the strategy)
        plugins = trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        own_io = getattr(trainer.get("strategy"), "_checkpoint_io", None) is not None
        if not own_io and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def trainer_defaults() -> dict[str, Any]:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "capyft", "default_hp_metric": False},
        },
        "callbacks": [GracefulStop(), ValidateFinalStep(), OutOfMemoryAdvice()],
        "log_every_n_steps": 1,
        "use_distributed_sampler": False,  # ChatDataModule shards its own token-aware batches per rank
        "precision": "16-mixed",
    }


# Commands beside LightningCLI's (fit, validate, test, predict), each a module with ``main(argv) -> int`` whose
# parser is a capyft.parsing.CommandParser: the same error format and exit statuses as the Lightning ones.
EXTRA_COMMANDS = {"data": "capyft.preview", "export": "capyft.export", "chat": "capyft.conversation"}
DESCRIPTION = (
    "capyft: QLoRA fine-tuning of chat models on multi-turn conversations. Subcommands: fit, validate, test, predict "
    "(LightningCLI: `python -m capyft fit --help`), plus `python -m capyft data --help` (what is trained, no model "
    "loaded), `python -m capyft export --help` (adapter or merged model) and `python -m capyft chat --help` "
    "(interactive chat, batch answers)."
)


def main(args: list[str] | None = None) -> CapyCLI | int:
    """Entry point of ``python -m capyft``: LightningCLI's subcommands, plus :data:`EXTRA_COMMANDS`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in EXTRA_COMMANDS:
        return importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
    return CapyCLI(
        QLoRAModule,
        ChatDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_callback=SaveFitConfig,
        parser_class=CapyArgumentParser,
        parser_kwargs={"description": DESCRIPTION},
        args=args,
    )


def run(args: list[str] | None = None) -> int:
    """Console-script entry (``capyft ...``): runs :func:`main` and turns known faults into one line and a status.

    Returns:
        0 done; 2 a config or data error (named key or row, and the fix); 1 out of memory or non-finite training;
        143 (SIGTERM) or 130 (Ctrl-C) stopped at a step boundary after saving ``last.ckpt``. ``CAPYFT_TRACEBACK=1``
        shows tracebacks instead.
    """
    try:
        result = main(args)
    except StopRequested as stop:
        log.warning("stopped by %s; continue with the same command plus --ckpt_path last", stop.signal_name)
        return 130 if stop.signal_name == "SIGINT" else 143
    except SIGTERMException:
        log.warning("stopped by SIGTERM; continue with the same command plus --ckpt_path last")
        return 143
    except (torch.cuda.OutOfMemoryError, NonFiniteError, ValueError, FileNotFoundError) as err:
        expected = isinstance(err, (NonFiniteError, torch.cuda.OutOfMemoryError)) and not os.environ.get(
            "CAPYFT_TRACEBACK"
        )
        if not expected and not raised_by_capyft(err):
            raise
        if isinstance(err, torch.cuda.OutOfMemoryError):  # OutOfMemoryAdvice has logged what to lower
            log.error("stopped: %s", str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory")
            return 1
        log.error("%s", err)
        return 1 if isinstance(err, NonFiniteError) else 2
    return result if isinstance(result, int) else 0
