"""Checkpoints and run directories: one home for every command that writes, finds or reads a capyft checkpoint.

A run lives in ``runs/<name>/version_N/`` (the TensorBoard logger's version dir): ``config.yaml``,
``checkpoints/last.ckpt`` and ``checkpoints/best.ckpt``, ``adapter/best`` and ``adapter/final`` (PEFT format), test
outputs. A capyft ``.ckpt`` holds only the trained LoRA tensors (under ``model.``), optimizer and loop state, RNG
state and, as ``hyper_parameters``, the ``QLoRAModule`` arguments (base model, LoRA rank, alpha, targets): enough to
rebuild the adapter anywhere. Everything here loads with ``torch.load(weights_only=True)``.

No Lightning module is imported here: ``cli``, ``export``, ``conversation`` and the callbacks call in.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from capyft.checks import ConfigError
from capyft.modeling import build_lora_config, build_quantization_config, load_base_model, load_tokenizer

log = logging.getLogger(__name__)


# ---- run directories -------------------------------------------------------------------------------------
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
# other model setting (paths, learning rate schedule, generation, evaluation) comes from the command line.
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


# ---- --ckpt_path resolution --------------------------------------------------------------------------------
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
    state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
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


# ---- checkpoint files: atomic writes, integrity checks ----------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<path>.tmp``, fsync, then rename over ``<path>``: a kill at any moment leaves either the
    previous checkpoint or the new one, never a truncated file. Loading reports a damaged file in one line.

    Remote paths (``s3://`` etc.) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows when both lie on one file system
        finally:
            tmp.unlink(missing_ok=True)
        if os.name == "posix":  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" not in str(path) and Path(path).is_file():
            check_checkpoint_file(path)
        weights_only = True if weights_only is None else weights_only  # tensors and plain values only, unless told
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
            raise checkpoint_load_error(path, err) from err


def corrupt_checkpoint(path: str | Path, reason: str) -> ConfigError:
    return ConfigError(
        f"ckpt_path: checkpoint {path} is truncated or corrupt ({reason}); delete it or pass another --ckpt_path "
        "(older checkpoints lie next to it)"
    )


def check_checkpoint_file(path: str | Path) -> None:
    """Fails on a checkpoint file that is missing, truncated or damaged, without unpickling it.

    ``torch.save`` writes a zip archive with a CRC per record: a file cut short has no central directory, and a
    damaged byte fails its CRC (which ``torch.load`` itself does not check: a flipped bit loads silently).

    Raises:
        ConfigError: naming the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path: {path} does not exist; give an existing .ckpt file, or 'last' to resume")
    if not zipfile.is_zipfile(path):
        raise corrupt_checkpoint(path, "not a complete zip archive as torch.save writes")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise corrupt_checkpoint(path, str(err)) from err
    if bad is not None:
        raise corrupt_checkpoint(path, f"record {bad} fails its CRC check")


def checkpoint_load_error(path: str | Path, err: Exception) -> ConfigError:
    """A readable error for a checkpoint ``torch.load`` refused (``err``)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, pickle.UnpicklingError) and "weights only" in first.lower():
        return ConfigError(
            f"ckpt_path: checkpoint {path} holds Python objects beyond tensors and plain values, which loading with "
            f"weights_only=True refuses ({first[:200]}); capyft checkpoints hold none, so this file was not written "
            "by capyft or was altered"
        )
    return corrupt_checkpoint(path, f"{type(err).__name__}: {first[:200]}")


# ---- reading a capyft checkpoint and loading it for inference ---------------------------------------------
MODULE_PREFIX = "model."  # QLoRAModule keeps the PEFT model in ``self.model``


LORA_MARK = "lora_"  # every adapter tensor name holds it (lora_A, lora_B, lora_magnitude_vector); base names don't


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a capyft Lightning checkpoint with ``torch.load(weights_only=True)`` on CPU.

    Only tensors and plain containers are unpickled (capyft stores its RNG state without numpy objects), so a
    checkpoint from elsewhere cannot run code.

    Args:
        path: a ``.ckpt`` written by ``python -m capyft fit``.

    Returns:
        The checkpoint dict, with ``state_dict`` and ``hyper_parameters``.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is a directory, unreadable (truncated, not a PyTorch file), holds other Python objects,
            or is not a capyft checkpoint (no base model in its hyper-parameters, no LoRA tensors).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; give a .ckpt from runs/<name>/version_N/checkpoints/"
        )
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a .ckpt file; for a PEFT adapter folder use --adapter {path}")
    check_checkpoint_file(path)  # truncated or damaged (CRC), reported before unpickling
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise checkpoint_load_error(path, err) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not hparams.get("model_name_or_path"):
        raise ValueError(
            f"{path} is not a capyft checkpoint: it has no hyper_parameters.model_name_or_path (expected a .ckpt "
            "written by `python -m capyft fit`)"
        )
    if not any(LORA_MARK in key for key in checkpoint.get("state_dict") or {}):
        raise ValueError(f"{path} is not a capyft checkpoint: its state_dict holds no LoRA tensors")
    return checkpoint


# The QLoRAModule arguments that rebuilding an adapter reads. save_hyperparameters stores every argument, so a
# checkpoint written by `capyft fit` has all of them.
ADAPTER_HPARAMS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora")


def checkpoint_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The ``QLoRAModule`` arguments of a checkpoint (a copy), checked to hold what rebuilding the adapter needs.

    Raises:
        ValueError: an argument that rebuilding the adapter needs is missing.
    """
    hparams = dict(checkpoint["hyper_parameters"])
    missing = [name for name in ADAPTER_HPARAMS if name not in hparams]
    if missing:
        raise ValueError(
            f"the checkpoint's hyper_parameters lack {', '.join(missing)}; it was not written by `python -m capyft "
            "fit` (export its adapter folder with --adapter instead)"
        )
    hparams.setdefault("trust_remote_code", False)
    return hparams


