"""``python -m capyft chat``: talk to a fine-tuned model in the terminal, or answer a file of conversations.

    python -m capyft chat --ckpt_path runs/NAME/version_0/checkpoints/last.ckpt
    python -m capyft chat --adapter runs/NAME/version_0/adapter/best --system "You are terse."
    python -m capyft chat --model HuggingFaceTB/SmolLM2-135M-Instruct          # the base alone, for comparison
    python -m capyft chat --ckpt_path ... --input convs.jsonl --output answers.jsonl

Prompts go through the tokenizer's chat template exactly as in training (:func:`capyft.chat.encode_prompt`) and
generation stops at the template's end-of-turn tokens. Greedy decoding unless ``--temperature`` > 0. On a GPU the
base is loaded in 4-bit when the run trained in 4-bit (``--load_in_4bit`` overrides); on CPU it is loaded plain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from capyft.chat import ROLES, encode_prompt, end_of_turn_ids, split_prompt_reference
from capyft.checkpoints import load_for_inference
from capyft.generation import cut_at_stop

log = logging.getLogger(__name__)
HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits"


def generation_config(tokenizer: Any, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0) -> Any:
    """A ``GenerationConfig``: greedy when ``temperature`` is 0, else sampling; stops at end-of-turn tokens."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )


def decode_answer(tokenizer: Any, ids: list[int], stop_ids: list[int]) -> str:
    """The text of generated ``ids`` up to the first end-of-turn token, special tokens dropped, stripped."""
    return cut_at_stop(tokenizer, ids, stop_ids).text


class ChatSession:
    """A multi-turn conversation with one model: each reply is generated from the whole history.

    Args:
        model: a causal LM (PEFT-wrapped or not) in eval mode.
        tokenizer: its tokenizer, with a chat template.
        config: the ``GenerationConfig`` (see :func:`generation_config`).
        system_prompt: prepended as a system message to every prompt, if given.
    """

    def __init__(self, model: Any, tokenizer: Any, config: Any, system_prompt: str | None = None) -> None:
        self.model, self.tokenizer, self.config, self.system_prompt = model, tokenizer, config, system_prompt
        self.messages: list[dict[str, str]] = []

    def reset(self) -> None:
        """Forgets the conversation."""
        self.messages = []

    @torch.inference_mode()
    def reply(self, text: str, stream: TextIO | None = None) -> str:
        """Adds a user message, generates the assistant's answer (streamed to ``stream``), records and returns it."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = torch.tensor([encode_prompt(messages, self.tokenizer, self.system_prompt)], device=self.model.device)
        streamer = _streamer(self.tokenizer, stream) if stream is not None else None
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self.config, streamer=streamer
        )
        answer = decode_answer(self.tokenizer, out[0, ids.shape[1] :].tolist(), self.config.eos_token_id)
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer


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

    Ctrl-C while the model answers drops that turn; at the prompt it quits.

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
        stdout.write("assistant> ")
        stdout.flush()
        try:
            session.reply(text, stream=stdout)
        except KeyboardInterrupt:
            stdout.write("\n(interrupted; that turn is dropped)\n")


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


@torch.inference_mode()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    config: Any,
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Answers each prompt with a new assistant turn, in batches of left-padded prompts of similar length.

    Returns:
        One answer per prompt, in the order given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [encode_prompt(p, tokenizer, system_prompt) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad(
            {"input_ids": [encoded[i] for i in rows]}, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        out = model.generate(**batch, generation_config=config)
        for row, ids in zip(rows, out[:, batch["input_ids"].shape[1] :].tolist()):
            answers[row] = decode_answer(tokenizer, ids, config.eos_token_id)
    return answers


def predict_file(
    model: Any,
    tokenizer: Any,
    input_path: str | Path,
    output_path: str | Path,
    config: Any,
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> int:
    """Answers every conversation of a JSONL file and writes one JSON line per input row, in order.

    Input rows use trl's ``messages`` or LDJnr's ``conversation`` schema (:func:`capyft.data.to_messages`). Each
    output row is ``{"index", "messages", "answer"}`` plus ``"reference"`` when the input ended with an assistant
    turn; ``messages`` is the prompt followed by the new assistant turn, so the file is itself a ``messages`` data set.

    Returns:
        The number of rows written.
    """
    from capyft.data import to_messages

    input_path = Path(input_path)
    prompts, references = [], []
    with input_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt, reference = prompt_and_reference(to_messages(json.loads(line)))
            except (ValueError, AttributeError, TypeError) as err:
                raise ValueError(f"{input_path}:{lineno}: {err}") from err
            prompts.append(prompt)
            references.append(reference)
    answers = generate_answers(model, tokenizer, prompts, config, system_prompt, batch_size)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with Path(output_path).open("w", encoding="utf-8") as f:
        for index, (prompt, reference, answer) in enumerate(zip(prompts, references, answers)):
            row: dict[str, Any] = {
                "index": index,
                "messages": [*prompt, {"role": "assistant", "content": answer}],
                "answer": answer,
            }
            if reference is not None:
                row["reference"] = reference
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(answers)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``python -m capyft chat``: an interactive chat, or batch answers with ``--input`` / ``--output``.

    Args:
        argv: the arguments after ``chat`` (default: ``sys.argv[1:]``, for ``python -m capyft.conversation``).
        stdin: where the chat reads from (default ``sys.stdin``).
        stdout: where it writes (default ``sys.stdout``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m capyft chat",
        description="Chat with a fine-tuned model in the terminal (/reset, /exit), or answer a JSONL of conversations.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ckpt_path", help="a capyft .ckpt (runs/<name>/version_N/checkpoints/*.ckpt)")
    source.add_argument("--adapter", help="a PEFT adapter folder (runs/<name>/version_N/adapter/best)")
    parser.add_argument("--model", help="base model dir or hub id (alone: chat with the base model)")
    parser.add_argument("--system", help="system prompt (default: the one the run trained with, if any)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--load_in_4bit", type=_bool, help="true/false (default: as trained on GPU, false on CPU)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="weights / compute dtype")
    parser.add_argument("--input", help="JSONL of conversations to answer (batch mode)")
    parser.add_argument("--output", help="JSONL to write the answers to (with --input)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (batch mode)")
    args = parser.parse_args(argv)
    if (args.input is None) != (args.output is None):
        parser.error("--input and --output go together")
    try:
        model, tokenizer, checkpoint = load_for_inference(
            args.ckpt_path, args.adapter, args.model, args.load_in_4bit, args.dtype
        )
        config = generation_config(tokenizer, args.max_new_tokens, args.temperature, args.top_p)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    system = args.system
    if system is None:
        system = (checkpoint.get("datamodule_hyper_parameters") or {}).get("system_prompt")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.input is not None:
        n = predict_file(model, tokenizer, args.input, args.output, config, system, args.batch_size)
        log.info("wrote %d answers to %s", n, args.output)
        return 0
    repl(ChatSession(model, tokenizer, config, system), stdin, stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
