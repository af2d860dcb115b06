"""Generation and BERTScore for the test stage: answer each test prompt, score it against its reference.

Pure functions over a Hugging Face model, tokenizer and ``bert_score.BERTScorer``; no Lightning. ``QLoRAModule``'s
test hooks call them in a few lines.

Scores come from the ``bert-score`` library itself, not torchmetrics' ``BERTScore``, which pairs candidates with the
wrong references when their lengths differ (torchmetrics issue #2728).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SCORES = ("precision", "recall", "f1")


@dataclass(frozen=True)
class GenerationSettings:
    """How the test prompts are answered (``--model.generation.*``).

    Args:
        max_new_tokens: most tokens generated per answer (the reference used 100).
        do_sample: False: greedy, deterministic (default); True: sample with ``temperature``, ``top_p``, ``top_k``.
        temperature: softmax temperature when sampling (the reference sampled with 0.6).
        top_p: nucleus sampling mass when sampling (the reference used 0.9).
        top_k: keep the k likeliest tokens when sampling; 0 keeps all (50 is transformers' default, which the
            reference ran with).
        repetition_penalty: 1.0 is none; set explicitly so a model's own generation config cannot change it.
        seed: seed of sampling; each batch is seeded with ``seed`` + its first row id, so an answer does not depend
            on which batches ran before it.
    """

    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class BERTScoreSettings:
    """How predictions are scored against references (``--model.bertscore.*``), passed to ``bert_score.BERTScorer``.

    Args:
        model_type: encoder: a hub id (default ``roberta-large``, bert-score's choice for English) or a local HF dir.
        num_layers: which layer's embeddings to compare (17 for roberta-large, bert-score's tuned default); required
            for a local dir (all-MiniLM-L6-v2: 6). None: bert-score's table for known hub ids.
        idf: weight tokens by inverse document frequency over the references.
        batch_size: sentences per encoder batch.
        rescale_with_baseline: also report scores rescaled with a baseline (``*_rescaled``), which spreads them
            out over roughly [0, 1]; raw scores are always reported.
        baseline_path: baseline file; required for a local encoder (bert-score ships baselines for hub ids only).
        lang: language of the texts; picks the shipped baseline.
    """

    model_type: str = "roberta-large"
    num_layers: int | None = 17
    idf: bool = False
    batch_size: int = 64
    rescale_with_baseline: bool = False
    baseline_path: str | None = None
    lang: str = "en"


@dataclass
class Generated:
    """One answer: its text (new tokens only, special tokens skipped), how many tokens were generated (the stop
    token included) and whether it ended at an end-of-turn / eos token rather than at ``max_new_tokens``."""

    text: str
    num_tokens: int
    stopped: bool


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    stop_ids: list[int],
    seed: int = 0,
) -> list[Generated]:
    """Answers a batch of left-padded prompts with the KV cache; one :class:`Generated` per row, in row order.

    The model runs in eval mode (training-mode gradient checkpointing would turn the cache off) with
    ``use_cache=True``, which training configs switch off in ``model.config``. Each answer is cut at its first
    ``stop_ids`` token, so only new tokens up to the end of the turn are decoded.

    Args:
        model: a causal LM (PEFT-wrapped or not).
        tokenizer: its tokenizer.
        input_ids: ``(batch, length)`` prompts, padded on the left.
        attention_mask: 1 on prompt tokens, 0 on padding.
        settings: decoding settings.
        stop_ids: end-of-turn and eos ids (:func:`capyft.chat.end_of_turn_ids`).
        seed: seeds sampling (ignored when greedy); the global RNG state is restored afterwards.

    Raises:
        ValueError: the prompts are padded on the right, or ``max_new_tokens`` is not positive.
    """
    if settings.max_new_tokens < 1:
        raise ValueError(f"generation.max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be padded on the left for batched generation (attention_mask ends in 0)")
    sampling = {}
    if settings.do_sample:
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    was_training = model.training
    model.eval()
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                repetition_penalty=settings.repetition_penalty,
                eos_token_id=list(stop_ids),
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                **sampling,
            )
    finally:
        model.train(was_training)
    return [cut_at_stop(tokenizer, row, stop_ids) for row in output[:, input_ids.shape[1] :].tolist()]


def cut_at_stop(tokenizer: Any, ids: list[int], stop_ids: list[int]) -> Generated:
    """Decodes generated ``ids`` up to the first stop token (special tokens dropped, stripped).

    ``num_tokens`` counts the stop token when there is one; ``stopped`` says whether the answer ended at end-of-turn
    rather than at ``max_new_tokens``.
    """
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(ids) if token in stops), None)
    kept = ids if end is None else ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Generated(text, len(ids) if end is None else end + 1, end is not None)


def load_scorer(settings: BERTScoreSettings, device: torch.device | str = "cpu") -> Any:
    """Builds a ``bert_score.BERTScorer`` (loads the encoder once); rescaling is applied by :func:`score`.

    Raises:
        ValueError: ``num_layers`` is missing for a local encoder or exceeds its depth, or rescaling is asked for
            with no baseline file to read.
    """
    from bert_score import BERTScorer

    local = Path(settings.model_type).is_dir()
    if settings.num_layers is None and local:
        raise ValueError(
            f"bertscore.model_type {settings.model_type!r} is a local dir: set bertscore.num_layers "
            "(all-MiniLM-L6-v2: 6, roberta-large: 17)"
        )
    if local and settings.num_layers is not None:
        from transformers import AutoConfig

        depth = AutoConfig.from_pretrained(settings.model_type).num_hidden_layers
        if not 1 <= settings.num_layers <= depth:
            raise ValueError(
                f"bertscore.num_layers={settings.num_layers}, but {settings.model_type} has {depth} layers"
            )
    scorer = BERTScorer(
        model_type=settings.model_type,
        num_layers=settings.num_layers,
        batch_size=settings.batch_size,
        idf=settings.idf,
        device=str(device),
        lang=settings.lang,
        baseline_path=settings.baseline_path,
    )
    if settings.rescale_with_baseline and not Path(scorer.baseline_path).is_file():
        raise ValueError(
            f"bert-score has no rescale baseline for {settings.model_type} ({scorer.baseline_path} is missing): set "
            "bertscore.baseline_path to a baseline file, or bertscore.rescale_with_baseline: false"
        )
    return scorer


def score_hash(scorer: Any, settings: BERTScoreSettings) -> str:
    """bert-score's string naming the encoder, layer, idf and rescaling, to report next to the scores."""
    from bert_score.utils import get_hash

    return get_hash(
        scorer.model_type,
        scorer.num_layers,
        settings.idf,
        settings.rescale_with_baseline,
        settings.baseline_path is not None,
        scorer.use_fast_tokenizer,
    )