def adapter_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a checkpoint, named as in the PEFT model (``base_model.model....lora_A.default.weight``)."""
    return {
        key.removeprefix(MODULE_PREFIX): value for key, value in checkpoint["state_dict"].items() if LORA_MARK in key
    }


def attach_adapter(base: Any, hparams: dict[str, Any], weights: dict[str, torch.Tensor], assign: bool = False) -> Any:
    """Wraps ``base`` with the checkpoint's LoRA config and loads its adapter tensors, checking that all match.

    Args:
        base: the base causal LM (4-bit, 16/32-bit, or on the meta device with ``assign=True``).
        hparams: the checkpoint's ``QLoRAModule`` arguments (see :func:`checkpoint_hparams`).
        weights: adapter tensors from :func:`adapter_weights`.
        assign: take the checkpoint tensors as the parameters instead of copying into them (for a meta base).

    Returns:
        The ``PeftModel`` in eval mode.

    Raises:
        ValueError: the checkpoint's tensors do not fit the adapter built on this base.
    """
    from peft import get_peft_model

    lora = build_lora_config(
        hparams["lora_r"],
        hparams["lora_alpha"],
        hparams["lora_dropout"],
        hparams["target_modules"],
        hparams["use_dora"],
        hparams["use_rslora"],
    )
    model = get_peft_model(base, lora)
    expected = {key for key in model.state_dict() if LORA_MARK in key}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's LoRA tensors do not fit the adapter built on {hparams['model_name_or_path']} "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); "
            "pass the base model it was trained on with --model"
        )
    model.load_state_dict(weights, strict=False, assign=assign)
    return model.eval()


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter folder names in its ``adapter_config.json``."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; give a folder saved by PEFT (adapter/best)")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file} names no base_model_name_or_path; pass the base model with --model")
    return base


def tokenizer_source(adapter_dir: str | Path | None, base: str) -> str:
    """Where the tokenizer comes from: the adapter folder when it holds one (capyft saves it there), else the base."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return str(adapter_dir)
    return base


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


def inference_dtype(trained: str | None, on_gpu: bool) -> str:
    """The compute dtype of the model as trained and evaluated: the run's ``compute_dtype`` (float16 becomes
    bfloat16 on CPU, as in ``QLoRAModule.configure_model``); without one float32 on CPU, else bf16 or fp16."""
    if trained is not None:
        return "bfloat16" if trained == "float16" and not on_gpu else trained
    if not on_gpu:
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load_for_inference(
    ckpt_path: str | Path | None = None,
    adapter: str | Path | None = None,
    model: str | None = None,
    load_in_4bit: bool | None = None,
    dtype: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Loads a model for generation: a checkpoint's adapter, an adapter folder, or a base model alone.

    By default this is the model that ``test`` scored: the base quantized as in training (4-bit on CPU too:
    bitsandbytes runs 4-bit layers on CPU) in the training compute dtype, plus the adapter. An adapter folder gets
    its quantization settings from its run's ``config.yaml`` (:func:`run_config`) when it has one.

    Args:
        ckpt_path: a capyft ``.ckpt``; its hyper-parameters give the base and the LoRA config.
        adapter: a PEFT adapter folder; its ``adapter_config.json`` names the base.
        model: the base model; with ``ckpt_path`` or ``adapter`` it overrides the base they name.
        load_in_4bit: quantize the base. Default: as in training (off for a base model alone).
        dtype: weights / compute dtype. Default: :func:`inference_dtype` of the training ``compute_dtype``.
        device: default ``cuda`` when available, else ``cpu``.

    Returns:
        ``(model, tokenizer, checkpoint)``, the model in eval mode; ``checkpoint`` is empty without ``ckpt_path``.

    Raises:
        ValueError: no source given, or both a checkpoint and an adapter.
    """
    if ckpt_path is not None and adapter is not None:
        raise ValueError("give --ckpt_path or --adapter, not both")
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path is not None else {}
    hparams = checkpoint_hparams(checkpoint) if checkpoint else {}
    if checkpoint:
        base = model or hparams["model_name_or_path"]
    elif adapter is not None:
        hparams = dict(run_config(adapter).get("model") or {})  # how the run quantized its base
        base = model or adapter_base(adapter)
    elif model is not None:
        base = model
    else:
        raise ValueError("give a model: --ckpt_path FILE.ckpt, --adapter DIR or --model DIR")
    hparams["model_name_or_path"] = base
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if load_in_4bit is None:
        load_in_4bit = bool(hparams.get("load_in_4bit", False))
    dtype = dtype or inference_dtype(hparams.get("compute_dtype"), device.type == "cuda")
    trust = bool(hparams.get("trust_remote_code", False))
    quantization = build_quantization_config(
        load_in_4bit, hparams.get("quant_type", "nf4"), hparams.get("double_quant", True), dtype
    )
    log.info("loading %s%s in %s on %s", base, " (4-bit)" if load_in_4bit else "", dtype, device)
    net = load_base_model(base, quantization, dtype, hparams.get("attn_implementation", "sdpa"), device, trust)
    if checkpoint:
        net = attach_adapter(net, hparams, {k: v.to(device) for k, v in adapter_weights(checkpoint).items()})
    elif adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(adapter))
    net.config.use_cache = True
    return net.eval(), load_tokenizer(tokenizer_source(adapter, base), trust), checkpoint
