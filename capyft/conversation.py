"""``python -m capyft chat``: talk to a fine-tuned model in the terminal, or answer a file of conversations.

    python -m capyft chat --ckpt_path runs/NAME/version_0/checkpoints/last.ckpt
    python -m capyft chat --adapter runs/NAME/version_0/adapter/best --system "You are terse."
    python -m capyft chat --model HuggingFaceTB/SmolLM2-135M-Instruct          # the base alone, for comparison
    python -m capyft chat --ckpt_path ... --input convs.jsonl --output answers.jsonl

``chat`` serves the model that ``test`` scored: the base quantized as in training (4-bit on CPU too) plus the
adapter (:func:`capyft.checkpoints.load_for_inference`), and answers through the same generation path and settings
type as the test hook (:func:`capyft.generation.generate`, :class:`~capyft.generation.GenerationSettings`),
defaulting to the settings the run saved in its ``config.yaml``, so ``chat --input`` and ``test`` give the same
answer to the same prompt. Prompts go through the tokenizer's chat template exactly as in training
(:func:`capyft.chat.encode_prompt`). When a conversation outgrows the model's context, its oldest turns are
dropped (the system message and the newest user message stay) and the terminal says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from capyft.answers import ContextError, context_budget, fit_to_context, predict_file
from capyft.checkpoints import load_for_inference, run_config
from capyft.checks import check_writable
from capyft.generation import GenerationSettings, generate, stop_ids
from capyft.parsing import CommandParser, run_command

log = logging.getLogger(__name__)
HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits"


# ---- settings -------------------------------------------------------------------------------------------------
def run_generation_settings(run: dict[str, Any]) -> GenerationSettings:
    """The ``model.generation`` settings a run saved in its ``config.yaml`` (see
    :func:`capyft.checkpoints.run_config`); the defaults for keys it lacks, or without a run config."""
    saved = ((run.get("model") or {}).get("generation")) or {}
    names = {field.name for field in dataclasses.fields(GenerationSettings)}
    return GenerationSettings(**{key: value for key, value in saved.items() if key in names})


def chat_settings(
    base: GenerationSettings,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> GenerationSettings:
    """``base`` with the command line's overrides: ``temperature`` 0 means greedy, > 0 sampling at it.

    Raises:
        ValueError: ``max_new_tokens`` < 1, ``temperature`` < 0 or ``top_p`` outside (0, 1].
    """
    changes: dict[str, Any] = {}
    if max_new_tokens is not None:
        changes["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        changes |= {"do_sample": temperature > 0} | ({"temperature": temperature} if temperature > 0 else {})
    if top_p is not None:
        changes["top_p"] = top_p
    if seed is not None:
        changes["seed"] = seed
    settings = dataclasses.replace(base, **changes)
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    if (temperature is not None and temperature < 0) or not 0 < settings.top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {settings.top_p}")
    return settings


# ---- the interactive chat -------------------------------------------------------------------------------------
class ChatSession:
    """A multi-turn conversation with one model: each reply is generated from the history that fits the context.

    Args:
        model: a causal LM (PEFT-wrapped or not) in eval mode.
        tokenizer: its tokenizer, with a chat template.
        settings: how answers are generated (the test hook's settings type).
        system_prompt: prepended as a system message to every prompt, if given.
        max_context: prompt plus answer tokens (default: the model's ``max_position_embeddings``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: GenerationSettings,
        system_prompt: str | None = None,
        max_context: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.settings, self.system_prompt = model, tokenizer, settings, system_prompt
        self.budget = context_budget(model, settings, max_context)
        self.stop_ids = stop_ids(tokenizer, model)
        self.messages: list[dict[str, str]] = []
        self.turns = 0

    def reset(self) -> None:
        """Forgets the conversation."""
        self.messages = []

    def reply(self, text: str, stream: TextIO | None = None, prefix: str = "") -> str:
        """Adds a user message, generates the answer (``prefix`` and the answer streamed to ``stream``), records it.

        When the history no longer fits, its oldest turns are forgotten and ``stream`` gets one line saying how
        many.

        Raises:
            ContextError: the message alone does not fit; the history is unchanged.
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        ids, messages, dropped = fit_to_context(messages, self.tokenizer, self.system_prompt, self.budget)
        if dropped and stream is not None:
            stream.write(f"(dropped {dropped} old turn{'s' * (dropped > 1)} to fit the context)\n")
        if stream is not None:
            stream.write(prefix)
            stream.flush()
        input_ids = torch.tensor([ids], device=self.model.device)
        streamer = _streamer(self.tokenizer, stream) if stream is not None else None
        seed = self.settings.seed + self.turns  # sampling: reproducible per turn, not the same draw every turn
        (answer,) = generate(
            self.model, self.tokenizer, input_ids, torch.ones_like(input_ids), self.settings, self.stop_ids, seed,
            streamer=streamer,
        )  # fmt: skip
        self.messages = [*messages, {"role": "assistant", "content": answer.text}]
        self.turns += 1
        return answer.text


def _streamer(tokenizer: Any, stream: TextIO) -> Any:
    """A ``TextStreamer`` that writes the answer to ``stream`` (not stdout) as it is generated."""
    from transformers import TextStreamer

    class StreamWriter(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamWriter(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _read_line(stdin: TextIO, stdout: TextIO, prompt: str) -> str | None:
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        try:
            return input(prompt)
        except EOFError:
            return None
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    return line if line else None


def repl(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Runs the terminal chat until ``/exit`` or end of input; ``/reset`` starts over.

    Ctrl-C while the model answers drops that turn; at the prompt it quits. A message too long for the context is
    refused with a line that says so; the chat goes on.

    Args:
        session: the conversation to continue.
        stdin: where user lines come from (default ``sys.stdin``; a terminal gets line editing).
        stdout: where prompts and streamed answers go (default ``sys.stdout``).
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    stdout.write(f"capyft chat: {HELP}\n")
    while True:
        try:
            line = _read_line(stdin, stdout, "you> ")
        except KeyboardInterrupt:
            line = None
        if line is None or line.strip() == "/exit":
            stdout.write("\n" if line is None else "")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            stdout.write(f"unknown command {text}; {HELP}\n")
            continue
        try:
            session.reply(text, stream=stdout, prefix="assistant> ")
        except ContextError as err:
            stdout.write(f"(not sent: {err})\n")
        except KeyboardInterrupt:
            stdout.write("\n(interrupted; that turn is dropped)\n")


# ---- the command ----------------------------------------------------------------------------------------------
def chat(
    ckpt_path: str | Path | None = None,
    adapter: str | Path | None = None,
    model: str | None = None,
    system: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    load_in_4bit: bool | None = None,
    dtype: str | None = None,
    input: str | Path | None = None,  # noqa: A002 (the command's own flag name)
    output: str | Path | None = None,
    batch_size: int = 8,
    max_context: int | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Loads the model as scored and chats in the terminal, or answers ``input`` into ``output``.

    Args:
        ckpt_path: a capyft ``.ckpt`` (``runs/<name>/version_N/checkpoints/*.ckpt``).
        adapter: a PEFT adapter folder (``runs/<name>/version_N/adapter/best``), instead of ``ckpt_path``.
        model: the base model dir or hub id; alone, chat with the base model.
        system: system prompt (default: the one the run trained with, if any).
        max_new_tokens: most new tokens per answer (default: the run's ``model.generation``, else 100).
        temperature: 0: greedy; > 0: sampling (default: the run's settings).
        top_p: nucleus sampling mass (default: the run's settings).
        seed: seed for sampling (default: the run's settings).
        load_in_4bit: quantize the base (default: as trained, on CPU too).
        dtype: weights / compute dtype, ``float16``, ``bfloat16`` or ``float32`` (default: as trained).
        input: a JSONL of conversations to answer (batch mode, with ``output``).
        output: the JSONL to write the answers to; checked writable before the model loads.
        batch_size: prompts per generate call (batch mode).
        max_context: prompt + answer tokens (default: the model's context); older turns are dropped to fit.
        stdin: where the chat reads from (default ``sys.stdin``).
        stdout: where it writes (default ``sys.stdout``).

    Generation settings default to the run's saved ``model.generation`` (:func:`run_generation_settings`); the
    other arguments override them (see :func:`chat_settings`). The system prompt defaults to the one the run trained
    with.

    Returns:
        The exit status.

    Raises:
        ValueError: bad arguments or an unreadable source (see :func:`capyft.checkpoints.load_for_inference`).
        FileNotFoundError: a source that does not exist.
    """
    if (input is None) != (output is None):
        raise ValueError("--input and --output go together")
    if output is not None:
        check_writable(output, "--output")  # before the model loads, not after every answer is generated
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_context is not None and max_context < 2:
        raise ValueError(f"max_context must be >= 2 tokens, got {max_context}")
    run = run_config(ckpt_path if ckpt_path is not None else adapter)
    settings = chat_settings(run_generation_settings(run), max_new_tokens, temperature, top_p, seed)
    net, tokenizer, checkpoint = load_for_inference(ckpt_path, adapter, model, load_in_4bit, dtype)
    if system is None:
        data = checkpoint.get("datamodule_hyper_parameters") or run.get("data") or {}
        system = data.get("system_prompt")
    if input is not None:
        n = predict_file(net, tokenizer, input, output, settings, system, batch_size, max_context)
        log.info("wrote %d answers to %s", n, output)
        return 0
    repl(ChatSession(net, tokenizer, settings, system, max_context), stdin, stdout)
    return 0


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``python -m capyft chat``: the arguments of :func:`chat` as flags.

    Args:
        argv: the arguments after ``chat`` (default: ``sys.argv[1:]``, for ``python -m capyft.conversation``).
        stdin: where the chat reads from (default ``sys.stdin``).
        stdout: where it writes (default ``sys.stdout``).

    Returns:
        The exit status.
    """
    parser = CommandParser(
        prog="python -m capyft chat",
        description="Chat with a fine-tuned model in the terminal (/reset, /exit), or answer a JSONL of conversations.",
    )
    parser.add_function_arguments(chat, skip={"stdin", "stdout"})
    return run_command(parser, argv, chat, stdin=stdin, stdout=stdout)


if __name__ == "__main__":
    sys.exit(main())
