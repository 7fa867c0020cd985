"""The run log: a stage's warnings (an out-of-memory retry, say) go where the stage lines go."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def logged_warnings(log: Callable[[str], None]) -> Iterator[None]:
    """A stage's warnings (an out-of-memory retry, say) go to the run log."""
    handler = _LogHandler(log)
    logging.getLogger("harness").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("harness").removeHandler(handler)


class _LogHandler(logging.Handler):
    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(f"  {record.getMessage()}")
