"""BERTScore for the test stage: score each answer against its reference.

Plain functions over ``bert_score.BERTScorer``; no Lightning. Answers come from :mod:`capyft.generation`; what is
written and printed is :mod:`capyft.reporting`'s.

Scores come from the ``bert-score`` library itself, not torchmetrics' ``BERTScore``, which pairs candidates with the
wrong references when their lengths differ (torchmetrics 1.9: identical pairs scored 0.35-0.80 instead of 1.0).

Two fixes keep bert-score 0.3.13 working as intended under transformers 5:

- RoBERTa / GPT-2 byte-level BPE: bert-score asks ``encode(..., add_prefix_space=True)`` so that the first word of a
  text gets its space-prefixed token like every other word; transformers 5 ignores that argument, which changed
  every roberta-large score. :func:`load_scorer` sets the prefix space on the tokenizer itself.
- An empty or whitespace-only text makes bert-score call ``build_inputs_with_special_tokens``, which transformers 5
  tokenizers lack (AttributeError). :func:`score` scores such pairs 0 without calling bert-score (what bert-score
  itself assigns an empty candidate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capyft import stats
from capyft.checks import ConfigError

log = logging.getLogger(__name__)
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
        tie_margin: with ``compare_base``, a prompt whose fine-tuned and base scores differ by at most this much
            is a tie, not a win or a loss (:mod:`capyft.stats`).
        bootstrap_resamples: resamples of the prompts for the confidence interval of the fine-tuned - base delta.
        bootstrap_seed: seed of those resamples (the same seed gives the same interval).
    """

    model_type: str = "roberta-large"
    num_layers: int | None = 17
    idf: bool = False
    batch_size: int = 64
    rescale_with_baseline: bool = False
    baseline_path: str | None = None
    lang: str = "en"
    tie_margin: float = 0.005
    bootstrap_resamples: int = 10_000
    bootstrap_seed: int = 0


def load_scorer(settings: BERTScoreSettings, device: torch.device | str = "cpu") -> Any:
    """Builds a ``bert_score.BERTScorer`` (loads the encoder once); rescaling is applied by :func:`score`.

    Raises:
        ConfigError: the encoder cannot be loaded (a hub id offline or not found: the message names the offline
            encoder capyft ships), ``num_layers`` is missing or exceeds the encoder's depth, or rescaling is asked
            for with no baseline file to read.
    """
    from bert_score import BERTScorer

    local = Path(settings.model_type).is_dir()
    if settings.num_layers is None and local:
        raise ConfigError(
            f"model.bertscore.model_type {settings.model_type!r} is a local dir: set model.bertscore.num_layers "
            "(all-MiniLM-L6-v2: 6, roberta-large: 17)"
        )
    if local and settings.num_layers is not None:
        from transformers import AutoConfig

        depth = AutoConfig.from_pretrained(settings.model_type).num_hidden_layers
        if not 1 <= settings.num_layers <= depth:
            raise ConfigError(
                f"model.bertscore.num_layers={settings.num_layers}, but {settings.model_type} has {depth} layers"
            )
    try:
        scorer = BERTScorer(
            model_type=settings.model_type,
            num_layers=settings.num_layers,
            batch_size=settings.batch_size,
            idf=settings.idf,
            device=str(device),
            lang=settings.lang,
            baseline_path=settings.baseline_path,
        )
    except KeyError as err:  # bert-score's table of layers has no entry for this model
        raise ConfigError(
            f"model.bertscore.num_layers: bert-score has no default layer for {settings.model_type!r}; set it"
        ) from err
    except OSError as err:  # offline, not in the cache, or no such model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.bertscore.model_type: cannot load the BERTScore encoder {settings.model_type!r} ({first}); "
            f"offline, score with the all-MiniLM-L6-v2 encoder capyft ships: --model.bertscore.model_type "
            f"{_shipped_encoder()} --model.bertscore.num_layers 6"
        ) from err
    if settings.rescale_with_baseline and not Path(scorer.baseline_path).is_file():
        raise ConfigError(
            f"bert-score has no rescale baseline for {settings.model_type} ({scorer.baseline_path} is missing): set "
            "model.bertscore.baseline_path to a baseline file, or model.bertscore.rescale_with_baseline false"
        )
    add_prefix_space(scorer._tokenizer)
    return scorer


def _shipped_encoder() -> str:
    """The folder of the MiniLM encoder capyft ships, or how to get it."""
    from capyft.assets import minilm_dir

    try:
        return str(minilm_dir())
    except (ImportError, FileNotFoundError):
        return "<the folder `python -m capyft.assets minilm` prints>"


