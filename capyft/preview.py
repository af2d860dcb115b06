"""``python -m capyft data --config CFG``: what a config trains on, seen before training; loads no model.

Prints the split sizes and token statistics per split (lengths, what ``max_length`` cuts, the trained-token share),
lists bad rows by row number as ``fit`` names them, and renders conversations with the trained tokens highlighted
(ANSI colours in a terminal, «markers» otherwise); ``--out FILE.html`` writes the same as a page.
"""

from __future__ import annotations

import argparse
import html
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any

from capyft import checks
from capyft.chat import IGNORE_INDEX
from capyft.parsing import one_line, raised_by_capyft

log = logging.getLogger(__name__)

ANSI_TRAINED, ANSI_RESET, ANSI_DIM = "\x1b[1;32m", "\x1b[0m", "\x1b[2m"
MARK_OPEN, MARK_CLOSE = "«", "»"
COLUMNS = ("split", "rows", "min", "median", "p95", "max", "truncated", "lost answers", "trained share")


def build_parser() -> Any:
    """The ``data`` subcommand's parser: ``--config`` files, ``--model.model_name_or_path``, every ``--data.*`` key of
    :class:`~capyft.datamodule.ChatDataModule`, and the preview's own options."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from capyft.datamodule import ChatDataModule

    parser = ArgumentParser(
        prog="python -m capyft data",
        description="Show what a config trains on: split sizes, token statistics, bad rows, and conversations with "
        "the trained tokens highlighted. Loads the tokenizer and the data, never the model.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a fit config (its data and model sections)")
    parser.add_argument("--model.model_name_or_path", type=str, help="model folder or hub id (its tokenizer)")
    parser.add_class_arguments(ChatDataModule, "data", skip={"tokenizer_name_or_path"})
    parser.add_argument("--examples", type=int, default=1, help="conversations to render (0: none)")
    parser.add_argument("--split", type=str, default="train", help="the split the examples come from")
    parser.add_argument("--out", type=str, help="also write the preview as an HTML page to this file")
    parser.add_argument("--color", type=str, default="auto", help="auto (colours on a terminal), always or never")
    return parser


def _config_sections(text: str) -> str:
    """The ``data`` and ``model.model_name_or_path`` sections of a fit config file, as YAML."""
    import yaml

    path = Path(text).expanduser()
    if not path.is_file():
        raise checks.ConfigError(f"--config: {text} does not exist; give a fit config file (YAML)")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise checks.ConfigError(f"--config: {text} is not a YAML mapping of sections (trainer:, model:, data:)")
    kept: dict[str, Any] = {}
    # the tokenizer is linked from the model's path, as in fit
    data = {k: v for k, v in (loaded.get("data") or {}).items() if k != "tokenizer_name_or_path"}
    if data:
        kept["data"] = data
    model = (loaded.get("model") or {}).get("model_name_or_path")
    if model is not None:
        kept["model"] = {"model_name_or_path": model}
    return yaml.safe_dump(kept)


def parse_args(argv: list[str]) -> Any:
    """Parses ``argv`` as ``fit`` would read the same config and overrides (later ``--config`` files and keys win)."""
    args, rest = list(argv), []
    while args:
        arg = args.pop(0)
        if arg == "--config" and args:
            rest += ["--config", _config_sections(args.pop(0))]
        elif arg.startswith("--config="):
            rest += ["--config", _config_sections(arg.split("=", 1)[1])]
        else:
            rest.append(arg)
    return build_parser().parse_args(rest)


# ---- rendering ------------------------------------------------------------------------------------------------
def trained_spans(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The conversation as ``(text, trained)`` runs: each run of trained (or untrained) positions, decoded."""
    pairs = zip(input_ids, labels)
    return [
        (
            tokenizer.decode([i for i, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False),
            trained,
        )
        for trained, run in ((t, list(r)) for t, r in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX))
    ]


