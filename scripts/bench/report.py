"""The report: ``bench.json`` (everything) and ``bench.md`` (tables, targets met or not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def ratios(stacks: dict[str, dict[str, Any]], name: str) -> dict[str, float | None]:
    """``name``'s speed over TRL defaults and over TRL's best setting, by mean and by median step."""
    trl = {k: v for k, v in stacks.items() if k.startswith("trl-") and v.get("real_tokens_per_s")}
    ours = stacks.get(name, {})
    out: dict[str, float | None] = {}
    for key in ("real_tokens_per_s", "real_tokens_per_s_median_step"):
        mine = ours.get(key)
        defaults = trl.get("trl-defaults", {}).get(key)
        best = max((v[key] for v in trl.values()), default=None)
        out[f"vs_trl_defaults_{key}"] = mine / defaults if mine and defaults else None
        out[f"vs_trl_best_{key}"] = mine / best if mine and best else None
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
        if name.startswith("capyft"):
            r = ratios(stacks, name)
            lines.append(
                f"| {name} | {fmt(r['vs_trl_defaults_real_tokens_per_s'], 2)} | "
                f"{fmt(r['vs_trl_defaults_real_tokens_per_s_median_step'], 2)} | "
                f"{fmt(r['vs_trl_best_real_tokens_per_s'], 2)} | "
                f"{fmt(r['vs_trl_best_real_tokens_per_s_median_step'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(markdown(report))
