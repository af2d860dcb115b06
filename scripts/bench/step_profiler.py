"""A Lightning callback that profiles a few whole optimizer steps of a real ``python -m capyft fit`` run.

    python -m capyft fit --config ... --trainer.callbacks+=bench.step_profiler.StepProfiler   (scripts/ on PYTHONPATH)

It observes only (torch.profiler around steps ``BENCH_PROFILE_START`` .. ``+BENCH_PROFILE_STEPS``, default 5 and 2)
and writes into ``$BENCH_PROFILE_DIR`` (default ``profile``): ``summary.json`` (wall time, summed kernel time,
kernel launches, kernel time by category) and ``ops.txt`` (operators by self CPU time and by CUDA time). The
profiled steps run slower than unprofiled ones: their step times are not throughput figures.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch

CATEGORIES = {  # substring of a kernel name -> category (first match wins)
    "Dequantize": "bitsandbytes dequantize",
    "gemm_4bit": "bitsandbytes 4-bit gemm",
    "flash": "attention",
    "fmha": "attention",
    "sdpa": "attention",
    "Optimizer": "optimizer",
    "optimizer": "optimizer",
    "gemm": "matmul",
    "nvjet": "matmul",
    "sm90_xmma": "matmul",
    "triton": "triton (liger)",
    "_kernel": "triton (liger)",
    "dropout": "dropout",
    "copy": "copies / casts",
    "Memcpy": "copies / casts",
}


class StepProfiler(L.Callback):
    def __init__(self) -> None:
        self.start = int(os.environ.get("BENCH_PROFILE_START", 5))
        self.steps = int(os.environ.get("BENCH_PROFILE_STEPS", 2))
        self.out = Path(os.environ.get("BENCH_PROFILE_DIR", "profile"))
        self.profiler: Any = None
        self.began = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.profiler is None and trainer.global_step == self.start:  # the first micro-batch of step start + 1
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.began = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.profiler is None or trainer.global_step < self.start + self.steps:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.began
        self.profiler.__exit__(None, None, None)
        self.write(wall)
        self.profiler, self.start = None, 1 << 62  # once per run

    def write(self, wall: float) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        events = self.profiler.events()
        kernels = [  # GPU-side kernels and copies; user annotations (e.g. "Optimizer.step#...") span, not run
            e
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and "#" not in e.name
        ]
        by_category: Counter[str] = Counter()
        for e in kernels:
            name = e.name
            category = next((c for k, c in CATEGORIES.items() if k in name), "other elementwise / reductions")
            by_category[category] += e.device_time_total / 1e6  # the profiler's times are in microseconds
        averages = self.profiler.key_averages()
        summary = {
            "steps": self.steps,
            "wall_s": wall,
            "kernel_s": sum(e.device_time_total for e in kernels) / 1e6,
            "kernel_launches": len(kernels),
            "cpu_ops": sum(a.count for a in averages if a.key.startswith("aten::")),
            "kernel_s_by_category": {k: round(v, 4) for k, v in by_category.most_common()},
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        tables = [
            averages.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70),
            averages.table(sort_by="device_time_total", row_limit=30, max_name_column_width=70),
        ]
        (self.out / "ops.txt").write_text("\n\n".join(tables))
