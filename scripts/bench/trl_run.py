"""TRL 1.16 ``SFTTrainer`` on the same jsonl and checkpoint as capyft (run as its own process per setting).

    python scripts/bench/trl_run.py --checkpoint DIR --data FILE --train-size 120 --setting defaults --out R.json

Settings: ``defaults`` (pad to the longest in the batch), ``padfree_liger`` (``padding_free`` + ``use_liger_kernel``,
``max_length=None``, which TRL requires without packing), ``packing_liger`` (``packing`` + ``use_liger_kernel``), and
``defaults_no_ckpt`` / ``packing_liger_no_ckpt``: the same with TRL's gradient checkpointing off.
Everything else is the reference recipe: nf4 + double quant, bf16 compute, LoRA r16 / alpha 32 / dropout 0.05 on
all linear layers, paged AdamW 8-bit, lr 2e-4, TRL's default gradient checkpointing, one epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import bnb_config  # noqa: E402

SETTINGS = {
    "defaults": {},
    "padfree_liger": {"padding_free": True, "use_liger_kernel": True, "max_length": None},
    "packing_liger": {"packing": True, "use_liger_kernel": True},
    "defaults_no_ckpt": {"gradient_checkpointing": False},
    "packing_liger_no_ckpt": {"packing": True, "use_liger_kernel": True, "gradient_checkpointing": False},
}


def run(checkpoint: str, data: str, train_size: int, setting: str, batch: int, first: int = 3) -> dict[str, Any]:
    """Trains one epoch and returns real (non-pad) tokens/s over whole steps ``first``..end and peak memory."""
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    dataset = load_dataset("json", data_files=data, split="train").select(range(train_size))
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=bnb_config(dtype), dtype=dtype, device_map={"": 0 if cuda else "cpu"}
    )
    values = {
        "output_dir": tempfile.mkdtemp(prefix="trl-"),
        "per_device_train_batch_size": batch,
        "num_train_epochs": 1,
        "max_length": 2048,
        "learning_rate": 2e-4,
        "optim": "paged_adamw_8bit" if cuda else "adamw_torch",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 1,
        "seed": 42,
        **SETTINGS[setting],
    }
    if not cuda:
        values.update(bf16=False, use_cpu=True, use_liger_kernel=False)
    args = trl.SFTConfig(**values)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    ends: list[float] = []
    fed: list[int] = []  # real tokens per micro-batch, in the order the collator made them

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[StepClock()],
    )
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate(examples)
        mask = out.get("attention_mask")
        fed.append(int(mask.sum()) if mask is not None else int(out["input_ids"].numel()))
        return out

    trainer.data_collator = counting
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    accumulate = args.gradient_accumulation_steps
    tokens = [sum(fed[i * accumulate : (i + 1) * accumulate]) for i in range(len(ends))]
    times = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    window = slice(first - 1, None)
    result: dict[str, Any] = {
        "stack": f"trl-{setting}",
        "trl": trl.__version__,
        "batch_size": batch,
        "settings": {
            k: getattr(args, k, None)
            for k in ("padding_free", "packing", "use_liger_kernel", "max_length", "gradient_checkpointing", "bf16")
        },
        "steps": len(ends),
        "first_losses": [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h][:3],
    }
    if len(ends) >= first:
        rates = [t / s for t, s in zip(tokens[window], times[window])]
        result |= {
            "steps_measured": len(rates),
            "tokens_per_step": statistics.mean(tokens[window]),
            "step_s_median": statistics.median(times[window]),
            "real_tokens_per_s": sum(tokens[window]) / sum(times[window]),
            "real_tokens_per_s_median_step": statistics.median(rates),
        }
    if cuda:
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--train-size", type=int, required=True)
    parser.add_argument("--setting", choices=list(SETTINGS), default="defaults")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = run(args.checkpoint, args.data, args.train_size, args.setting, args.batch)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
