"""Exit codes and the errors the CLI turns into them: one line, never a traceback."""

from enum import IntEnum


class ExitCode(IntEnum):
    """pytest-style exit codes of `harness` commands (`meaning` says each one's)."""

    PASSED = 0
    FAILED = 1
    INPUT = 2
    RUNTIME = 3
    INTERRUPTED = 130
    TERMINATED = 143

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.PASSED: "every criterion passed (or the command succeeded)",
    ExitCode.FAILED: "some criterion failed: a finding about the model, not an error",
    ExitCode.INPUT: "bad input or usage: one line naming the file and field, before anything runs",
    ExitCode.RUNTIME: "something broke while running a valid spec",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C): run the same command again to resume",
    ExitCode.TERMINATED: "terminated (SIGTERM: a timeout, a scheduler): run it again to resume",
}


class HarnessError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = ExitCode.RUNTIME


class InputError(HarnessError):
    """A bad spec, file, model name or criterion: the user must fix an input (exit 2).

    The message is one line naming the file and field, e.g.
    ``specs/x.yaml: dataset.n_samples: must be > 0``.
    """

    exit_code = ExitCode.INPUT


class RunFailure(HarnessError):
    """Something broke while running a valid spec (exit 3)."""

    exit_code = ExitCode.RUNTIME


class Interrupted(HarnessError):
    """Ctrl-C or SIGTERM: says where the run stopped and how to resume (exit 130 or 143)."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code


QUOTE_LIMIT = 200
"""Most characters of user input an error line repeats: a 20 KB expression must not flood it."""


def quoted(text: str) -> str:
    """User input quoted for an error line: repr (a newline stays `\\n`), cut after QUOTE_LIMIT characters."""
    return repr(text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "…")
