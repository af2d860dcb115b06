"""Synthetic data with Capybara-like lengths: token rows (in-memory checks) and a ``messages`` jsonl (user path)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.common import IGNORE


def lognormal_lengths(n: int, median: float, sigma: float, low: int, high: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(n, generator=generator, dtype=torch.float64) * sigma + math.log(median)
    return [int(min(max(round(math.exp(x)), low), high)) for x in draws.tolist()]


def make_conversations(
    n: int,
    seed: int = 0,
    median: float = 900,
    sigma: float = 0.6,
    low: int = 200,
    high: int = 2048,
    vocab: int = 128000,
) -> list[dict[str, list[int]]]:
    """Synthetic multi-turn conversations: 1-3 turns, each a masked user part (~10%) and a trained assistant part.

    Token ids are random (below the special tokens); the first token (begin-of-text) is never trained.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    rows = []
    for length in lognormal_lengths(n, median, sigma, low, high, seed):
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        labels = list(ids)
        turns = int(torch.randint(1, 4, (1,), generator=generator))
        bounds = [round(length * k / turns) for k in range(turns + 1)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            user = max(4, round(0.1 * (end - start)))
            labels[start : start + user] = [IGNORE] * user
        labels[0] = IGNORE
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def single_token_words(tokenizer: Any, limit: int = 20000) -> list[str]:
    """Vocabulary entries that decode to `` word`` (a space and letters): joined, each stays one token."""
    words = []
    for token_id in range(min(limit, len(tokenizer))):
        text = tokenizer.decode([token_id])
        if len(text) > 2 and text[0] == " " and text[1:].isalpha() and text[1:].isascii():
            words.append(text)
    return words


def write_messages(path: Path, n: int, tokenizer: Any, seed: int = 0, median: float = 900, high: int = 2048) -> dict:
    """Writes ``n`` conversations in trl's ``messages`` schema whose rendered lengths follow Capybara's.

    Lengths are log-normal around ``median`` tokens (sigma 0.6), clipped to 200-``high``; each conversation has 1-3
    turns, the user ~10% of each turn, the assistant the rest. Words are single tokens of ``tokenizer``, so a
    drawn length is a token count (plus the chat template's few tokens a message).

    Returns:
        The rendered token lengths (median, min, max) as measured with the tokenizer's chat template.
    """
    words = single_token_words(tokenizer)
    generator = torch.Generator().manual_seed(seed + 1)
    lengths = lognormal_lengths(n, median, 0.6, 200, high - 40, seed)  # 40: template tokens
    rendered = []
    with path.open("w") as f:
        for length in lengths:
            turns = int(torch.randint(1, 4, (1,), generator=generator))
            messages = []
            for _ in range(turns):
                share = length // turns
                user = max(4, round(0.1 * share))
                for role, count in (("user", user), ("assistant", share - user)):
                    picks = torch.randint(0, len(words), (count,), generator=generator).tolist()
                    messages.append({"role": role, "content": "".join(words[i] for i in picks).strip()})
            f.write(json.dumps({"messages": messages}) + "\n")
            rendered.append(len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)))
    return {
        "conversations": n,
        "median_tokens": statistics.median(rendered),
        "min_tokens": min(rendered),
        "max_tokens": max(rendered),
        "total_tokens": sum(rendered),
    }
