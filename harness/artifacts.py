"""Files written atomically, and the one JSON convention for numbers that are not finite.

Every file is written to a temporary name beside its target and renamed into place, so a
killed run leaves either the old file or the new one, never half of one; `staged` does the
same for a directory.

JSON has no NaN or infinity. Everywhere the harness writes JSON, a non-finite float becomes
the string "nan", "inf" or "-inf" — the spelling `repr` gives it in CSV cells — and `number`
reads any of those back. `null` is kept for "not computed". (The stage cache is the exception:
`harness.cache` keeps JSON's `NaN` extension, so what it gives back equals what was computed.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Sequence



def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text), "w")


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(data), "wb")


def encode(value: Any) -> Any:
    """A JSON-able copy of `value` with every non-finite float spelled as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


def number(value: Any) -> float | None:
    """A float read back from JSON: "nan", "inf", "-inf" included; None stays None."""
    return None if value is None else float(value)


def json_text(value: Any, indent: int | None = 2) -> str:
    return json.dumps(encode(value), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json_text(value) + "\n")


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text(path, "".join(json_text(row, indent=None) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def content_hash(value: Any) -> str:
    """Stable short hash of a JSON-able value (sorted keys)."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A path in a private temporary directory beside `target`, renamed to `target` when the
    block succeeds; on failure nothing is left behind. If another process wrote `target`
    first, its copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        path = scratch / target.name
        yield path
        try:
            os.replace(path, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
