"""Answering conversations with a loaded model outside a training run: fitting a conversation into the model's
context (oldest turns dropped, system message and newest user turn kept) and answering a JSONL file of
conversations in batches, as the test hook does. Used by ``python -m capyft chat``; no Lightning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from capyft.chat import ROLES, encode_prompt, split_prompt_reference
from capyft.generation import GenerationSettings, generate, stop_ids

log = logging.getLogger(__name__)


# ---- fitting a conversation into the context ------------------------------------------------------------------
class ContextError(ValueError):
    """The newest user message alone (with the system message) leaves no room for the answer."""


def fit_to_context(
    messages: list[dict[str, str]], tokenizer: Any, system_prompt: str | None, budget: int | None
) -> tuple[list[int], list[dict[str, str]], int]:
    """Drops the oldest turns until the prompt takes at most ``budget`` tokens.

    A turn is a user message and the replies up to the next user message. Leading system messages (and
    ``system_prompt``) and the turn of the newest user message are always kept.

    Args:
        messages: the conversation, ending with the user message to answer.
        tokenizer: its tokenizer, with a chat template.
        system_prompt: prepended as a system message unless the conversation has one.
        budget: most prompt tokens (the context minus ``max_new_tokens``); None: no limit.

    Returns:
        ``(prompt ids, the messages kept, how many turns were dropped)``.

    Raises:
        ContextError: even the newest user message alone does not fit.
    """
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    head, turns = messages[:lead], messages[lead:]
    dropped = 0
    while True:
        ids = encode_prompt([*head, *turns], tokenizer, system_prompt)
        if budget is None or len(ids) <= budget:
            return ids, [*head, *turns], dropped
        starts = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
        if not starts:
            raise ContextError(
                f"the message is {len(ids):,} tokens with the chat template, but only {budget:,} fit (the context "
                "less max_new_tokens); shorten it, or lower --max_new_tokens"
            )
        turns = turns[starts[0] :]
        dropped += 1


def context_budget(model: Any, settings: GenerationSettings, max_context: int | None = None) -> int | None:
    """Prompt tokens that leave room for ``max_new_tokens``: ``max_context``, else the model's
    ``max_position_embeddings``, less the new tokens; None when neither is known.

    Raises:
        ValueError: ``max_new_tokens`` leaves no room for a prompt.
    """
    context = max_context or getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return None
    if settings.max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {settings.max_new_tokens} leaves no room in a context of {context} tokens")
    return context - settings.max_new_tokens


# ---- batch answers --------------------------------------------------------------------------------------------
def prompt_and_reference(messages: Any) -> tuple[list[dict[str, str]], str | None]:
    """The turns to answer and, when the conversation ends with an assistant message, that message.

    A conversation ending with an assistant turn is answered as in evaluation: the prompt is everything before its
    last assistant message (:func:`capyft.chat.split_prompt_reference`), which becomes the reference.

    Raises:
        ValueError: no messages, a malformed message, or a prompt that does not end with a user message.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is not a {{role, content}} mapping with a known role: {str(m)[:80]!r}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    reference = None
    if messages[-1]["role"] == "assistant":
        messages, reference = split_prompt_reference(messages)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the prompt to answer must end with a user message")
    return messages, reference


def generate_answers(
    model: Any,
    tokenizer: Any,
    encoded: list[list[int]],
    settings: GenerationSettings,
    batch_size: int = 8,
) -> list[str]:
    """Answers each encoded prompt, in batches of left-padded prompts of similar length, as the test hook does.

    Each batch is seeded with ``settings.seed`` + its first prompt's index (sampling only).

    Returns:
        One answer per prompt, in the order given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stops = stop_ids(tokenizer, model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad(
            {"input_ids": [encoded[i] for i in rows]}, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        seed = settings.seed + min(rows)
        out = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], settings, stops, seed)
        for row, answer in zip(rows, out):
            answers[row] = answer.text
    return answers


def predict_file(
    model: Any,
    tokenizer: Any,
    input_path: str | Path,
    output_path: str | Path,
    settings: GenerationSettings,
    system_prompt: str | None = None,
    batch_size: int = 8,
    max_context: int | None = None,
) -> int:
    """Answers every conversation of a JSONL file and writes one JSON line per input row, in order.

    Input rows use trl's ``messages`` or LDJnr's ``conversation`` schema (:func:`capyft.data.to_messages`). Each
    output row is ``{"index", "messages", "answer"}`` plus ``"reference"`` when the input ended with an assistant
    turn, and ``"dropped_turns"`` when its oldest turns did not fit the context; ``messages`` is the prompt that was
    answered followed by the new assistant turn, so the file is itself a ``messages`` data set.

    Returns:
        The number of rows written.

    Raises:
        ValueError: a malformed line or a prompt whose last user message alone does not fit the context, naming
            the line, before anything is generated.
    """
    from capyft.data import to_messages

    input_path = Path(input_path)
    budget = context_budget(model, settings, max_context)
    prompts, references, encoded, dropped = [], [], [], []
    with input_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt, reference = prompt_and_reference(to_messages(json.loads(line)))
                ids, prompt, n = fit_to_context(prompt, tokenizer, system_prompt, budget)
            except (ValueError, AttributeError, TypeError) as err:
                raise ValueError(f"{input_path}:{lineno}: {err}") from err
            prompts.append(prompt)
            references.append(reference)
            encoded.append(ids)
            dropped.append(n)
    if any(dropped):
        log.warning(
            "dropped %d old turns of %d conversations to fit the context", sum(dropped), sum(map(bool, dropped))
        )
    answers = generate_answers(model, tokenizer, encoded, settings, batch_size)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with Path(output_path).open("w", encoding="utf-8") as f:
        for index, (prompt, reference, answer, n) in enumerate(zip(prompts, references, answers, dropped)):
            row: dict[str, Any] = {
                "index": index,
                "messages": [*prompt, {"role": "assistant", "content": answer}],
                "answer": answer,
            }
            if reference is not None:
                row["reference"] = reference
            if n:
                row["dropped_turns"] = n
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(answers)
