"""Typed errors. Each maps to one CLI exit code and carries a one-line message naming the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgepackError(Exception):
    """Internal error (exit 1)."""

    exit_code = 1


class BadInputError(EdgepackError):
    """The user's input is wrong: a path, a recipe key, a data file, an EP name (exit 2)."""

    exit_code = 2


class GateFailedError(EdgepackError):
    """A recipe gate failed; the report is still written (exit 3)."""

    exit_code = 3


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
