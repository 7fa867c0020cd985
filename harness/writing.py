"""Where a run writes: checked before any stage runs, and a full disk reported as one line
naming the path (an OSError from `write()` names no file).

Imports no torch: the CLI checks the runs dir before it loads anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from harness.errors import InputError

OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT)
"""Write failures the machine causes, not the code: the user must free space or write elsewhere."""


def check_writable_folder(path: Path, field: str) -> None:
    """Raise InputError unless `path` is a folder this process can write in, or can be created
    (its nearest existing ancestor is a writable folder). Creates nothing.

    `field` names the setting in the error line, e.g. `--runs-dir`.
    """
    path = Path(path)
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    which = "it" if existing == path else f"its ancestor '{existing}'"
    if not existing.is_dir():
        raise InputError(f"{path}: {field}: {which} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # as root too: a read-only mount fails here
        raise InputError(f"{path}: {field}: {which} is not writable")


@contextlib.contextmanager
def disk_errors_named(path: Path) -> Iterator[None]:
    """Inside the block, a full disk or quota (ENOSPC, EDQUOT) becomes one InputError line
    naming the file (or `path` when the OSError does not say which) and what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in OUT_OF_ROOM:
            raise
        raise InputError(
            f"{exc.filename or path}: {os.strerror(exc.errno)} while writing; free space there or write elsewhere"
        ) from None
