"""Where a run writes: checked before any stage runs, and a full disk reported as one line
naming the path (an OSError from `write()` names no file).

Imports no torch: the CLI checks the runs dir before it loads anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.errors import InputError

OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT)
"""Write failures the machine causes, not the code: the user must free space or write elsewhere."""


def check_writable_folder(path: Path, field: str) -> None:
    """Raise InputError unless `path` is a folder this process can write in, or can be created
    (its nearest existing ancestor is a writable folder), tried by making and removing an empty
    folder there. Leaves nothing behind.

    `field` names the setting in the error line, e.g. `--runs-dir`.
    """
    path = Path(path)
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    which = "it" if existing == path else f"its ancestor '{existing}'"
    if not existing.is_dir():
        raise InputError(f"{path}: {field}: {which} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # as root too: a read-only mount fails here
        raise InputError(f"{path}: {field}: {which} is not writable")
    try:  # for real: root passes os.access on /proc, which takes no new folder
        os.rmdir(tempfile.mkdtemp(prefix=".harness-write-check-", dir=existing))
    except OSError as exc:
        raise InputError(f"{path}: {field}: {which} takes no new folder ({exc.strerror})") from None


def check_output_file(path: Path, field: str, force: bool) -> None:
    """A file a command writes where the user says (`-o FILE`): its folder must exist (nothing
    creates folders the user did not name), it must not lie inside a run folder (a run's files
    are its record), and an existing file is replaced only with `--force`."""
    from harness.rundir import enclosing_run_folder

    path = Path(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InputError(f"{path}: {field}: folder '{parent}' does not exist (create it first: nothing here creates folders)")
    run = enclosing_run_folder(path)
    if run is not None:
        raise InputError(f"{path}: {field}: inside the run folder '{run}'; write it elsewhere (a run's files are its record)")
    if os.path.lexists(path) and not path.is_file():
        raise InputError(f"{path}: {field}: exists and is not a regular file")
    if os.path.lexists(path) and not force:
        raise InputError(f"{path}: {field}: exists; pass --force to replace it")


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