def score(
    scorer: Any, settings: BERTScoreSettings, candidates: list[str], references: list[str]
) -> dict[str, list[float]]:
    """Per-pair BERTScore of ``candidates[i]`` against ``references[i]``, in the given order.

    Returns:
        ``precision``, ``recall`` and ``f1`` lists, plus ``*_rescaled`` ones when ``rescale_with_baseline`` is on.
        With ``idf``, weights come from ``references`` (as ``bert_score.score`` does).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if settings.idf:
        scorer._idf_dict = None  # recomputed for these references, without bert-score's overwrite warning
        scorer.compute_idf(references)
    raw = torch.stack(scorer.score(candidates, references, batch_size=settings.batch_size), dim=-1)  # (n, 3)
    scores = {name: raw[:, i].tolist() for i, name in enumerate(SCORES)}
    if settings.rescale_with_baseline:
        baseline = scorer.baseline_vals  # P, R, F of unrelated sentence pairs for this layer
        rescaled = (raw - baseline) / (1 - baseline)
        scores.update({f"{name}_rescaled": rescaled[:, i].tolist() for i, name in enumerate(SCORES)})
    return scores


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' records on every rank, one per ``row`` (sharding may repeat rows), sorted by ``row``.

    A no-op apart from the sort in a single process.
    """
    gathered = [records]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
    unique = {record["row"]: record for part in gathered for record in part}
    return [unique[row] for row in sorted(unique)]


