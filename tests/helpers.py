"""Helpers shared by the test modules (pytest puts ``tests/`` on the import path): paths, the ``fit`` command line,
data files, a stopping callback and TensorBoard readers.

The offline environment (no Hugging Face hub) is set once, in ``conftest.py``; subprocesses inherit it through
:func:`offline_env`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# Plain LoRA in fp32 on CPU (no 4-bit: 4x faster here), 8 train / 2 val / 2 test rows of at most 256 tokens, no
# validation unless a test asks for it, runs under runs/tiny/version_N.
PLAIN_LORA = [
    "--data.train_size=8",
    "--data.val_size=2",
    "--data.test_size=2",
    "--data.max_length=256",
    "--model.load_in_4bit=false",
    "--model.gradient_checkpointing=false",
    "--trainer.precision=32-true",
    "--trainer.accelerator=cpu",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger.init_args.name=tiny",
]
# Plain LoRA that keeps tiny.yaml's validation (8 rows in micro-batches of 2: 4 steps an epoch) and learns fast
# enough (lr 0.02) for val/loss to fall within a few steps; no answers generated at validation, no model summary.
PLAIN_LORA_VALIDATED = [
    "--model.load_in_4bit=false",
    "--model.gradient_checkpointing=false",
    "--model.learning_rate=0.02",
    "--model.val_answers=0",
    "--trainer.enable_model_summary=false",
]


def fit_args(tmp_path: Path, model: Path, data: Path, *extra: str) -> list[str]:
    """``fit`` with configs/tiny.yaml on ``model`` and ``data``, logging under ``tmp_path/runs``, no progress bar.

    Args:
        tmp_path: the folder the run dirs go under (``runs/tiny/version_N``).
        model: the base model folder.
        data: the data file.
        *extra: more flags (e.g. ``*PLAIN_LORA``); they come last, so they override the ones above.
    """
    return [
        "fit",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"--model.model_name_or_path={model}",
        f"--data.source={data}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def offline_env() -> dict[str, str]:
    """This process's environment (offline: conftest.py set it) for a ``python -m capyft`` subprocess, with
    ``tests/`` on ``PYTHONPATH`` so that callbacks given by class path (``helpers.StopAtStep``) import there too."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


class StopAtStep(L.Callback):
    """Stops training after ``step`` optimizer steps, like an interruption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def one_turn(question: str, answer: str) -> dict:
    """A one-turn conversation in trl's ``messages`` schema."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Writes ``rows`` to ``path``, one JSON object a line; returns ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def scalars(run: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of one TensorBoard scalar over every event file of a run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(Path(run).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def texts(run: Path, tag: str) -> dict[int, str]:
    """``{step: text}`` of one TensorBoard text summary (``add_text``) over every event file of a run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, str] = {}
    for events in sorted(Path(run).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        name = f"{tag}/text_summary"
        if name in acc.Tags()["tensors"]:
            for event in acc.Tensors(name):
                values[event.step] = b"".join(event.tensor_proto.string_val).decode()
    return values


def assert_prefill_matches_one_pass(model, input_ids, attention_mask, max_tokens: int, tolerance: float = 1e-5) -> int:
    """:func:`capyft.generation.prefill` in passes of ``max_tokens`` against the model's own one-pass prefill of the
    padded batch (the position ids ``generate`` gives): the same keys and values at every real token, zeros at the
    padding. Returns the number of passes prefill made (the decoder's forward calls)."""
    import torch
    from transformers import DynamicCache

    from capyft.generation import prefill

    decoder = model.get_decoder()
    passes = []
    hook = decoder.register_forward_pre_hook(lambda m, args, kwargs: passes.append(1), with_kwargs=True)
    with torch.no_grad():
        name, cache = prefill(model, input_ids, attention_mask, max_tokens=max_tokens)
    hook.remove()
    own = DynamicCache()
    mask = attention_mask[:, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=input_ids[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True, **{name: own})
    real = mask.bool()
    assert len(cache.layers) == len(own.layers)
    for mine, theirs in zip(cache.layers, own.layers):
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            assert a.shape == b.shape
            a, b = a.transpose(1, 2), b.transpose(1, 2)
            torch.testing.assert_close(a[real], b[real], rtol=tolerance, atol=tolerance)
            assert not a[~real].any()
    return len(passes)


def saved_activation_bytes(model, forward: Callable[[], Any]) -> int:
    """Bytes of the tensors, other than ``model``'s parameters, that autograd keeps for backward while ``forward()``
    runs (each storage counted once)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        forward()
    return sum(kept.values())
