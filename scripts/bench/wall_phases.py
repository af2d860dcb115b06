"""Where a whole ``python -m capyft ...`` command spends its wall time: the main thread's stack, sampled.

    python scripts/bench/wall_phases.py [--every 0.05] [--dump stacks.txt] -- test --config ... --ckpt_path last

Runs the command in this process (as ``python -m capyft`` would) while a thread records the main thread's stack every
``--every`` seconds, then prints the seconds spent in each phase (importing, parsing the command line, loading the
model, generating, scoring, Lightning's teardown, ...) and where each phase began and ended. A phase is the first of
:data:`PHASES` whose frame appears in a sample's stack, so imports done while loading a model count as importing.
Sampling every 50 ms costs little (one stack walk per sample); the interpreter's exit after the command, which no
Python frame shows, is the difference between the whole command's time (measure it outside) and the last sample.
A lab tool for the user's path: it changes nothing in capyft.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# (phase, a substring of one "file.py:function" frame); the first match wins
PHASES = (
    ("import", "_find_and_load"),
    ("lightning teardown", "strategy.py:teardown"),
    ("generate", "generation.py:generate"),
    ("load scorer", "scorer.py:__init__"),
    ("score", "scorer.py:score"),
    ("restore checkpoint", "checkpoint_connector.py"),
    ("load model", "from_pretrained"),
    ("add LoRA", "get_peft_model"),
    ("configure model", "configure_model"),
    ("data", "datamodule.py"),
    ("parse command line", "parse_arguments"),
    ("instantiate classes", "instantiate_classes"),
    ("build trainer", "trainer.py:__init__"),
    ("other (capyft CLI)", "cli.py"),
)


def frames(frame: object) -> list[str]:
    """``file.py:function`` of every frame from the outermost to ``frame``."""
    out = []
    while frame is not None:
        code = frame.f_code  # type: ignore[attr-defined]
        out.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
        frame = frame.f_back  # type: ignore[attr-defined]
    return out[::-1]


def phase_of(stack: list[str]) -> str:
    joined = " > ".join(stack)
    return next((phase for phase, marker in PHASES if marker in joined), "other")


def summarize(samples: list[tuple[float, list[str]]]) -> list[tuple[str, float, float, float]]:
    """``(phase, seconds, first, last)`` by seconds: each sample stands for the time since the previous one."""
    seconds: Counter[str] = Counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    previous = 0.0
    for at, stack in samples:
        phase = phase_of(stack)
        seconds[phase] += at - previous
        first.setdefault(phase, at)
        last[phase] = at
        previous = at
    return [(phase, s, first[phase], last[phase]) for phase, s in seconds.most_common()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.05, help="seconds between samples (default 0.05)")
    parser.add_argument("--dump", type=Path, help="also write every sample's stack here, one line each")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then capyft's arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    samples: list[tuple[float, list[str]]] = []
    main_id, start, running = threading.main_thread().ident, time.perf_counter(), True

    def sample() -> None:
        while running:
            frame = sys._current_frames().get(main_id)
            samples.append((time.perf_counter() - start, frames(frame)))
            time.sleep(args.every)

    threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["capyft", *command]
    status = 0
    try:
        runpy.run_module("capyft", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        running = False
        total = time.perf_counter() - start
        print(f"[wall_phases] {total:.1f} s sampled, {len(samples)} samples every {args.every} s", file=sys.stderr)
        for phase, seconds, first, last in summarize(samples):
            print(f"[wall_phases] {seconds:7.2f} s  {phase:20s} [{first:.1f} .. {last:.1f}]", file=sys.stderr)
        if args.dump:
            args.dump.write_text("".join(f"{at:.2f} {' > '.join(stack)}\n" for at, stack in samples))
    return status


if __name__ == "__main__":
    sys.exit(main())
