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
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from capyft.checkpoints import (
    adapter_base,
    adapter_weights,
    attach_adapter,
    checkpoint_hparams,
    load_checkpoint,
    tokenizer_source,
)
from capyft.modeling import load_base_model, load_tokenizer, to_dtype

log = logging.getLogger(__name__)


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
