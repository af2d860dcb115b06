"""``python -m capyft export``: a training checkpoint or adapter folder as a PEFT adapter or as a merged model.

A capyft ``.ckpt`` holds only the trained LoRA tensors (under ``model.``) and, as ``hyper_parameters``, the
``QLoRAModule`` arguments: base model, LoRA rank, alpha, targets. That is enough to rebuild the adapter:

    python -m capyft export --ckpt_path runs/NAME/version_0/checkpoints/last.ckpt --out exports/NAME
    python -m capyft export --ckpt_path ... --out exports/NAME-merged --merge --dtype bfloat16
    python -m capyft export --adapter runs/NAME/version_0/adapter/best --out exports/NAME-merged --merge

The adapter export never loads the base weights (the model is built on the meta device, only to name the adapted
layers), so it takes seconds even for an 8B model. ``--merge`` loads the base in 16/32-bit on CPU, never in 4-bit:
folding LoRA into 4-bit weights would requantize them and lose what was learned. Both write the tokenizer and its
chat template next to the weights, so the folder is all ``transformers`` / ``peft`` need.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from capyft import checks
from capyft.modeling import build_lora_config, load_base_model, load_tokenizer, to_dtype

log = logging.getLogger(__name__)

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
    checks.check_checkpoint_file(path)  # truncated or damaged (CRC), reported before unpickling
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise ValueError(
                f"{path} holds Python objects beyond tensors and plain data, so it is not loaded (weights_only=True "
                f"refuses them; a capyft checkpoint needs none). First line of torch's error: "
                f"{str(err).strip().splitlines()[-1][:300]}"
            ) from err
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt or not a .ckpt): {err}") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not hparams.get("model_name_or_path"):
        raise ValueError(
            f"{path} is not a capyft checkpoint: it has no hyper_parameters.model_name_or_path (expected a .ckpt "
            "written by `python -m capyft fit`)"
        )
    if not any(LORA_MARK in key for key in checkpoint.get("state_dict") or {}):
        raise ValueError(f"{path} is not a capyft checkpoint: its state_dict holds no LoRA tensors")
    return checkpoint


def checkpoint_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The ``QLoRAModule`` arguments of a checkpoint, with the module's defaults for any it lacks."""
    from capyft.model import QLoRAModule

    defaults = {
        name: p.default
        for name, p in inspect.signature(QLoRAModule.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **checkpoint["hyper_parameters"]}


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


def _check_base(base: str) -> None:
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise FileNotFoundError(f"base model {base} does not exist here; pass its current location with --model DIR")


def _stored_dtype(base: str, trust_remote_code: bool) -> str:
    """The dtype the base model's weights are published in, when it is one capyft names; float32 otherwise."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float16", "bfloat16", "float32") else "float32"


def _prepare_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out or empty it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export(
    out: str | Path,
    ckpt_path: str | Path | None = None,
    adapter: str | Path | None = None,
    merge: bool = False,
    dtype: str | None = None,
    model: str | None = None,
) -> Path:
    """Writes a checkpoint's or adapter folder's LoRA as a PEFT adapter folder, or merged into its base.

    Args:
        out: the folder to write; must be new or empty.
        ckpt_path: a capyft ``.ckpt`` (exclusive with ``adapter``).
        adapter: a PEFT adapter folder, e.g. ``runs/<name>/version_N/adapter/best``.
        merge: fold LoRA into the base (loaded in ``dtype`` on CPU) with ``merge_and_unload`` and save a plain
            transformers model; otherwise save the adapter alone.
        dtype: ``float16``, ``bfloat16`` or ``float32``. Adapter: the dtype of the saved LoRA tensors (default
            float32, as trained). Merged: the dtype of the base and the saved model (default: the base's own).
        model: the base model, overriding the one the checkpoint or adapter names (e.g. it moved).

    Returns:
        ``out``.

    Raises:
        ValueError: neither or both sources, a bad dtype, or a checkpoint that does not load (see
            :func:`load_checkpoint`).
        FileNotFoundError: a source or base model path that does not exist.
        FileExistsError: ``out`` holds files.
    """
    if (ckpt_path is None) == (adapter is None):
        raise ValueError("give exactly one source: --ckpt_path FILE.ckpt or --adapter DIR")
    if dtype is not None:
        to_dtype(dtype)
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    hparams = checkpoint_hparams(checkpoint) if checkpoint is not None else {"trust_remote_code": False}
    base = model or (hparams["model_name_or_path"] if checkpoint is not None else adapter_base(adapter))
    hparams["model_name_or_path"] = base
    _check_base(base)
    trust = hparams["trust_remote_code"]
    out = _prepare_out(out)
    tokenizer = load_tokenizer(tokenizer_source(adapter, base), trust)

    if merge:
        dtype = dtype or _stored_dtype(base, trust)
        log.info("merging LoRA into %s loaded in %s on CPU", base, dtype)
        net = load_base_model(base, None, dtype, "sdpa", "cpu", trust)
        if checkpoint is not None:
            net = attach_adapter(net, hparams, adapter_weights(checkpoint))
        else:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, str(adapter))
        merged = net.merge_and_unload(safe_merge=True)  # safe_merge: raise on NaN instead of saving broken weights
        _set_end_of_turn(merged, tokenizer)
        merged.save_pretrained(out)
    elif checkpoint is not None:
        _save_adapter_from_checkpoint(checkpoint, hparams, base, out, dtype or "float32")
    else:
        _copy_adapter(Path(adapter), out, dtype)
    tokenizer.save_pretrained(out)
    log.info("exported %s to %s", "merged model" if merge else "adapter", out)
    return out


def _save_adapter_from_checkpoint(
    checkpoint: dict[str, Any], hparams: dict[str, Any], base: str, out: Path, dtype: str
) -> None:
    """Builds the PEFT model on a meta-device base (no weights read) to save the checkpoint's adapter in PEFT form."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=hparams["trust_remote_code"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=hparams["trust_remote_code"])
    weights = {key: value.to(to_dtype(dtype)) for key, value in adapter_weights(checkpoint).items()}
    net = attach_adapter(skeleton, hparams, weights, assign=True)
    net.peft_config["default"].base_model_name_or_path = base
    net.save_pretrained(out)


def _copy_adapter(adapter: Path, out: Path, dtype: str | None) -> None:
    """Copies a PEFT adapter folder's config and weights, cast to ``dtype`` when given."""
    from safetensors.torch import load_file, save_file

    weights_file = adapter / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_model.safetensors; give a folder saved by PEFT")
    weights = load_file(weights_file)
    if dtype is not None:
        weights = {key: value.to(to_dtype(dtype)) for key, value in weights.items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())


def _set_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Lets a plain ``generate`` on the merged model stop at the chat template's end-of-turn tokens."""
    from capyft.chat import end_of_turn_ids

    config = model.generation_config
    current = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = sorted({*(i for i in current if i is not None), *end_of_turn_ids(tokenizer)})
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def main(argv: list[str] | None = None) -> int:
    """``python -m capyft export``: parses the arguments and runs :func:`export`.

    Args:
        argv: the arguments after ``export`` (default: ``sys.argv[1:]``, for ``python -m capyft.export``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m capyft export",
        description="Write a capyft checkpoint's or adapter folder's LoRA as a PEFT adapter, or merged into its base.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="a capyft .ckpt (runs/<name>/version_N/checkpoints/*.ckpt)")
    source.add_argument("--adapter", help="a PEFT adapter folder (runs/<name>/version_N/adapter/best)")
    parser.add_argument("--out", required=True, help="folder to write (new or empty)")
    parser.add_argument("--merge", action="store_true", help="merge LoRA into the 16/32-bit base; save a plain model")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="dtype of the saved weights")
    parser.add_argument("--model", help="base model dir or hub id, overriding the one the source names")
    args = parser.parse_args(argv)
    try:
        out = export(args.out, args.ckpt_path, args.adapter, args.merge, args.dtype, args.model)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