def evaluate(
    records: list[dict[str, Any]], scorer: Any, settings: BERTScoreSettings
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Scores ``prediction`` (and ``base_prediction`` when present) of each record against its ``reference``.

    Returns:
        The records with per-example scores added (``f1``, ``base_f1``, ...) and the mean scores as metrics
        (``test/bertscore_f1``, ``test/base_bertscore_f1``, ``test/bertscore_f1_delta``, ...).
    """
    references = [r["reference"] for r in records]
    metrics: dict[str, float] = {}
    prefixes = ["", "base_"] if records and records[0].get("base_prediction") is not None else [""]
    for prefix in prefixes:
        scores = score(scorer, settings, [r[f"{prefix}prediction"] for r in records], references)
        for name, values in scores.items():
            for record, value in zip(records, values):
                record[f"{prefix}{name}"] = value
            metrics[f"test/{prefix}bertscore_{name}"] = sum(values) / max(len(values), 1)
    if len(prefixes) == 2:
        for name in ("f1", "f1_rescaled"):
            if f"test/bertscore_{name}" in metrics:
                metrics[f"test/bertscore_{name}_delta"] = (
                    metrics[f"test/bertscore_{name}"] - metrics[f"test/base_bertscore_{name}"]
                )
    return records, metrics


def comparison_table(metrics: dict[str, float]) -> Any:
    """A ``rich`` table of the mean scores: fine-tuned, base and their difference where a base run exists."""
    from rich.table import Table

    has_base = any(key.startswith("test/base_") for key in metrics)
    table = Table(title="BERTScore on the test set")
    for column in ("score", "fine-tuned", *(("base", "delta") if has_base else ())):
        table.add_column(column, justify="left" if column == "score" else "right")
    for key, value in metrics.items():
        if not key.startswith("test/bertscore_") or key.endswith("_delta"):
            continue
        name = key.removeprefix("test/bertscore_")
        row = [name, f"{value:.4f}"]
        if has_base:
            base = metrics[f"test/base_bertscore_{name}"]
            row += [f"{base:.4f}", f"{value - base:+.4f}"]
        table.add_row(*row)
    return table


def print_summary(metrics: dict[str, float], bertscore_hash: str, paths: list[Path]) -> None:
    """Prints the comparison table, bert-score's hash and where the outputs went."""
    from rich.console import Console

    console = Console()
    console.print(comparison_table(metrics))
    console.print(f"bert-score: {bertscore_hash}")
    console.print(f"written: {', '.join(map(str, paths))}")


def write_outputs(
    directory: str | Path, records: list[dict[str, Any]], metrics: dict[str, float], info: dict[str, Any]
) -> tuple[Path, Path]:
    """Writes ``predictions.jsonl`` (one record per line) and ``test_metrics.json`` (metrics plus ``info``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    predictions = directory / "predictions.jsonl"
    with predictions.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = directory / "test_metrics.json"
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    summary.write_text(json.dumps({**clean, **info}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return predictions, summary


def examples_markdown(records: list[dict[str, Any]], count: int = 4) -> str:
    """The first ``count`` examples as Markdown (last prompt turn, reference, prediction, base prediction)."""
    blocks = []
    for record in records[:count]:
        last_turn = record["prompt"][-1]["content"] if record["prompt"] else ""
        lines = [f"**row {record['row']}** (F1 {record.get('f1', float('nan')):.3f})", "", f"*prompt:* {last_turn}"]
        lines += ["", f"*reference:* {record['reference']}", "", f"*prediction:* {record['prediction']}"]
        if record.get("base_prediction") is not None:
            lines += ["", f"*base:* {record['base_prediction']} (F1 {record.get('base_f1', float('nan')):.3f})"]
        blocks.append("\n".join(lines))
    return "\n\n---\n\n".join(blocks)


def settings_dict(generation: GenerationSettings, bertscore: BERTScoreSettings) -> dict[str, Any]:
    """Both settings as plain dicts, for ``test_metrics.json``."""
    return {"generation": asdict(generation), "bertscore": asdict(bertscore)}
