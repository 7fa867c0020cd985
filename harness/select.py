"""Selecting by name. `-k`, as pytest's: words match as substrings of a name; `and`, `or`, `not`, ().
`harness run -k` matches spec file names; the pytest plugin matches node ids with it where
pytest's own `-k` grammar cannot (a matrix value such as `temperature=0.7`).

A statistic pattern (`harness ls stats ... PATTERN`, `harness compare --stat PATTERN`) is a glob
when it has `*`, `?` or `[`, and a substring otherwise.
"""

from __future__ import annotations

import fnmatch
import re

from harness.errors import InputError


def keyword_matches(name: str, expression: str) -> bool:
    """Whether `expression` selects `name` (a spec file name, a node id)."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if peek() is None:
            raise InputError(f"-k: incomplete expression {expression!r}")
        position += 1
        return tokens[position - 1]

    def either() -> bool:
        value = both()
        while peek() == "or":
            take()
            value = both() or value
        return value

    def both() -> bool:
        value = single()
        while peek() == "and":
            take()
            value = single() and value
        return value

    def single() -> bool:
        token = take()
        if token == "not":
            return not single()
        if token == "(":
            value = either()
            if take() != ")":
                raise InputError(f"-k: unbalanced parentheses in {expression!r}")
            return value
        if token in ("and", "or", ")"):
            raise InputError(f"-k: unexpected {token!r} in {expression!r}")
        return token in name

    value = either()
    if peek() is not None:
        raise InputError(f"-k: unexpected {peek()!r} in {expression!r}")
    return value


GLOB_CHARACTERS = "*?["
PATTERN_HELP = "a glob if it has * ? or [ (e.g. 'smoothness.overall.*'), else a substring (e.g. ci_low)"


def pattern_matches(name: str, pattern: str) -> bool:
    """Whether the statistic pattern `pattern` selects `name` (case-sensitive, as names are)."""
    if any(char in pattern for char in GLOB_CHARACTERS):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name

