"""BERTScore for the test stage: score each answer against its reference.

Plain functions over ``bert_score.BERTScorer``; no Lightning. Answers come from :mod:`capyft.generation`; what is
written and printed is :mod:`capyft.reporting`'s.

Scores come from the ``bert-score`` library itself, not torchmetrics' ``BERTScore``, which pairs candidates with the
wrong references when their lengths differ (torchmetrics 1.9: identical pairs scored 0.35-0.80 instead of 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SCORES = ("precision", "recall", "f1")


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
