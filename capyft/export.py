"""``python -m capyft export``: a training checkpoint or adapter folder as a PEFT adapter or as a merged model.

A capyft ``.ckpt`` holds only the trained LoRA tensors (under ``model.``) and, as ``hyper_parameters``, the
``QLoRAModule`` arguments: base model, quantization, LoRA rank, alpha, targets. That is enough to rebuild the adapter:

    python -m capyft export --ckpt_path runs/NAME/version_0/checkpoints/last.ckpt --out exports/NAME
    python -m capyft export --ckpt_path ... --out exports/NAME-merged --merge
    python -m capyft export --adapter runs/NAME/version_0/adapter/best --out exports/NAME-merged --merge

The adapter export never loads the base weights (the model is built on the meta device, only to name the adapted
layers), so it takes seconds even for an 8B model.

``--merge`` folds LoRA into the base the adapter was trained and scored on. A QLoRA adapter learned its correction
against the NF4-dequantized weights, not the original 16-bit ones: on SmolLM2-135M (10 steps, r=16) merging into
the original weights moved the logits by a mean KL of 1.15 from the evaluated model (53% next-token agreement),
13x the adapter's own effect (KL 0.086). So by default (``--merge_base quantized``) the base is loaded in 4-bit
exactly as in training, each 4-bit weight is dequantized by bitsandbytes into a plain float32 ``nn.Linear``, and
LoRA is merged into that, in float32. Saving in bfloat16 rounds ``W + dW`` to 8 bits of mantissa, which drops most
of a small ``dW`` (about a third of the adapter's effect on SmolLM2), so the merged weights are saved in float32
unless ``--dtype`` says otherwise. Every merge measures its fidelity against the evaluated model (4-bit base +
adapter) on a few held-out conversations, prints it and writes it to ``fidelity.json`` beside the weights.
Both kinds of export write the tokenizer and its chat template next to the weights, so the folder is all
``transformers`` / ``peft`` need. Merging runs on CPU and holds the merged model in float32 (4 bytes a parameter).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ActionYesNo

from capyft.checkpoints import (
    adapter_base,
    adapter_weights,
    attach_adapter,
    checkpoint_hparams,
    load_checkpoint,
    load_for_inference,
    run_config,
    tokenizer_source,
)
from capyft.fidelity import compare_logits, encode, fidelity_summary, held_out_conversations, logits
from capyft.modeling import load_base_model, load_tokenizer, to_dtype
from capyft.parsing import CommandParser, run_command

log = logging.getLogger(__name__)

MergeBase = Literal["quantized", "original"]
# A merged model may differ from the evaluated one by at most this share of the adapter's own effect (mean KL of
# the evaluated model against its base without the adapter) before export warns. bfloat16 on SmolLM2: see above.
FIDELITY_TOLERANCE = 0.1


def _check_base(base: str) -> None:
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise FileNotFoundError(f"base model {base} does not exist here; pass its current location with --model DIR")


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
    merge_base: MergeBase = "quantized",
    fidelity_data: str | Path | None = None,
    fidelity_rows: int = 4,
) -> Path:
    """Writes a checkpoint's or adapter folder's LoRA as a PEFT adapter folder, or merged into its base.

    Args:
        out: the folder to write; must be new or empty.
        ckpt_path: a capyft ``.ckpt`` (exclusive with ``adapter``).
        adapter: a PEFT adapter folder, e.g. ``runs/<name>/version_N/adapter/best``.
        merge: fold LoRA into the base and save a plain transformers model plus ``fidelity.json``; otherwise save
            the adapter alone.
        dtype: ``float16``, ``bfloat16`` or ``float32``. Adapter: the dtype of the saved LoRA tensors (default
            float32, as trained). Merged: the dtype of the saved weights (default float32, which keeps the adapter
            exactly; 16-bit halves the size and export warns when that loses more than ``FIDELITY_TOLERANCE`` of
            the adapter's effect).
        model: the base model, overriding the one the checkpoint or adapter names (e.g. it moved).
        merge_base: ``quantized``: the base as trained and evaluated (4-bit weights dequantized, when the run
            trained in 4-bit); ``original``: the base's own 16/32-bit weights, which the adapter never saw.
        fidelity_data: a data file whose first ``fidelity_rows`` conversations measure the merge (default: the run's
            test or validation rows, else the bundled sample rows).
        fidelity_rows: how many conversations measure the merge.

    Returns:
        ``out``.

    Raises:
        ValueError: neither or both sources, a bad dtype or merge base, a quantized merge of an adapter folder whose
            run config is not found, or a checkpoint that does not load (see :func:`load_checkpoint`).
        FileNotFoundError: a source or base model path that does not exist.
        FileExistsError: ``out`` holds files.
    """
    if (ckpt_path is None) == (adapter is None):
        raise ValueError("give exactly one source: --ckpt_path FILE.ckpt or --adapter DIR")
    if dtype is not None:
        to_dtype(dtype)
    if merge_base not in ("quantized", "original"):
        raise ValueError(f"merge_base must be 'quantized' or 'original', got {merge_base!r}")
    if fidelity_rows < 1:
        raise ValueError(f"fidelity_rows must be >= 1, got {fidelity_rows}")
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    hparams = checkpoint_hparams(checkpoint) if checkpoint is not None else {"trust_remote_code": False}
    base = model or (hparams["model_name_or_path"] if checkpoint is not None else adapter_base(adapter))
    hparams["model_name_or_path"] = base
    _check_base(base)
    if merge and merge_base == "quantized" and checkpoint is None and not run_config(adapter).get("model"):
        raise ValueError(
            f"{adapter} is not inside a capyft run dir (no ../../config.yaml), so how its base was quantized in "
            "training is unknown; export the run's --ckpt_path instead, or merge into --merge_base original"
        )
    out = _prepare_out(out)
    tokenizer = load_tokenizer(tokenizer_source(adapter, base), hparams["trust_remote_code"])
    if merge:
        merged, fidelity = merge_adapter(
            ckpt_path, adapter, model, merge_base, dtype or "float32", fidelity_data, fidelity_rows
        )
        _set_end_of_turn(merged, tokenizer)
        merged.save_pretrained(out)
        (out / "fidelity.json").write_text(json.dumps(fidelity, indent=2) + "\n")
        print(fidelity_summary(fidelity))
    elif checkpoint is not None:
        _save_adapter_from_checkpoint(checkpoint, hparams, base, out, dtype or "float32")
    else:
        _copy_adapter(Path(adapter), out, dtype)
    tokenizer.save_pretrained(out)
    log.info("exported %s to %s", "merged model" if merge else "adapter", out)
    return out


# ---- merging --------------------------------------------------------------------------------------------------
def merge_adapter(
    ckpt_path: str | Path | None,
    adapter: str | Path | None,
    model: str | None,
    merge_base: MergeBase = "quantized",
    dtype: str = "float32",
    fidelity_data: str | Path | None = None,
    fidelity_rows: int = 4,
) -> tuple[Any, dict[str, Any]]:
    """Merges LoRA into the chosen base in float32, casts to ``dtype`` and measures the result.

    The evaluated model (the base as trained, 4-bit when it was, plus the adapter; float32 compute) answers the
    held-out conversations first; its 4-bit layers then become float32 ``nn.Linear`` layers holding exactly the
    dequantized weights it computed with, and LoRA is merged into those (``--merge_base original``: into the
    base's own weights instead).

    Returns:
        ``(merged model, fidelity)``: a plain transformers model in ``dtype`` on CPU, and the numbers of
        :func:`capyft.fidelity.compare_logits` with what was compared.
    """
    from peft import PeftModel

    evaluated, tokenizer, checkpoint = load_for_inference(ckpt_path, adapter, model, dtype="float32", device="cpu")
    source = run_config(ckpt_path if ckpt_path is not None else adapter)
    data = (checkpoint.get("datamodule_hyper_parameters") if checkpoint else None) or source.get("data") or {}
    conversations, description = held_out_conversations(data, fidelity_data, fidelity_rows)
    inputs = [encode(tokenizer, c, data.get("system_prompt")) for c in conversations]
    reference = logits(evaluated, inputs)
    with evaluated.disable_adapter():
        without_adapter = logits(evaluated, inputs)
    hparams = checkpoint_hparams(checkpoint) if checkpoint else dict(source.get("model") or {})
    base = model or (hparams["model_name_or_path"] if checkpoint else adapter_base(adapter))
    trust = bool(hparams.get("trust_remote_code", False))
    quantized = bool(hparams.get("load_in_4bit", False))
    if merge_base == "quantized":
        plain = dequantize_4bit_layers(evaluated.unload(), torch.float32)
    else:
        del evaluated
        plain = load_base_model(base, None, "float32", "sdpa", "cpu", trust)
    kind = "dequantized 4-bit" if quantized and merge_base == "quantized" else "original"
    log.info("merging LoRA in float32 into the %s weights of %s", kind, base)
    if checkpoint:
        net = attach_adapter(plain, {**hparams, "model_name_or_path": base}, adapter_weights(checkpoint))
    else:
        net = PeftModel.from_pretrained(plain, str(adapter))
    merged = net.merge_and_unload(safe_merge=True)  # safe_merge: raise on NaN instead of saving broken weights
    if dtype != "float32":
        for param in merged.parameters():  # round to what will be saved, but compute the check in float32
            param.data = param.data.to(to_dtype(dtype)).float()
    fidelity = compare_logits(reference, logits(merged, inputs), without_adapter, inputs)
    fidelity |= {
        "merge_base": merge_base if quantized else "original (the run trained without quantization)",
        "saved_dtype": dtype,
        "reference": "the evaluated model: "
        + ("4-bit" if quantized else "16/32-bit")
        + " base + adapter, unmerged, computed in float32",
        "conversations": description,
        "tokens": sum(len(ids) for ids in inputs),
        "tolerance": FIDELITY_TOLERANCE,
    }
    if fidelity["kl_share_of_adapter_effect"] > FIDELITY_TOLERANCE:
        fidelity["warning"] = (
            f"the merged model ({merge_base} base, {dtype}) differs from the evaluated model by "
            f"{fidelity['kl_share_of_adapter_effect']:.0%} of the adapter's own effect; merge with --merge_base "
            "quantized --dtype float32 to keep what was evaluated"
        )
        log.warning("%s", fidelity["warning"])
    return merged.to(to_dtype(dtype)).eval(), fidelity


def dequantize_4bit_layers(model: Any, dtype: torch.dtype = torch.float32) -> Any:
    """Replaces every bitsandbytes 4-bit linear layer by a plain ``nn.Linear`` holding its dequantized weight.

    ``bitsandbytes.functional.dequantize_4bit`` gives exactly the weights the 4-bit layer multiplies with (in its
    quant state's dtype, float32 when loaded so). The model's quantization config is removed, so
    ``save_pretrained`` writes a plain model.
    """
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


# ---- adapter export -------------------------------------------------------------------------------------------
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
    """``python -m capyft export``: the arguments of :func:`export` as flags (``--merge`` alone turns merging on).

    Args:
        argv: the arguments after ``export`` (default: ``sys.argv[1:]``, for ``python -m capyft.export``).

    Returns:
        The exit status.
    """
    parser = CommandParser(
        prog="python -m capyft export",
        description="Write a capyft checkpoint's or adapter folder's LoRA as a PEFT adapter, or merged into its base.",
    )
    parser.add_function_arguments(export, skip={"merge"})
    parser.add_argument("--merge", action=ActionYesNo, default=False, help="merge LoRA into its base (--no_merge)")

    def command(**values: Any) -> int:
        print(export(**values))
        return 0

    return run_command(parser, argv, command)


if __name__ == "__main__":
    sys.exit(main())
