"""Paired base-vs-tuned statistics on constructed scores: intervals, win/tie/loss counts, the sign test, and the
plain-words verdict the test hook prints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capyft import reporting
from capyft.stats import bootstrap_ci, paired_comparison, sign_test


def test_known_shift_gives_an_interval_that_excludes_zero():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.6, 0.8, size=50)
    noise = rng.normal(0.0, 0.01, size=50)
    tuned = base + 0.05 + noise  # every prompt gains 0.05 +- 0.01: 50 wins
    result = paired_comparison(tuned, base)
    assert result.mean_delta == pytest.approx(0.05 + noise.mean())
    assert 0 < result.ci_low < result.mean_delta < result.ci_high < 0.1
    assert (result.wins, result.ties, result.losses, result.n) == (50, 0, 0, 50)
    assert result.sign_test_p == pytest.approx(2 * 0.5**50)
    assert result.shown
    assert "fine-tuned scores higher than base" in result.summary("F1")

    worse = paired_comparison(base, tuned)  # the same shift the other way
    assert worse.ci_high < 0 and (worse.wins, worse.losses) == (0, 50)
    assert "fine-tuned scores lower than base" in worse.summary("F1")


def test_identical_scores_give_no_wins_no_losses_and_a_zero_interval():
    scores = [0.71, 0.64, 0.80, 0.55]
    result = paired_comparison(scores, list(scores))
    assert (result.wins, result.ties, result.losses) == (0, 4, 0)
    assert (result.ci_low, result.ci_high, result.mean_delta) == (0.0, 0.0, 0.0)
    assert result.sign_test_p == 1.0
    assert not result.shown
    assert "no difference was shown" in result.summary("F1")


def test_ties_follow_the_margin():
    base = [0.5, 0.5, 0.5, 0.5, 0.5]
    tuned = [0.504, 0.496, 0.51, 0.49, 0.5]  # +0.004 and -0.004 are within 0.005: ties
    result = paired_comparison(tuned, base, tie_margin=0.005)
    assert (result.wins, result.ties, result.losses) == (1, 3, 1)
    strict = paired_comparison(tuned, base, tie_margin=0.0)
    assert (strict.wins, strict.ties, strict.losses) == (2, 1, 2)
    with pytest.raises(ValueError, match="tie_margin"):
        paired_comparison(tuned, base, tie_margin=-0.1)
    with pytest.raises(ValueError, match="one length"):
        paired_comparison(tuned, base[:4])


def test_sign_test_matches_the_binomial_by_hand():
    # 9 wins, 2 losses: P(X <= 2) for X ~ Binomial(11, 1/2) = (1 + 11 + 55) / 2048 = 67/2048; two-sided doubles it
    assert sign_test(9, 2) == pytest.approx(2 * 67 / 2048)
    assert sign_test(2, 9) == sign_test(9, 2)
    assert sign_test(3, 3) == 1.0  # an even split: the doubled tail exceeds 1 and is capped
    assert sign_test(0, 0) == 1.0
    assert sign_test(4, 0) == pytest.approx(2 / 16)  # four prompts can never go below p = 0.125
    # the ties of a comparison do not count: 9 wins, 4 ties, 2 losses
    tuned = [0.6] * 9 + [0.5] * 4 + [0.4] * 2
    assert paired_comparison(tuned, [0.5] * 15).sign_test_p == pytest.approx(2 * 67 / 2048)


def test_bootstrap_is_seeded_and_wide_for_four_prompts():
    many = np.random.default_rng(0).normal(size=30)
    assert bootstrap_ci(many, resamples=500, seed=3) == bootstrap_ci(many, resamples=500, seed=3)
    assert bootstrap_ci(many, resamples=500, seed=3) != bootstrap_ci(many, resamples=500, seed=4)
    deltas = np.array([0.03, -0.02, 0.01, -0.04])
    low, high = bootstrap_ci(deltas)
    # the resampled means of 4 prompts range over [-0.04, 0.03]; the 95% interval covers most of that and zero
    assert -0.04 <= low < 0 < high <= 0.03 and high - low > 0.03
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([])))
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci(deltas, resamples=0)


def test_printed_table_and_summary_carry_the_paired_result():
    from rich.console import Console

    base, tuned = [0.60, 0.70, 0.65, 0.62], [0.63, 0.68, 0.66, 0.62]
    result = paired_comparison(tuned, base)
    key = "test/bertscore_f1"
    metrics = {key: float(np.mean(tuned)), "test/base_bertscore_f1": float(np.mean(base))}
    metrics |= {
        f"{key}_delta": result.mean_delta,
        f"{key}_delta_ci_low": result.ci_low,
        f"{key}_delta_ci_high": result.ci_high,
        f"{key}_wins": 2.0,
        f"{key}_ties": 1.0,
        f"{key}_losses": 1.0,
        f"{key}_sign_test_p": result.sign_test_p,
    }
    console = Console(width=200, record=True)
    console.print(reporting.comparison_table(metrics))
    table = console.export_text()
    assert f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}]" in table and "2/1/1" in table
    assert f"{result.sign_test_p:.3g}" in table
    (line,) = reporting.paired_summary({"f1": result})
    assert line.startswith("BERTScore f1: fine-tuned - base = +0.0050, 95% CI [")
    assert "over 4 prompts" in line and line.endswith("no difference was shown (the 95% interval includes 0).")
