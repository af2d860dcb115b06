"""Lab figures for the test hook's generation: where a batch of answers spends its time, in one process.

Not the user's path (that is ``bench_gpu.py --test``, the CLI on an on-disk checkpoint): this loads the model once
and times ``capyft.generation`` against transformers' own ``generate`` on the same prompts, to tell the prefill from
the decode steps and one lever from another. The variants: the decode loop (transformers' ``generate`` over
capyft's prefilled cache, as before; capyft's greedy loop over a fixed-shape cache with each step launched from
Python; the same loop replaying one captured CUDA graph a step, today's path) and both models one after the other
(``compare_base``). The earlier factors (transformers' one-pass prefill, its decode attention) are in the figures of
2026-11-29's first calls.

    python scripts/bench/generation_lab.py --checkpoint DIR --data conversations.jsonl --out lab.json

Prompts: the last ``--prompts`` conversations of the file, without their last assistant turn, longest first, one
batch. A random LoRA adapter (B ~ N(0, 0.01)) on every linear layer, as a trained one would be. Each variant runs
with 1 and with ``--new`` new tokens (greedy, no stop token): the difference over ``--new - 1`` is the decode step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new", type=int, default=30)
    parser.add_argument("--device", default="cuda", help="cpu: a check that the script runs (4-bit off)")
    parser.add_argument(
        "--profile", action="store_true", help="instead of the variants: profile today's path (prefill + --new tokens)"
    )
    args = parser.parse_args()

    from capyft import generation
    from capyft.attention import PACKED_SDPA
    from capyft.chat import encode_prompt, split_prompt_reference
    from capyft.datamodule import PromptCollator
    from capyft.modeling import (
        build_lora_config,
        build_quantization_config,
        load_base_model,
        load_tokenizer,
        wrap_with_lora,
    )

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.checkpoint)
    cuda = args.device == "cuda"
    quantization = build_quantization_config(cuda, "nf4", True, "float16")
    model = load_base_model(args.checkpoint, quantization, "float16" if cuda else "float32", PACKED_SDPA, args.device)
    model = wrap_with_lora(model, build_lora_config(r=16, alpha=32, target_modules="all-linear"), True).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    result: dict = {"load_s": round(time.perf_counter() - start, 1), "variants": {}}

    rows = [json.loads(line)["messages"] for line in Path(args.data).read_text().splitlines()][-args.prompts :]
    encoded = [encode_prompt(split_prompt_reference(m)[0], tokenizer, None) for m in rows]
    encoded.sort(key=len, reverse=True)
    batch = PromptCollator(tokenizer.pad_token_id)(
        [{"input_ids": ids, "row": i, "prompt": "", "reference": ""} for i, ids in enumerate(encoded)]
    )
    ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)
    lengths = [len(e) for e in encoded]
    result["prompts"] = {"count": len(lengths), "tokens": sum(lengths), "longest": max(lengths), "padded": ids.numel()}
    print(json.dumps(result), flush=True)

    def run(label: str, new: int, loop: str, both: bool) -> dict:
        """``loop``: "generate" (transformers' loop over the prefilled cache), "eager" or "graph" (decode_greedy)."""
        settings = generation.GenerationSettings(max_new_tokens=new, cuda_graph=loop == "graph")
        applies = generation._greedy_loop_applies
        if loop == "generate":  # a lab switch: the user's path has no option for it
            generation._greedy_loop_applies = lambda *_: False
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
        begin = time.perf_counter()
        try:
            if both:
                batch_cuda = batch | {"input_ids": ids, "attention_mask": mask}
                generation.answer_batch(model, tokenizer, batch_cuda, settings, compare_base=True)
            else:
                generation.generate(model, tokenizer, ids, mask, settings, [-1])
        finally:
            generation._greedy_loop_applies = applies
        if cuda:
            torch.cuda.synchronize()
        out = {
            "s": round(time.perf_counter() - begin, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries if cuda else None,
        }
        print(label, new, json.dumps(out), flush=True)
        if cuda:
            torch.cuda.empty_cache()
        return out

    if args.profile:
        result["profile"] = profile(lambda: run("now", args.new, "graph", False), cuda)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1), flush=True)
        return
    variants = {
        "transformers' generate over the prefilled cache (before)": ("generate", False),
        "greedy loop, fixed cache, eager steps": ("eager", False),
        "greedy loop, fixed cache, CUDA graph (now)": ("graph", False),
        "now, tuned then base (compare_base)": ("graph", True),
    }
    for label, (loop, both) in variants.items():
        with contextlib.suppress(torch.cuda.OutOfMemoryError):
            one = run(label, 1, loop, both)
            many = run(label, args.new, loop, both)
            step = (many["s"] - one["s"]) / (args.new - 1)
            result["variants"][label] = {
                "first_token_s": one["s"],
                f"{args.new}_tokens_s": many["s"],
                "decode_step_s": round(step, 4),
                "estimated_100_tokens_s": round(one["s"] + 99 * step, 1),
                "peak_reserved_gib": many["peak_reserved_gib"],
                "alloc_retries": many["alloc_retries"],
            }
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)


def profile(work, cuda: bool) -> dict:
    """Runs ``work`` once to warm up, then under torch's profiler: wall time, the GPU's kernel time and the
    operators and kernels that take the most time (host and GPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    work()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    begin = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        work()
    wall = time.perf_counter() - begin
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    by_device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    return {
        "wall_s": round(wall, 3),
        "gpu_kernel_s": round(device_us / 1e6, 3),
        "host_ops_by_self_cpu_ms": {e.key[:90]: [round(e.self_cpu_time_total / 1e3, 1), e.count] for e in by_host},
        "by_self_device_ms": {e.key[:90]: [round(e.self_device_time_total / 1e3, 1), e.count] for e in by_device},
    }


if __name__ == "__main__":
    main()
