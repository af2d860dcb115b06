"""The parser family of every ``python -m capyft`` command: LightningCLI's jsonargparse, one error format, one exit
policy.

``fit``/``validate``/``test``/``predict`` parse through LightningCLI (``capyft.cli.CapyArgumentParser``); ``data``,
``export`` and ``chat`` through :class:`CommandParser`, which reads a command function's typed signature and
docstring (the signature *is* the command line). Both report a bad argument in one line naming the fix and exit with
status 2; a :class:`~capyft.checks.ConfigError` (or another ``ValueError``) raised by a command before it does work
is reported the same way.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser

PACKAGE = Path(__file__).resolve().parent


def raised_by_capyft(err: BaseException) -> bool:
    """Whether capyft raised ``err`` on purpose (its message names the fix), not a library deep down: a
    :class:`~capyft.checks.ConfigError`, or an error whose innermost frame is capyft's own code. ``CAPYFT_TRACEBACK=1``
    makes every error keep its traceback."""
    from capyft.checks import ConfigError

    if os.environ.get("CAPYFT_TRACEBACK"):
        return False
    if isinstance(err, ConfigError):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def one_line(message: str, prog: str) -> str:
    """``error: <message>; `<prog> --help` lists every key``, with jsonargparse's class reprs and whitespace tidied."""
    message = re.sub(r"(?:an? )?<class '(?:[\w.]+\.)?(\w+)'>", r"\1", " ".join(str(message).split()))
    if len(message) > 500:
        message = message[:500] + " ..."
    if message.startswith("unrecognized arguments"):
        message += " (a misspelled or unknown key)"
    return f"error: {message}; `{prog} --help` lists every key\n"


class CommandParser(ArgumentParser):
    """jsonargparse's parser with capyft's one-line errors (exit status 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(one_line(message, self.prog))
        self.exit(2)


def run_command(parser: CommandParser, argv: list[str] | None, command: Callable[..., Any], **extra: Any) -> int:
    """Parses ``argv``, calls ``command`` with the parsed values (plus ``extra``) and returns its exit status.

    A ``ValueError`` (``ConfigError`` included), ``FileNotFoundError`` or ``FileExistsError`` that capyft raised on
    purpose becomes one line and status 2, like a bad argument; a library's own failure keeps its traceback.
    """
    config = parser.parse_args(argv)
    values = {key: value for key, value in config.as_dict().items() if key not in ("config", "__path__")}
    try:
        result = command(**values, **extra)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        if not raised_by_capyft(err):
            raise
        parser.error(str(err))
    return result if isinstance(result, int) else 0
