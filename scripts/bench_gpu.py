"""GPU benchmark on the user's path: ``python -m capyft fit|test`` against TRL 1.16, same data and checkpoint.

    python scripts/bench_gpu.py --out DIR                          # the default stacks, ~8 min on one H200
    python scripts/bench_gpu.py --out DIR --only capyft,trl-defaults --test
    python scripts/bench_gpu.py --out DIR --only capyft,trl-defaults --repeat 3   # medians over 3 interleaved runs
    python scripts/bench_gpu.py --out DIR --tiny                   # every code path on a tiny model, CPU (~3 min)

Writes a random-weight Llama-3.1-8B checkpoint (real config, bf16, the offline Llama-3 tokenizer with capyft's
template) and a ``messages`` jsonl of synthetic conversations with Capybara-like lengths, then runs each stack in
its own process: capyft through its CLI with the reference config and path overrides (plus the stack's own
overrides, listed in ``CAPYFT``), read back from the run's TensorBoard; TRL through ``bench/trl_run.py``. Reports
real (non-pad) tokens/s over whole optimizer steps from step 3 on, by mean and by median step, and peak reserved
memory, into ``DIR/bench.json`` and ``DIR/bench.md``. capyft's modules are used as installed, never patched.
Needs trl, liger-kernel, bitsandbytes and datasets besides capyft's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import common, report, user_path  # noqa: E402

CHECKPOINTED = "--model.gradient_checkpointing=true"
# capyft stacks: overrides on top of the reference config (none: the config as shipped)
CAPYFT = {
    "capyft": [],
    "capyft-fused-lora": ["--model.fused_lora=true"],  # capyft.fused_lora instead of peft's own LoRA forward
    "capyft-no-liger": ["--model.liger_kernels=false"],
    # the shipped config with torch.profiler around steps 5-6 (bench/step_profiler.py): kernel time, launches, ops
    "capyft-profile": ["--trainer.callbacks+=bench.step_profiler.StepProfiler"],
    "capyft-compile": ["--model.compile_layers=true"],
    # recomputation forced on: what gradient_checkpointing auto picks where the micro-batch does not fit without it
    "capyft-ckpt": ["--model.gradient_checkpointing=true"],
    # the caching allocator growing segments in place instead of caching fixed blocks (less memory held unused)
    "capyft-expandable": [],
    "capyft-8gb": [],  # the reference config as shipped, under CAPYFT_ENV's cap
    # packed attention one SDPA call per conversation instead of one varlen flash call per layer
    "capyft-loop": ["--model.attn_implementation=sdpa_packed_loop"],
    "capyft-bf16-compile": [
        "--model.compile_layers=true",
        "--trainer.precision=bf16-mixed",
        "--model.compute_dtype=bfloat16",
    ],
    # an 8 GB card's splits, as the reference config runs there (compile_layers auto is off below 16 GiB, and
    # gradient_checkpointing auto on: 2048 tokens need ~20 GiB of activations without it)
    "capyft-mem2048": ["--data.micro_batch_tokens=2048", "--model.compile_layers=false", CHECKPOINTED],  # 1 x 4
    "capyft-mem4096": ["--data.micro_batch_tokens=4096", "--model.compile_layers=false", CHECKPOINTED],  # 2 x 2
    "capyft-eager": ["--model.compile_layers=false"],  # the reference config without regional compile
    "capyft-no-offload": ["--model.offload_embeddings=false"],
    "capyft-no-chunk": ["--model.loss_chunk_size=0"],
}
# environment of a capyft stack's command, besides the offline settings
CAPYFT_ENV = {
    "capyft-expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    # the H200 standing in for an 8 GB card (~7.6 GiB a process can use, less the CUDA context): every auto sizes
    # from 7.2 GiB and the allocator refuses more; the test hook (--test) runs under the same cap
    "capyft-8gb": {"CAPYFT_GPU_MEMORY_GIB": "7.2"},
}
TRL = {
    "trl-defaults": ("defaults", 4),
    "trl-padfree_liger": ("padfree_liger", 4),
    "trl-packing_liger": ("packing_liger", 2),
    # TRL's own gradient checkpointing off (its default is on), for the lever's share in capyft's ratio
    "trl-defaults-no-ckpt": ("defaults_no_ckpt", 4),
    "trl-packing_liger-no-ckpt": ("packing_liger_no_ckpt", 2),
}
TINY_CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--model.optimizer=adamw",
    "--model.compute_dtype=float32",
    "--data.eval_batch_size=4",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="capyft,capyft-eager,trl-defaults,trl-padfree_liger,trl-packing_liger")
    parser.add_argument("--test", action="store_true", help="time the test hook on the first capyft stack's run")
    parser.add_argument("--test-args", default="", help="extra overrides for the test hook, space-separated")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: checks every code path")
    parser.add_argument("--tokenizer", help="Llama-3 tokenizer dir (default: capyft.assets.llama3_tokenizer_dir())")
    parser.add_argument("--work", default="/tmp/capyft-bench", help="checkpoint and data (reused when present)")
    parser.add_argument("--train-size", type=int, default=120)
    parser.add_argument("--stack-timeout", type=float, default=420)
    parser.add_argument("--repeat", type=int, default=1, help="run the --only list this many times, interleaved")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] * max(args.repeat, 1)
    unknown = [n for n in names if n not in CAPYFT and n not in TRL]
    if unknown:
        raise SystemExit(f"unknown stacks {unknown}; choose from {', '.join([*CAPYFT, *TRL])}")
    state = {"command": "python " + " ".join(sys.argv), "environment": common.environment(), "stacks": {}}
    print(json.dumps(state["environment"]), flush=True)
    checkpoint, data = prepare(work, args, state)
    extra = TINY_CPU if args.tiny else []
    seen: dict[str, int] = {}
    for name in names:  # a stack named again (a repeat) runs again as <name>#2, <name>#3, ...
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        print(f"=== {label}", flush=True)
        if name in CAPYFT:
            result = user_path.fit(
                label,
                checkpoint,
                data,
                out,
                args.train_size,
                extra + CAPYFT[name],
                args.stack_timeout,
                env=CAPYFT_ENV.get(name),
            )
        else:
            setting, batch = TRL[name]
            result = run_trl(label, setting, batch, checkpoint, data, out, args)
        state["stacks"][label] = result
        print(json.dumps({k: v for k, v in result.items() if k != "command"}), flush=True)
        report.write(state, out)
    first = next(((n, r) for n, r in state["stacks"].items() if n in CAPYFT and r.get("run_dir")), None)
    if args.test and first:
        print("=== test hook", flush=True)
        name, run = first
        result = user_path.test(
            "test-hook", Path(run["run_dir"]), out, args.test_args.split(), args.stack_timeout, CAPYFT_ENV.get(name)
        )
        state["stacks"]["test-hook"] = result
        print(json.dumps(result), flush=True)
    report.write(state, out)
    print(report.markdown(state), flush=True)


def prepare(work: Path, args: argparse.Namespace, state: dict) -> tuple[Path, Path]:
    """The checkpoint and the jsonl: train + 20 val + 200 test conversations, as the reference config carves."""
    from bench.data import write_messages
    from bench.model import write_checkpoint
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from capyft.assets import llama3_tokenizer_dir

        args.tokenizer = str(llama3_tokenizer_dir())
    checkpoint = work / ("tiny" if args.tiny else "llama31-8b-random")
    if not (checkpoint / "config.json").exists():
        state["checkpoint"] = write_checkpoint(checkpoint, Path(args.tokenizer), tiny=args.tiny)
    data = work / "conversations.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    start = time.perf_counter()
    state["data"] = write_messages(
        data, args.train_size + 20 + 200, tokenizer, median=80 if args.tiny else 900, high=256 if args.tiny else 2048
    )
    state["data"]["write_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(state.get("checkpoint")), json.dumps(state["data"]), flush=True)
    return checkpoint, data


def run_trl(name: str, setting: str, batch: int, checkpoint: Path, data: Path, out: Path, args) -> dict:
    result_file = out / f"{name}.json"
    command = [
        common.python(),
        str(Path(__file__).parent / "bench" / "trl_run.py"),
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--train-size",
        str(args.train_size),
        "--setting",
        setting,
        "--batch",
        str(batch),
        "--out",
        str(result_file),
    ]
    status = common.run_logged(command, out / f"{name}.log", args.stack_timeout)
    result = json.loads(result_file.read_text()) if result_file.exists() else {"stack": name}
    return result | status


if __name__ == "__main__":
    main()