def add_prefix_space(tokenizer: Any) -> None:
    """Makes a RoBERTa / GPT-2 tokenizer encode the first word as bert-score 0.3.13 intends: with its leading space.

    bert-score encodes these tokenizers' texts with ``encode(text, add_prefix_space=True)``; transformers 5 ignores
    that argument, so ``"Paris is"`` starts with ``Paris`` instead of ``ĠParis`` and no score matches bert-score's
    baselines or published numbers. Turning the prefix space on in the byte-level pre-tokenizer restores them. Other
    tokenizers (WordPiece, SentencePiece), which bert-score encodes without a prefix space, are left alone.
    """
    from transformers import GPT2Tokenizer, RobertaTokenizer

    if not isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer)):  # the classes bert-score's sent_encode tests
        return
    tokenizer.add_prefix_space = True
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    for part in [pre, *(pre if type(pre).__name__ == "Sequence" else [])]:
        if hasattr(part, "add_prefix_space"):
            part.add_prefix_space = True
    probe = "Paris is"
    if tokenizer.encode(probe, add_special_tokens=False) != tokenizer.encode(" " + probe, add_special_tokens=False):
        log.warning(
            "could not give the BERTScore tokenizer (%s) a prefix space: the first word of each text is tokenized "
            "without its leading space, so scores are not comparable with bert-score's published ones",
            type(tokenizer).__name__,
        )


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

    A pair whose candidate or reference is empty or only whitespace (e.g. an answer that ended at its first token)
    scores 0 for precision, recall and F1, as bert-score scores an empty candidate; it is never passed to bert-score,
    which crashes on it under transformers 5.

    Returns:
        ``precision``, ``recall`` and ``f1`` lists, plus ``*_rescaled`` ones when ``rescale_with_baseline`` is on.
        With ``idf``, weights come from the non-empty ``references`` (as ``bert_score.score`` does).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    kept = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
    raw = torch.zeros(len(candidates), 3)
    if kept:
        cands, refs = [candidates[i] for i in kept], [references[i] for i in kept]
        if settings.idf:
            scorer._idf_dict = None  # recomputed for these references, without bert-score's overwrite warning
            scorer.compute_idf(refs)
        raw[kept] = torch.stack(scorer.score(cands, refs, batch_size=settings.batch_size), dim=-1).float()  # (n, 3)
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
) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, stats.PairedComparison]]:
    """Scores ``prediction`` (and ``base_prediction`` when present) of each record against its ``reference``.

    With base predictions, each record also gets ``f1_delta`` (fine-tuned minus base; ``precision_delta``,
    ``recall_delta`` likewise) and the paired statistics of :func:`capyft.stats.paired_comparison` are computed for
    precision, recall and F1, with ``settings.tie_margin`` and a bootstrap seeded by ``settings.bootstrap_seed``.

    Returns:
        The records with per-example scores added (``f1``, ``base_f1``, ``f1_delta``, ...); the mean scores and the
        paired statistics as metrics (``test/bertscore_f1``, ``test/base_bertscore_f1``, ``test/bertscore_f1_delta``
        and its ``_ci_low``, ``_ci_high``, ``test/bertscore_f1_wins``, ``_ties``, ``_losses``, ``_sign_test_p``);
        and the comparisons by score name (empty without base predictions).
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
    comparisons: dict[str, stats.PairedComparison] = {}
    if len(prefixes) == 2:
        if "test/bertscore_f1_rescaled" in metrics:
            delta = metrics["test/bertscore_f1_rescaled"] - metrics["test/base_bertscore_f1_rescaled"]
            metrics["test/bertscore_f1_rescaled_delta"] = delta
        for name in ("f1", "precision", "recall"):
            for record in records:
                record[f"{name}_delta"] = record[name] - record[f"base_{name}"]
            compared = stats.paired_comparison(
                [r[name] for r in records],
                [r[f"base_{name}"] for r in records],
                tie_margin=settings.tie_margin,
                resamples=settings.bootstrap_resamples,
                seed=settings.bootstrap_seed,
            )
            comparisons[name] = compared
            key = f"test/bertscore_{name}"
            metrics |= {
                f"{key}_delta": compared.mean_delta,
                f"{key}_delta_ci_low": compared.ci_low,
                f"{key}_delta_ci_high": compared.ci_high,
                f"{key}_wins": float(compared.wins),
                f"{key}_ties": float(compared.ties),
                f"{key}_losses": float(compared.losses),
                f"{key}_sign_test_p": compared.sign_test_p,
            }
    return records, metrics, comparisons
