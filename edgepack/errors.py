"""Typed errors. Each maps to one CLI exit code and carries a one-line message naming the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgepackError(Exception):
    """Internal error (exit 1)."""

    exit_code = 1


class BadInputError(EdgepackError):
    """The user's input is wrong: a path, a recipe key, a data file, an EP name (exit 2).

    The message is one line whatever it quotes: a control or other unprintable character from the input (a key
    with a newline, a NUL from a binary file) is shown escaped (`\\n`, `\\x00`)."""

    exit_code = 2

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


def one_line(text: str) -> str:
    """`text` with every unprintable character (newlines, NUL, U+2028, ...) escaped, so it prints as one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class GateFailedError(EdgepackError):
    """A recipe gate failed; the report is still written (exit 3)."""

    exit_code = 3


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
