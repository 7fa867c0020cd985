"""Errors the CLI turns into exit codes: one line, never a traceback."""


class HarnessError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = 3


class InputError(HarnessError):
    """A bad spec, file, model name or criterion: the user must fix an input (exit 2).

    The message is one line naming the file and field, e.g.
    ``specs/x.yaml: dataset.n_samples: must be > 0``.
    """

    exit_code = 2


class RunFailure(HarnessError):
    """Something broke while running a valid spec (exit 3)."""

    exit_code = 3


class Interrupted(HarnessError):
    """Ctrl-C: says where the run stopped and how to resume (exit 130)."""

    exit_code = 130


QUOTE_LIMIT = 200
"""Most characters of user input an error line repeats: a 20 KB expression must not flood it."""


def quoted(text: str) -> str:
    """User input quoted for an error line: repr (a newline stays `\\n`), cut after QUOTE_LIMIT characters."""
    return repr(text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "…")
