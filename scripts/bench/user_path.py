"""capyft on the user's path: ``python -m capyft fit|test`` in a subprocess, read back from the run's TensorBoard."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.common import REPO, python, run_logged

CONFIG = REPO / "configs" / "llama31-8b-capybara.yaml"


def fit(
    name: str,
    checkpoint: Path,
    data: Path,
    out: Path,
    train_size: int,
    extra: list[str],
    timeout: float,
    config: Path = CONFIG,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs ``python -m capyft fit --config <reference>`` with path overrides (plus ``extra``) and summarizes it.

    ``--data.train_size`` is set to the rows written for training (the reference's 500 exceed a short benchmark);
    ``env`` adds to the command's environment.
    """
    save_dir = out / "runs" / name
    command = [
        python(),
        "-m",
        "capyft",
        "fit",
        "--config",
        str(config),
        f"--model.model_name_or_path={checkpoint}",
        f"--data.source={data}",
        f"--data.train_size={train_size}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    result: dict[str, Any] = {"stack": name, "command": " ".join(command[1:])}
    profile = {"BENCH_PROFILE_DIR": str(out / f"{name}-profile")}  # read by bench.step_profiler.StepProfiler, if on
    result |= run_logged(command, out / f"{name}.log", timeout, env=profile | (env or {}))
    runs = sorted(save_dir.glob("*/version_*"))
    if runs:
        result["run_dir"] = str(runs[-1])
        result |= summarize_run(runs[-1])
    return result


def test(
    name: str, run_dir: Path, out: Path, extra: list[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Times ``python -m capyft test --config <run>/config.yaml --ckpt_path last --model.compare_base true``
    (``env`` adds to its environment)."""
    command = [
        python(),
        "-m",
        "capyft",
        "test",
        "--config",
        str(run_dir / "config.yaml"),
        "--ckpt_path",
        "last",
        "--model.compare_base",
        "true",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    result: dict[str, Any] = {"stack": name, "command": " ".join(command[1:])}
    result |= run_logged(command, out / f"{name}.log", timeout, env=env)
    tests = sorted(run_dir.parent.glob("version_*"))
    for run in reversed(tests):  # the test run logs into a new version dir
        values = scalar_events(run)
        rate = values.get("test/gen_tokens_per_sec")
        if rate:
            result["gen_tokens_per_sec"] = rate[-1][2]
            result["gen_seconds"] = values.get("test/gen_seconds", [[0, 0, None]])[-1][2]
            result["bertscore_f1"] = values.get("test/bertscore_f1", [[0, 0, None]])[-1][2]
            result["base_bertscore_f1"] = values.get("test/base_bertscore_f1", [[0, 0, None]])[-1][2]
            break
    return result


def scalar_events(run: Path) -> dict[str, list[tuple[float, int, float]]]:
    """``{tag: [(wall_time, step, value), ...]}`` over every event file of a TensorBoard run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[tuple[float, int, float]]] = {}
    for events in sorted(Path(run).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars(tag))
    return values


def summarize_run(run: Path, first: int = 3) -> dict[str, Any]:
    """Real tokens/s over whole optimizer steps ``first``..end, from the step records capyft logs.

    A step's time is the wall time between its ``train/loss`` record and the previous step's (data loading,
    optimizer, logging, validation and checkpoints included); its real tokens are ``train/input_tokens``.
    """
    values = scalar_events(run)
    losses, inputs = values.get("train/loss", []), values.get("train/input_tokens", [])
    out: dict[str, Any] = {"steps": len(losses)}
    if not losses:
        return out
    out["first_losses"] = [round(v, 5) for _, _, v in losses[:3]]
    out["last_loss"] = losses[-1][2]
    norms = [v for _, _, v in values.get("train/grad_norm", [])]
    out["nonfinite_grad_norm_steps"] = [i + 1 for i, v in enumerate(norms) if not math.isfinite(v)]
    if "train/scaler_skips" in values:
        out["scaler_skips"] = values["train/scaler_skips"][-1][2]
    peaks = values.get("train/peak_reserved_gib", [])
    out["peak_reserved_gib"] = max((v for _, _, v in peaks), default=None)
    # the run's peak as read after each validation (its batches and answers included)
    val_peaks = values.get("val/peak_reserved_gib", [])
    out["peak_reserved_gib_with_validation"] = max((v for _, _, v in [*peaks, *val_peaks]), default=None)
    answers = [v for _, _, v in values.get("val/answer_seconds", [])]
    out["validations"] = len(values.get("val/loss", []))
    out["val_answer_seconds"] = [round(v, 2) for v in answers]
    if len(losses) > 1:
        out["train_span_s"] = losses[-1][0] - losses[0][0]  # first to last step record (validations inside it)
    allocated = values.get("train/peak_mem_gib", [])
    out["peak_allocated_gib"] = max((v for _, _, v in allocated), default=None)
    if len(inputs) == len(losses) and len(losses) > first:
        times = [losses[i][0] - losses[i - 1][0] for i in range(first - 1, len(losses))]
        tokens = [inputs[i][2] for i in range(first - 1, len(losses))]
        rates = [t / max(s, 1e-9) for t, s in zip(tokens, times)]
        out |= {
            "steps_measured": len(times),
            "tokens_per_step": sum(tokens) / len(tokens),
            "step_s_median": statistics.median(times),
            "real_tokens_per_s": sum(tokens) / sum(times),
            "real_tokens_per_s_median_step": statistics.median(rates),
        }
    return out
