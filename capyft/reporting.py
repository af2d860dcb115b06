"""What the test and predict hooks write and print: ``predictions.jsonl``, ``test_metrics.json``, TensorBoard text
and histograms, and the printed comparison table. Plain functions; no Lightning.

Each evaluation writes into its own folder of the run dir, named for the checkpoint (``test-last/``,
``test-step8-val_loss2.0671/``, ``predict-last/``; ``test-last-2/`` for the second test of ``last.ckpt``), so no
evaluation overwrites another's files.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from capyft.evaluation import BERTScoreSettings
from capyft.generation import GenerationSettings
from capyft.stats import PairedComparison

SCORE_ROWS = ("precision", "recall", "f1", "precision_rescaled", "recall_rescaled", "f1_rescaled")


def comparison_table(metrics: dict[str, float]) -> Any:
    """A ``rich`` table of the mean scores: fine-tuned, and with a base run the base, the delta, its bootstrap
    interval, win/tie/loss counts and the sign test's p-value (:mod:`capyft.stats`)."""
    from rich.table import Table

    has_base = any(key.startswith("test/base_") for key in metrics)
    paired = ("delta", "95% CI", "wins/ties/losses", "sign test p")
    table = Table(title="BERTScore on the test set")
    for column in ("score", "fine-tuned", *(("base", *paired) if has_base else ())):
        table.add_column(column, justify="left" if column == "score" else "right")
    for name in SCORE_ROWS:
        key = f"test/bertscore_{name}"
        if key not in metrics:
            continue
        row = [name, f"{metrics[key]:.4f}"]
        if has_base:
            row += [f"{metrics[f'test/base_bertscore_{name}']:.4f}", f"{metrics[f'{key}_delta']:+.4f}"]
            if f"{key}_wins" in metrics:
                counts = "/".join(str(int(metrics[f"{key}_{c}"])) for c in ("wins", "ties", "losses"))
                ci = f"[{metrics[f'{key}_delta_ci_low']:+.4f}, {metrics[f'{key}_delta_ci_high']:+.4f}]"
                row += [ci, counts, f"{metrics[f'{key}_sign_test_p']:.3g}"]
            else:  # rescaled scores: per-prompt results are the raw ones, linearly rescaled
                row += ["", "", ""]
        table.add_row(*row)
    return table


def paired_summary(comparisons: dict[str, PairedComparison]) -> list[str]:
    """One plain sentence per score (F1 first): the delta, its interval, the counts and whether a difference was
    shown."""
    order = sorted(comparisons, key=lambda name: ("f1", "precision", "recall").index(name))
    return [comparisons[name].summary(f"BERTScore {name}") for name in order]


