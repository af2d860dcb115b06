"""Test and predict for :class:`capyft.model.QLoRAModule`: answer the test prompts, then (test) score them.

Kept apart from training: this half of the module reads the model only through ``self.model`` /
``self.tokenizer`` and writes through :mod:`capyft.reporting`; :class:`AnswerHooks` is mixed into the
LightningModule, whose hooks Lightning calls as usual.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from capyft import evaluation, generation, reporting
from capyft.checkpoints import run_dir
from capyft.checks import ConfigError

log = logging.getLogger(__name__)


class AnswerHooks:
    """Lightning's test and predict hooks: generation (tuned, and base with ``compare_base``) and BERTScore.

    Expects the LightningModule's ``model``, ``tokenizer``, ``generation`` (:class:`GenerationSettings`),
    ``bertscore`` (:class:`BERTScoreSettings`) and ``compare_base``. The 4-bit layers stay unpacked here:
    bitsandbytes 0.50.2 could pack them for faster CPU generation, but packing rounds their block scales to
    bfloat16, so test and predict would score other weights than the ones trained.
    """

    _scorer: Any = None  # bert_score.BERTScorer, loaded on the first test and kept
    _gen_tokens, _gen_seconds = 0, 0.0  # generated tokens and time spent generating, this rank

    def setup(self, stage: str) -> None:
        # The scorer goes on the GPU before the model loads and before the test dataloader is built, so that
        # `data.eval_batch_size: auto` plans its generation batches around the memory the scorer holds.
        if stage == "test":
            self._load_scorer()

    def on_test_start(self) -> None:
        self._load_scorer()  # already loaded by setup when Lightning ran it

    def _load_scorer(self) -> None:
        """Loads the BERTScore encoder before any answer is generated, so that a scorer that cannot load (e.g.
        roberta-large offline) stops ``test`` in one line at the start, not after all the generation. Rank 0 scores;
        every rank raises its error."""
        error = None
        if self.trainer.is_global_zero and self._scorer is None:
            try:
                self._scorer = evaluation.load_scorer(self.bertscore, self.trainer.strategy.root_device)
            except ConfigError as err:
                error = str(err)
        error = self.trainer.strategy.broadcast(error)
        if error:
            raise ConfigError(error)

    def on_test_epoch_start(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._gen_tokens, self._gen_seconds = 0, 0.0

    def on_predict_epoch_start(self) -> None:
        self.on_test_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._records.extend(self._answer(batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Answers a batch of prompts (and, with ``compare_base``, answers again with the adapter disabled)."""
        records = self._answer(batch)
        self._records.extend(records)
        return records

    def on_predict_epoch_end(self) -> None:
        """Writes the answers, unscored, to ``<run>/predict-<checkpoint>/predictions.jsonl`` (rank 0)."""
        records = evaluation.gather_records(self._records)  # every rank's answers, in test-set order
        if self.trainer.is_global_zero:
            out = reporting.output_dir(run_dir(self.trainer), "predict", self.trainer.ckpt_path, self.global_step)
            log.info("predict: %d answers written to %s", len(records), reporting.write_predictions(out, records))

    def _answer(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        records, tokens = generation.answer_batch(self.model, self.tokenizer, batch, self.generation, self.compare_base)
        self._gen_seconds += time.perf_counter() - start
        self._gen_tokens += tokens
        return records

    def on_test_epoch_end(self) -> None:
        log.info(
            "test: answered %d prompts%s in %.1f s (%s generated tokens, %.0f a second)%s",
            len(self._records),
            " with both models" if self.compare_base else "",
            self._gen_seconds,
            f"{self._gen_tokens:,}",
            self._gen_tokens / max(self._gen_seconds, 1e-9),
            f" on rank {self.global_rank}" if self.trainer.world_size > 1 else "; scoring them",
        )
        records = evaluation.gather_records(self._records)  # every rank's answers, in test-set order
        rate = torch.tensor(self._gen_tokens / max(self._gen_seconds, 1e-9), device=self.device)
        rate = float(self.trainer.strategy.reduce(rate, reduce_op="sum"))  # total throughput over ranks
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero:
            metrics = self._score_and_report(records, rate)
        metrics = self.trainer.strategy.broadcast(metrics)
        self.log_dict(metrics, batch_size=len(records))

    def _score_and_report(self, records: list[dict[str, Any]], rate: float) -> dict[str, float]:
        out = reporting.output_dir(run_dir(self.trainer), "test", self.trainer.ckpt_path, self.global_step)
        reporting.write_predictions(out, records)  # before scoring: no generated answer is lost
        records, metrics, comparisons = evaluation.evaluate(records, self._scorer, self.bertscore)
        metrics["test/gen_tokens_per_sec"] = rate
        metrics["test/gen_seconds"] = self._gen_seconds  # rank 0's time answering, both models with compare_base
        info = {
            "bertscore_hash": evaluation.score_hash(self._scorer, self.bertscore),
            "ckpt_path": self.trainer.ckpt_path,
            **reporting.settings_dict(self.generation, self.bertscore),
        }
        return reporting.report_test(out, records, metrics, comparisons, info, self.loggers, self.trainer.global_step)
