"""The report: ``bench.json`` (everything) and ``bench.md`` (tables, targets met or not)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def ratios(stacks: dict[str, dict[str, Any]], name: str) -> dict[str, float | None]:
    """``name``'s speed over TRL defaults and over TRL's best setting, by mean and by median step.

    TRL's settings are the targets' (its gradient checkpointing on, as TRL ships it); the ``-no-ckpt`` rows are
    reported beside them, not counted here."""
    trl = {
        k: v
        for k, v in stacks.items()
        if k.startswith("trl-") and "#" not in k and "no-ckpt" not in k and v.get("real_tokens_per_s")
    }
    ours = stacks.get(name, {})
    out: dict[str, float | None] = {}
    for key in ("real_tokens_per_s", "real_tokens_per_s_median_step"):
        mine = ours.get(key)
        defaults = trl.get("trl-defaults", {}).get(key)
        best = max((v[key] for v in trl.values()), default=None)
        out[f"vs_trl_defaults_{key}"] = mine / defaults if mine and defaults else None
        out[f"vs_trl_best_{key}"] = mine / best if mine and best else None
    return out


SPEEDS = ("real_tokens_per_s", "real_tokens_per_s_median_step")


def repeated(stacks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stacks that ran more than once (``name``, ``name#2``, ...): per stack the runs' count, their speeds and the
    median of each speed over the runs."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for label, result in stacks.items():
        if result.get("real_tokens_per_s"):
            groups.setdefault(label.split("#")[0], []).append(result)
    out: dict[str, dict[str, Any]] = {}
    for name, runs in groups.items():
        if len(runs) > 1:
            out[name] = {"runs": len(runs)}
            for key in SPEEDS:
                values = [r[key] for r in runs]
                out[name] |= {key: float(statistics.median(values)), f"{key}_all": [round(v) for v in values]}
    return out


def markdown(report: dict[str, Any]) -> str:
    stacks = report["stacks"]
    lines = [
        f"command: `{report['command']}`",
        "",
        f"environment: {json.dumps(report['environment'])}",
        "",
        f"data: {json.dumps(report.get('data'))}",
        "",
        "| stack | status | steps | real tok/s (mean) | real tok/s (median step) | step s (median) | tokens/step | "
        "peak reserved GiB (training steps / validation included) | val answers s | first losses |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in stacks.items():
        if "gen_tokens_per_sec" in r or name.startswith("test"):
            continue
        lines.append(
            f"| {name} | {r.get('status', '-')} | {fmt(r.get('steps'))} | {fmt(r.get('real_tokens_per_s'))} | "
            f"{fmt(r.get('real_tokens_per_s_median_step'))} | {fmt(r.get('step_s_median'), 3)} | "
            f"{fmt(r.get('tokens_per_step'))} | {fmt(r.get('peak_reserved_gib'), 2)} / "
            f"{fmt(r.get('peak_reserved_gib_with_validation'), 2)} | {r.get('val_answer_seconds', '-')} | "
            f"{r.get('first_losses', '-')} |"
        )
    tests = {k: v for k, v in stacks.items() if k.startswith("test")}
    if tests:
        lines += ["", "| test hook | status | wall s | generated tok/s | BERTScore F1 (tuned / base) |"]
        lines += ["| --- | --- | ---: | ---: | --- |"]
        for name, r in tests.items():
            f1 = f"{fmt(r.get('bertscore_f1'), 4)} / {fmt(r.get('base_bertscore_f1'), 4)}"
            lines.append(
                f"| {name} | {r.get('status')} | {fmt(r.get('wall_s'), 1)} | "
                f"{fmt(r.get('gen_tokens_per_sec'))} | {f1} |"
            )
    lines += [
        "",
        "| capyft stack | x TRL defaults (mean) | x TRL defaults (median) | x TRL best (mean) | x TRL best (median) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in stacks:
        if name.startswith("capyft") and "#" not in name:
            r = ratios(stacks, name)
            lines.append(
                f"| {name} | {fmt(r['vs_trl_defaults_real_tokens_per_s'], 2)} | "
                f"{fmt(r['vs_trl_defaults_real_tokens_per_s_median_step'], 2)} | "
                f"{fmt(r['vs_trl_best_real_tokens_per_s'], 2)} | "
                f"{fmt(r['vs_trl_best_real_tokens_per_s_median_step'], 2)} |"
            )
    medians = repeated(stacks)
    if medians:
        lines += [
            "",
            "Stacks run more than once: median over the runs (each run's figure in brackets), and ratios of medians",
            "",
            "| stack | runs | real tok/s mean | real tok/s median step | x TRL defaults (mean, median) | "
            "x TRL best (mean, median) |",
            "| --- | ---: | --- | --- | --- | --- |",
        ]
        for name, r in medians.items():
            q = ratios(medians, name) if name.startswith("capyft") else {}
            lines.append(
                f"| {name} | {r['runs']} | {fmt(r[SPEEDS[0]])} {r[SPEEDS[0] + '_all']} | "
                f"{fmt(r[SPEEDS[1]])} {r[SPEEDS[1] + '_all']} | "
                f"{fmt(q.get('vs_trl_defaults_' + SPEEDS[0]), 2)}, {fmt(q.get('vs_trl_defaults_' + SPEEDS[1]), 2)} | "
                f"{fmt(q.get('vs_trl_best_' + SPEEDS[0]), 2)}, {fmt(q.get('vs_trl_best_' + SPEEDS[1]), 2)} |"
            )
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(markdown(report))