def highlight(spans: list[tuple[str, bool]], style: str) -> str:
    """Joins spans with the trained ones marked: ``ansi`` colours, ``plain`` «markers» or ``html`` <mark>."""
    out = []
    for text, trained in spans:
        if style == "html":
            text = html.escape(text)
            out.append(f"<mark>{text}</mark>" if trained else text)
        elif style == "ansi":
            out.append(f"{ANSI_TRAINED}{text}{ANSI_RESET}" if trained else text)
        else:
            out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained else text)
    return "".join(out)


def _number(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, float) and not value.is_integer() else f"{int(value):,}"


def stats_rows(stats: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row of :data:`COLUMNS` per split, from :func:`capyft.data.split_stats`."""
    rows = []
    for name, s in stats.items():
        n = s["conversations"]
        lengths = [_number(s[k]) for k in ("min", "median", "p95", "max")] if n else ["-"] * 4
        lost = f"{s['lost_rows']} ({s['lost_tokens']:,} tokens)" if s["lost_rows"] else "0"
        rows.append([name, f"{n:,}", *lengths, str(s["truncated"]), lost, f"{s['trained_share']:.1%}"])
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]
    lines = [[c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))] for r in rows]
    header = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths))]
    return "\n".join("  ".join(line) for line in [header, *lines])


def build_report(data: Any, examples: int, split: str, on_bad_row: str = "error") -> dict[str, Any]:
    """What the preview shows, from a set-up :class:`~capyft.datamodule.ChatDataModule`; ``on_bad_row`` is the
    config's (the preview itself skips bad rows to list them all)."""
    hp = data.hparams
    if examples and split not in data.splits:
        raise checks.ConfigError(
            f"--split: no {split!r} conversations in this config (splits: {', '.join(data.splits) or 'none'})"
        )
    chosen = data.splits[split].select(range(min(examples, len(data.splits[split])))) if examples else []
    shown = []
    for row in chosen:
        full, kept = row["full_length"], len(row["input_ids"])
        shown.append(
            {
                "split": split,
                "row": row["row"],
                "tokens": kept,
                "trained": sum(label != IGNORE_INDEX for label in row["labels"]),
                "cut": full - kept,
                "lost": row["lost_trained"],
                "spans": trained_spans(data.tokenizer, row["input_ids"], row["labels"]),
            }
        )
    return {
        "source": hp.source,
        "tokenizer": hp.tokenizer_name_or_path,
        "max_length": hp.max_length,
        "train_on": hp.train_on,
        "on_bad_row": on_bad_row,
        "stats": data.stats,
        "bad_rows": {name: rows for name, rows in data.bad_rows.items() if rows},
        "examples": shown,
    }


def _bad_row_lines(report: dict[str, Any]) -> list[str]:
    bad = report["bad_rows"]
    if not bad:
        return []
    total = sum(len(rows) for rows in bad.values())
    action = "fit stops at them" if report["on_bad_row"] == "error" else "fit skips them"
    lines = [f"{total} bad row(s) (data.on_bad_row: {report['on_bad_row']}: {action}):"]
    lines += [f"  {name} row {row}: {error}" for name, rows in bad.items() for row, error in rows]
    return lines


def _example_title(example: dict[str, Any]) -> str:
    title = f"{example['split']} row {example['row']}: {example['tokens']:,} tokens, {example['trained']:,} trained"
    if example["cut"]:
        title += f"; max_length cut {example['cut']:,} more tokens ({example['lost']:,} of them trained)"
    return title


def format_text(report: dict[str, Any], style: str) -> str:
    """The preview as terminal text; ``style`` is ``ansi`` or ``plain`` (see :func:`highlight`)."""
    key = f"{ANSI_TRAINED}in colour{ANSI_RESET}" if style == "ansi" else f"between {MARK_OPEN} and {MARK_CLOSE}"
    lines = [
        f"data {report['source']} with the tokenizer of {report['tokenizer']} "
        f"(max_length {report['max_length']}, train_on {report['train_on']}; test prompts are never cut)",
        "",
        _table(stats_rows(report["stats"])),
    ]
    bad = _bad_row_lines(report)
    lines += ["", *bad] if bad else []
    if report["examples"]:
        lines += ["", f"trained tokens (assistant answers and their end-of-turn token) are shown {key}"]
    dim, reset = (ANSI_DIM, ANSI_RESET) if style == "ansi" else ("", "")
    for example in report["examples"]:
        lines += ["", f"{dim}--- {_example_title(example)} ---{reset}", highlight(example["spans"], style)]
    return "\n".join(lines).rstrip() + "\n"


def format_html(report: dict[str, Any]) -> str:
    """The preview as a standalone HTML page."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in stats_rows(report["stats"]))
    bad = _bad_row_lines(report)
    bad_html = f"<p>{esc(bad[0])}</p><ul>{''.join(f'<li>{esc(b.strip())}</li>' for b in bad[1:])}</ul>" if bad else ""
    examples = "".join(
        f"<h2>{esc(_example_title(e))}</h2><pre>{highlight(e['spans'], 'html')}</pre>" for e in report["examples"]
    )
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>capyft data preview</title><style>'
        "body{font-family:sans-serif;margin:2em}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}"
        "mark{background:#c8f0c8}td,th{padding:0 .8em;text-align:right}td:first-child{text-align:left}"
        "</style></head><body>\n"
        f"<h1>capyft data preview</h1><p>data {esc(str(report['source']))} with the tokenizer of "
        f"{esc(str(report['tokenizer']))} (max_length {report['max_length']}, train_on {esc(report['train_on'])}); "
        "trained tokens are <mark>highlighted</mark>.</p>\n"
        f"<table><tr>{head}</tr>{body}</table>\n{bad_html}\n{examples}\n</body></html>\n"
    )


# ---- the command ----------------------------------------------------------------------------------------------
def load_data(model: str, data_args: dict[str, Any]) -> Any:
    """A set-up :class:`~capyft.datamodule.ChatDataModule` that keeps bad rows aside (to list them) instead of
    stopping at the first; the same checks as ``fit`` run first."""
    from capyft.datamodule import ChatDataModule
    from capyft.modeling import load_tokenizer

    checks.check_model_path(model)
    checks.check_data_source(data_args["source"])
    checks.check_data_values(data_args)
    tokenizer = load_tokenizer(model)
    checks.check_max_length(data_args.get("max_length"), tokenizer, data_args.get("system_prompt"))
    data = ChatDataModule(tokenizer_name_or_path=model, **{**data_args, "on_bad_row": "skip"})
    data.tokenizer = tokenizer
    data.setup("fit")
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m capyft data``; returns the exit status (0, or 2 for a config or data error, named in one line)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        if cfg.model.model_name_or_path is None:
            raise checks.ConfigError(
                "model.model_name_or_path: not set; give --config with a model section or --model.model_name_or_path"
            )
        if cfg.examples < 0:
            raise checks.ConfigError(f"--examples: {cfg.examples} must be >= 0")
        if cfg.color not in ("auto", "always", "never"):
            raise checks.ConfigError(f"--color: {cfg.color!r} must be auto, always or never")
        if cfg.out:
            checks.check_writable(cfg.out, "--out")
        data = load_data(cfg.model.model_name_or_path, cfg.data.as_dict())
        report = build_report(data, cfg.examples, cfg.split, cfg.data.on_bad_row)
    except (argparse.ArgumentError, ValueError, FileNotFoundError) as err:
        if not isinstance(err, argparse.ArgumentError) and not raised_by_capyft(err):
            raise  # a library's own failure keeps its traceback
        message = " ".join(str(err).split())
        sys.stderr.write(one_line(message, "python -m capyft data"))
        return 2
    color = cfg.color == "always" or (cfg.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    sys.stdout.write(format_text(report, "ansi" if color else "plain"))
    if cfg.out:
        Path(cfg.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).expanduser().write_text(format_html(report), encoding="utf-8")
        sys.stdout.write(f"wrote {cfg.out}\n")
    return 0
