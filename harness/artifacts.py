"""Atomic artifact writes and the content-addressed stage cache.

Every file is written to a temporary name beside its target and renamed into place, so a
killed run leaves either the old file or the new one, never half of one. The cache holds
stage outputs under ``<cache root>/<stage>/<key>/``, where the key hashes exactly the inputs
that determine the output; chunked stages store one file per work unit there, which is what
makes a killed run resumable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
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


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(_json_safe(value), indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text(path, "".join(json.dumps(_json_safe(row), ensure_ascii=False) + "\n" for row in rows))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def content_hash(value: Any) -> str:
    """Stable short hash of a JSON-able value (sorted keys)."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class StageCache:
    """Content-addressed store of stage outputs; `enabled=False` recomputes (and overwrites)."""

    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Any | None:
        path = self.folder(stage, key) / "result.json"
        return read_json(path) if self.enabled and path.is_file() else None

    def put(self, stage: str, key: str, value: Any) -> None:
        write_json(self.folder(stage, key) / "result.json", value)


def unit_path(cache: StageCache, stage: str, key: str, index: int) -> Path:
    return cache.folder(stage, key) / f"unit-{index:05d}.json"


def compute_units(
    cache: StageCache,
    stage: str,
    key: str,
    units: Sequence[Sequence[int]],
    compute: Callable[[Sequence[int]], list],
    rank: int = 0,
    world: int = 1,
    progress: Callable[[], None] | None = None,
) -> int:
    """Compute the work units this process owns that are not stored yet; return how many were reused.

    Unit ``i`` belongs to process ``i % world``. Each finished unit is one file, so a killed
    run loses at most the unit in flight, and a rerun with any number of processes picks
    up the same files (the unit plan depends on the inputs only, never on the process count).
    """
    reused = 0
    for index, unit in enumerate(units):
        if index % world != rank:
            continue
        path = unit_path(cache, stage, key, index)
        if cache.enabled and path.is_file():
            reused += 1
        else:
            write_json(path, compute(unit))
        if progress:
            progress()
    return reused


def gather_units(cache: StageCache, stage: str, key: str, n_units: int) -> list:
    """All units' results, in unit order (after every process finished its share)."""
    return [item for index in range(n_units) for item in read_json(unit_path(cache, stage, key, index))]
