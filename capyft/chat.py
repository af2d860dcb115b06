"""Chat rendering and label masking: turns a conversation into ``input_ids`` and ``labels``.

Pure functions over a Hugging Face tokenizer; no Lightning, no torch.

The trained tokens of a conversation are, for every assistant message (or only the last), its content tokens and the
end-of-turn token that closes it (``<|eot_id|>`` for Llama-3.x, ``<|im_end|>`` for ChatML). Everything else (system
and user turns, role headers, the generation prompt) gets the label ``IGNORE_INDEX``.

Spans are found without ``{% generation %}`` markers, which most templates (Llama-3.1's included) lack: for each
assistant message the conversation is rendered up to it with the generation prompt (``P``) and through it (``F``);
``F`` must extend ``P`` and what it adds is the assistant message as the template writes it, ending in the
end-of-turn token plus, for some templates, a trailer such as ChatML's newline. The pieces are tokenized one by one,
which is also how the model meets them at inference: a prompt tokenized as a whole, then generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TrainOn = Literal["all", "last"]


def validate_conversation(messages: Any) -> list[dict[str, str]]:
    """Checks a conversation and returns it as a list of ``{role, content}`` dicts.

    Args:
        messages: a list of ``{"role": ..., "content": ...}`` mappings.

    Returns:
        The messages with only the ``role`` and ``content`` keys.

    Raises:
        ValueError: naming the problem: no messages, an unknown role, content that is not a non-empty string, a
            system message after the first position, or no assistant turn.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) == 0:
        raise ValueError("the conversation has no messages (expected a non-empty list of {role, content})")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} is not a {{role, content}} mapping: {str(message)[:80]!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has content of type {type(content).__name__}, expected a string")
        if not content.strip():
            raise ValueError(f"message {i} ({role}) has empty content")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} is a system message; a system message may only come first")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError("the conversation has no assistant turn, so there is nothing to train on")
    return clean


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepends ``system_prompt`` unless it is None or the conversation already opens with a system message."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Renders messages with the tokenizer's own chat template, as text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; use a chat/instruct model "
            "or set tokenizer.chat_template"
        )
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:  # e.g. raise_exception("roles must alternate"): a problem of this conversation
        raise ValueError(f"the chat template cannot render this conversation: {err}") from err


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # The rendered text already holds the template's special tokens (bos included), so add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _special_tokens(tokenizer: Any) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def split_assistant_segment(tokenizer: Any, segment: str, content: str) -> tuple[str, str, str]:
    """Splits the rendered text of one assistant message into (header, trained, trailer).

    ``trained`` runs from the start of the (possibly trimmed) content through the last special token of the segment,
    which is the end-of-turn token; ``header`` is template text before the content; ``trailer`` what follows the
    end-of-turn token (ChatML's newline).
    """
    end = -1
    for special in _special_tokens(tokenizer):
        pos = segment.rfind(special)
        if pos >= 0 and pos + len(special) > end:
            end = pos + len(special)
    if end < 0:
        raise ValueError(
            "the chat template closes an assistant message with no special token, so capyft cannot find the "
            f"end-of-turn token to train; rendered assistant text ends with {segment[-40:]!r}"
        )
    start = segment.find(content)  # templates that keep the content as is: train all of it, whitespace included
    if start < 0:
        start = segment.find(content.strip())  # templates that trim it (Llama-3.x)
    if start < 0 or start >= end:
        raise ValueError(
            "the chat template changes assistant content beyond trimming it, so capyft cannot locate it in "
            f"the rendered text: {segment[:80]!r}"
        )
    return segment[:start], segment[start:end], segment[end:]


def encode_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    max_length: int | None = None,
    train_on: TrainOn = "all",
    system_prompt: str | None = None,
) -> dict[str, list[int]]:
    """Tokenizes a conversation with its chat template and builds labels aligned with the inputs.

    Args:
        messages: ``{role, content}`` messages (see :func:`validate_conversation`).
        tokenizer: a Hugging Face tokenizer with a chat template.
        max_length: cut input_ids and labels to this many tokens (right truncation, labels stay aligned).
        train_on: ``"all"`` trains every assistant message, ``"last"`` only the final one.
        system_prompt: prepended as a system message unless the conversation has one.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; labels are ``IGNORE_INDEX`` except on assistant
        content and end-of-turn tokens.

    Raises:
        ValueError: the conversation is invalid, the template cannot render it consistently, or truncation cut
            every trained token.
    """
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    messages = with_system_prompt(validate_conversation(messages), system_prompt)
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained_idx = set(assistant_idx if train_on == "all" else assistant_idx[-1:])

    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # text rendered and tokenized so far

    def add(text: str, trained: bool) -> None:
        ids = _tokenize(tokenizer, text)
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    if assistant_idx[0] == 0:
        raise ValueError(
            "the conversation opens with an assistant message, so there is no prompt to render before it; "
            "start it with a user (or system) message"
        )
    for i in assistant_idx:
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                f"the chat template does not render message {i} as an extension of the turns before it, so "
                "trained spans cannot be derived; use a template that renders conversations prefix-consistently"
            )
        header, trained, trailer = split_assistant_segment(tokenizer, full[len(prompt) :], messages[i]["content"])
        add(prompt[len(done) :] + header, trained=False)
        add(trained, trained=i in trained_idx)
        add(trailer, trained=False)
        done = full
    full = render(tokenizer, messages)
    if not full.startswith(done):
        raise ValueError(
            "the chat template does not render the whole conversation as an extension of its assistant turns, so "
            "trained spans cannot be derived; use a template that renders conversations prefix-consistently"
        )
    add(full[len(done) :], trained=False)  # anything a template writes after the last assistant turn

    if max_length is not None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            f"max_length={max_length} cuts every trained token of this conversation ({len(input_ids)} tokens kept); "
            "raise max_length or drop the row"
        )
    return {"input_ids": input_ids, "labels": labels}


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token ids that close an assistant turn under this template, plus eos: generation stops at any of them."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt = render(tokenizer, probe[:1], add_generation_prompt=True)
    _, trained, _ = split_assistant_segment(tokenizer, render(tokenizer, probe)[len(prompt) :], "Hello")
    ids = {_tokenize(tokenizer, trained)[-1]}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def split_prompt_reference(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Splits a conversation for evaluation: every turn before the last assistant message, and that message."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def encode_prompt(messages: list[dict[str, str]], tokenizer: Any, system_prompt: str | None = None) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and its generation prompt."""
    return _tokenize(tokenizer, render(tokenizer, with_system_prompt(messages, system_prompt), True))
