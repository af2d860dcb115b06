"""Run directories and ``--ckpt_path``: where a run's files live, finding ``last``/``best``, and checking a
checkpoint's fixed settings against a command."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L

from capyft.checkpoints.files import check_checkpoint_file, checkpoint_metadata
from capyft.checks import ConfigError

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: the logger's version dir (``runs/<name>/version_N``) or the root dir.

    Not a collective, so rank 0 may call it alone (``trainer.log_dir`` broadcasts: a rank-0-only call to it hangs
    DDP). It is the directory rank 0 writes to; other ranks' loggers may count a different ``version_N``.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    path = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return Path(path or trainer.default_root_dir)


def find_last_checkpoint(log_root: str | Path, pattern: str | None = None) -> Path | None:
    """The newest ``last*.ckpt`` in ``<log_root>/<version>/checkpoints/`` (each run writes a new version dir), or
    the newest match of ``pattern`` under ``log_root``.
    """
    found = [p for p in Path(log_root).expanduser().glob(pattern or "*/checkpoints/last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


# What identifies a base model beyond its path: a moved folder keeps these, another model does not.
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def base_model_fingerprint(config: Any) -> dict[str, Any]:
    """The architecture facts of a base model's config (``FINGERPRINT_KEYS``), for comparing bases across runs."""
    return {key: getattr(config, key, None) for key in FINGERPRINT_KEYS} if config is not None else {}


# Settings a resumed or evaluated checkpoint fixes: the adapter's shape and the base it was trained against. Every
# other model setting (paths, generation, evaluation) comes from the command line; the optimizer and its schedule
# continue from the checkpoint's own state.
FIXED_BY_CHECKPOINT = (
    "lora_r",
    "lora_alpha",
    "target_modules",
    "use_dora",
    "use_rslora",
    "load_in_4bit",
    "quant_type",
    "double_quant",
)


def checkpoint_conflicts(saved: dict[str, Any], current: dict[str, Any], saved_base: dict[str, Any]) -> list[str]:
    """What in ``current`` (the command's model settings) contradicts a checkpoint's ``saved`` hyper-parameters.

    A different ``model_name_or_path`` is fine when it holds the same architecture (``saved_base``, see
    :func:`base_model_fingerprint`): the base folder moved. Without a fingerprint (older checkpoints) it is taken as
    given. Returns one phrase per conflict (empty: none).
    """
    conflicts = []
    for key in FIXED_BY_CHECKPOINT:
        if key in saved and _normalized(saved[key]) != _normalized(current.get(key)):
            conflicts.append(f"model.{key} is {current.get(key)!r} here but {saved[key]!r} in the checkpoint")
    path, saved_path = current.get("model_name_or_path"), saved.get("model_name_or_path")
    if saved_base and path and path != saved_path:
        here = _fingerprint_of(path, bool(current.get("trust_remote_code")))
        if here is not None and here != saved_base:
            differ = ", ".join(f"{k} {saved_base[k]} vs {here[k]}" for k in saved_base if saved_base[k] != here[k])
            conflicts.append(
                f"model.model_name_or_path {path} is another model than the checkpoint's {saved_path} ({differ})"
            )
        elif here is not None:
            log.info("base model moved: %s -> %s (same architecture)", saved_path, path)
    return conflicts


def _normalized(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, tuple)) else value


def _fingerprint_of(path: str, trust_remote_code: bool) -> dict[str, Any] | None:
    from transformers import AutoConfig

    try:
        return base_model_fingerprint(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    except (OSError, ValueError):
        return None  # cannot read it here (offline hub id): loading will say so


def resolve_ckpt_path(config: Any) -> None:
    """Resolves ``--ckpt_path last`` across run versions and checks the file before anything reads it."""
    ckpt = config.get("ckpt_path")
    run = config_run_dir(config)
    if ckpt in ("last", "best") and run is not None:
        # `test --config runs/x/version_N/config.yaml --ckpt_path best|last`: that run's checkpoints
        found = find_last_checkpoint(run / "checkpoints", "last*.ckpt")
        if ckpt == "best" and found is not None:
            found = best_checkpoint(found)
        if found is None:
            raise ConfigError(f"ckpt_path: no {ckpt} checkpoint in {run / 'checkpoints'}; pass a .ckpt path")
        log.info("--ckpt_path %s: %s", ckpt, found)
        config.ckpt_path = ckpt = str(found)
    if ckpt == "last":
        dirpath = config.get("checkpoint", {}).get("dirpath")
        root = Path(dirpath) if dirpath else log_root(config)
        found = None if root is None else find_last_checkpoint(root, "last*.ckpt" if dirpath else None)
        if found is None:
            log.warning("--ckpt_path last: no last.ckpt under %s, so the run starts from scratch", root)
            return
        log.info("--ckpt_path last: %s", found)
        config.ckpt_path = ckpt = str(found)
    if ckpt and ckpt not in ("best", "hpc") and not re.match(r"^\w+:", str(ckpt)):  # not a URL or registry
        check_checkpoint_file(ckpt)


def config_run_dir(config: Any) -> Path | None:
    """The run dir when the (last) ``--config`` is a run's saved ``config.yaml`` next to its ``checkpoints/``."""
    paths = config.get("config") or []
    if not paths:
        return None
    parent = Path(str(paths[-1])).resolve().parent
    return parent if (parent / "checkpoints").is_dir() else None


def best_checkpoint(last: Path) -> Path | None:
    """The best checkpoint recorded in ``last``'s checkpoint-callback state (it outlives the process)."""
    state = checkpoint_metadata(last).get("callbacks", {})
    for key, value in state.items():
        best = value.get("best_model_path") if key.startswith(("RunCheckpoints", "ModelCheckpoint")) else None
        if best and Path(best).is_file():
            return Path(best)
        if best and (last.parent / Path(best).name).is_file():  # the run dir moved
            return last.parent / Path(best).name
    return None


def log_root(config: Any) -> Path | None:
    """Where the runs of this config keep their version dirs: the logger's ``<save_dir>/<name>``."""
    logger = config.trainer.get("logger")
    init = getattr(logger, "init_args", None)
    if init is None or init.get("save_dir") is None:
        return None
    return Path(init.save_dir) / (init.get("name") or "lightning_logs")


def log_into_run_dir(config: Any) -> None:
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


def run_config(source: str | Path | None) -> dict[str, Any]:
    """The ``config.yaml`` that ``fit`` saved in the run dir of a checkpoint or adapter folder; ``{}`` when none.

    ``runs/<name>/version_N/checkpoints/last.ckpt`` and ``runs/<name>/version_N/adapter/best`` both lie two levels
    below the run dir. ``chat`` takes its generation settings from it, ``chat`` and ``export`` an adapter folder's
    quantization settings.
    """
    if source is None:
        return {}
    path = Path(source).resolve().parent.parent / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        log.warning("cannot read the run's %s (%s); using defaults", path, err)
        return {}
    return config if isinstance(config, dict) else {}