def print_summary(
    metrics: dict[str, float],
    bertscore_hash: str,
    paths: list[Path],
    comparisons: dict[str, PairedComparison] | None = None,
) -> None:
    """Prints the comparison table, the paired verdicts, bert-score's hash and where the outputs went."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 120)  # a file or pipe: wide enough for the table
    console.print(comparison_table(metrics))
    for line in paired_summary(comparisons or {}):
        console.print(line, highlight=False)
    console.print(f"bert-score: {bertscore_hash}")
    console.print(f"written: {', '.join(map(str, paths))}")


def output_dir(run: str | Path, stage: str, ckpt_path: str | None, step: int) -> Path:
    """A new folder for one ``test`` or ``predict`` run: ``<run>/<stage>-<checkpoint name>``, with ``-2``, ``-3``
    ... when that name is taken, so evaluating a run again never overwrites what an earlier evaluation wrote.

    Args:
        run: the run dir.
        stage: ``test`` or ``predict``.
        ckpt_path: the evaluated checkpoint (its file name without ``.ckpt`` names the folder), or None for the
            weights in memory (named ``step<step>``).
        step: the trainer's global step, for ``ckpt_path`` None.
    """
    name = Path(ckpt_path).stem if ckpt_path else f"step{step}"
    base = Path(run) / f"{stage}-{name}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)  # atomic: two evaluations of one run never share a folder
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def write_predictions(directory: str | Path, records: list[dict[str, Any]]) -> Path:
    """Writes ``predictions.jsonl`` (one record per line) into ``directory``, replacing an earlier version there."""
    path = Path(directory) / "predictions.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)  # the unscored answers stay whole until the scored ones are complete
    return path


def write_metrics(directory: str | Path, metrics: dict[str, float], info: dict[str, Any]) -> Path:
    """Writes ``test_metrics.json`` (metrics, NaN as null, plus ``info``) into ``directory``."""
    path = Path(directory) / "test_metrics.json"
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    path.write_text(json.dumps({**clean, **info}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def examples_markdown(records: list[dict[str, Any]], count: int = 4) -> str:
    """The first ``count`` examples as Markdown (last prompt turn, reference, prediction, base prediction)."""
    blocks = []
    for record in records[:count]:
        last_turn = record["prompt"][-1]["content"] if record["prompt"] else ""
        score = f" (F1 {record['f1']:.3f})" if "f1" in record else ""
        lines = [f"**row {record['row']}**{score}", "", f"*prompt:* {last_turn}"]
        lines += ["", f"*reference:* {record['reference']}", "", f"*prediction:* {record['prediction']}"]
        if record.get("base_prediction") is not None:
            lines += ["", f"*base:* {record['base_prediction']} (F1 {record.get('base_f1', float('nan')):.3f})"]
        blocks.append("\n".join(lines))
    return "\n\n---\n\n".join(blocks)


def settings_dict(generation: GenerationSettings, bertscore: BERTScoreSettings) -> dict[str, Any]:
    """Both settings as plain dicts, for ``test_metrics.json``."""
    return {"generation": asdict(generation), "bertscore": asdict(bertscore)}


def log_text(loggers: list[Any], tag: str, text: str, step: int) -> None:
    """Writes Markdown ``text`` under ``tag`` at ``step`` to every logger that takes text (TensorBoard)."""
    for logger in loggers:
        experiment = logger.experiment
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, step)


def report_test(
    out: Path,
    records: list[dict[str, Any]],
    metrics: dict[str, float],
    comparisons: dict[str, PairedComparison],
    info: dict[str, Any],
    loggers: list[Any],
    step: int,
) -> dict[str, float]:
    """Everything a scored test leaves: ``predictions.jsonl`` with the scores, ``test_metrics.json`` (metrics, the
    paired statistics and ``info``), TensorBoard text and per-example histograms, and the printed table.

    Returns:
        ``metrics`` with ``test/gen_stopped_frac`` (the share of answers that ended at an end-of-turn) added.
    """
    metrics["test/gen_stopped_frac"] = sum(r["stopped"] for r in records) / len(records)
    paired = paired_summary(comparisons)
    info = {
        **info,
        "num_examples": len(records),
        "paired": {name: c.as_dict() for name, c in comparisons.items()} | ({"summary": paired} if paired else {}),
    }
    predictions = write_predictions(out, records)  # now with the scores
    summary = write_metrics(out, metrics, info)
    log_text(loggers, "test/examples", examples_markdown(records), step)
    if paired:
        log_text(loggers, "test/paired", "\n\n".join(paired), step)
    tags = {"f1": "bertscore_f1", "base_f1": "base_bertscore_f1", "f1_delta": "bertscore_f1_delta"}
    for logger in loggers:
        experiment = logger.experiment
        if hasattr(experiment, "add_histogram"):  # TensorBoard
            for key, tag in tags.items():
                if key in records[0]:
                    experiment.add_histogram(f"test/{tag}_per_example", np.array([r[key] for r in records]), step)
    print_summary(metrics, info["bertscore_hash"], [predictions, summary], comparisons)
    return metrics
