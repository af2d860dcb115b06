"""Helpers shared by the test modules (pytest puts ``tests/`` on the import path)."""

from __future__ import annotations

from pathlib import Path


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
