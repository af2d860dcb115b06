"""Checkpoints and run directories: one home for every command that writes, finds or reads a capyft checkpoint.

A run lives in ``runs/<name>/version_N/`` (the TensorBoard logger's version dir): ``config.yaml``,
``checkpoints/last.ckpt`` and the best ``checkpoints/step{N}-val_loss{X}.ckpt``, ``adapter/best`` and
``adapter/final`` (PEFT format), and a folder per evaluation (``test-last/``). A capyft ``.ckpt`` holds only the
trained LoRA tensors (under ``model.``), optimizer and loop state, RNG state, the base model's architecture and, as
``hyper_parameters``, the ``QLoRAModule`` arguments: enough to rebuild the adapter anywhere. Everything here loads
with ``torch.load(weights_only=True)``. No Lightning module is imported: ``cli``, ``export``, ``conversation`` and the
callbacks call in.

- :mod:`~capyft.checkpoints.runs`: run-dir layout, ``--ckpt_path last|best`` resolution, settings a checkpoint fixes.
- :mod:`~capyft.checkpoints.files`: atomic writes, integrity checks, reading a capyft checkpoint.
- :mod:`~capyft.checkpoints.inference`: loading a checkpoint or adapter folder for ``chat`` and ``export``.
"""

from capyft.checkpoints.files import (
    ADAPTER_HPARAMS,
    LORA_MARK,
    MODULE_PREFIX,
    AtomicCheckpointIO,
    adapter_weights,
    check_checkpoint_file,
    checkpoint_hparams,
    checkpoint_load_error,
    checkpoint_metadata,
    corrupt_checkpoint,
    load_checkpoint,
)
from capyft.checkpoints.inference import (
    adapter_base,
    attach_adapter,
    inference_dtype,
    load_for_inference,
    tokenizer_source,
)
from capyft.checkpoints.runs import (
    FIXED_BY_CHECKPOINT,
    base_model_fingerprint,
    best_checkpoint,
    checkpoint_conflicts,
    config_run_dir,
    find_last_checkpoint,
    log_into_run_dir,
    log_root,
    resolve_ckpt_path,
    run_config,
    run_dir,
)

__all__ = [
    "ADAPTER_HPARAMS",
    "FIXED_BY_CHECKPOINT",
    "LORA_MARK",
    "MODULE_PREFIX",
    "AtomicCheckpointIO",
    "adapter_base",
    "adapter_weights",
    "attach_adapter",
    "base_model_fingerprint",
    "best_checkpoint",
    "check_checkpoint_file",
    "checkpoint_conflicts",
    "checkpoint_hparams",
    "checkpoint_metadata",
    "checkpoint_load_error",
    "config_run_dir",
    "corrupt_checkpoint",
    "find_last_checkpoint",
    "inference_dtype",
    "load_checkpoint",
    "load_for_inference",
    "log_into_run_dir",
    "log_root",
    "resolve_ckpt_path",
    "run_config",
    "run_dir",
    "tokenizer_source",
]
