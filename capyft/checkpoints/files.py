"""Checkpoint files: atomic writes, integrity checks before unpickling, and reading a capyft ``.ckpt`` (tensors and
plain values only, ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from capyft.checks import ConfigError

log = logging.getLogger(__name__)


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


MODULE_PREFIX = "model."  # QLoRAModule keeps the PEFT model in ``self.model``


LORA_MARK = "lora_"  # every adapter tensor name holds it (lora_A, lora_B, lora_magnitude_vector); base names don't


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's plain entries (hyper-parameters, callback state, base fingerprint) without reading its tensors:
    the file is memory-mapped, so an 8B run's adapter and optimizer state (~0.5 GB) are not loaded just to be
    looked at before Lightning loads them again."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


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
