"""What the test hook writes and prints: ``predictions.jsonl``, ``test_metrics.json``, TensorBoard text and
histograms, and the printed comparison table. Plain functions; no Lightning.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from capyft.evaluation import BERTScoreSettings
from capyft.generation import GenerationSettings


def comparison_table(metrics: dict[str, float]) -> Any:
    """A ``rich`` table of the mean scores: fine-tuned, base and their difference where a base run exists."""
    from rich.table import Table

    has_base = any(key.startswith("test/base_") for key in metrics)
    table = Table(title="BERTScore on the test set")
    for column in ("score", "fine-tuned", *(("base", "delta") if has_base else ())):
        table.add_column(column, justify="left" if column == "score" else "right")
    for key, value in metrics.items():
        if not key.startswith("test/bertscore_") or key.endswith("_delta"):
            continue
        name = key.removeprefix("test/bertscore_")
        row = [name, f"{value:.4f}"]
        if has_base:
            base = metrics[f"test/base_bertscore_{name}"]
            row += [f"{base:.4f}", f"{value - base:+.4f}"]
        table.add_row(*row)
    return table


def print_summary(metrics: dict[str, float], bertscore_hash: str, paths: list[Path]) -> None:
    """Prints the comparison table, bert-score's hash and where the outputs went."""
    from rich.console import Console

    console = Console()
    console.print(comparison_table(metrics))
    console.print(f"bert-score: {bertscore_hash}")
    console.print(f"written: {', '.join(map(str, paths))}")


def write_outputs(
    directory: str | Path, records: list[dict[str, Any]], metrics: dict[str, float], info: dict[str, Any]
) -> tuple[Path, Path]:
    """Writes ``predictions.jsonl`` (one record per line) and ``test_metrics.json`` (metrics plus ``info``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    predictions = directory / "predictions.jsonl"
    with predictions.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = directory / "test_metrics.json"
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    summary.write_text(json.dumps({**clean, **info}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return predictions, summary


def examples_markdown(records: list[dict[str, Any]], count: int = 4) -> str:
    """The first ``count`` examples as Markdown (last prompt turn, reference, prediction, base prediction)."""
    blocks = []
    for record in records[:count]:
        last_turn = record["prompt"][-1]["content"] if record["prompt"] else ""
        lines = [f"**row {record['row']}** (F1 {record.get('f1', float('nan')):.3f})", "", f"*prompt:* {last_turn}"]
        lines += ["", f"*reference:* {record['reference']}", "", f"*prediction:* {record['prediction']}"]
        if record.get("base_prediction") is not None:
            lines += ["", f"*base:* {record['base_prediction']} (F1 {record.get('base_f1', float('nan')):.3f})"]
        blocks.append("\n".join(lines))
    return "\n\n---\n\n".join(blocks)


def settings_dict(generation: GenerationSettings, bertscore: BERTScoreSettings) -> dict[str, Any]:
    """Both settings as plain dicts, for ``test_metrics.json``."""
    return {"generation": asdict(generation), "bertscore": asdict(bertscore)}
