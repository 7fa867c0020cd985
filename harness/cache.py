"""The content-addressed stage cache: ``<root>/<stage>/<key>/``.

The key hashes exactly the inputs that determine a stage's output. A stage's result is
``result.json``; a chunked stage also keeps one ``unit-NNNNN.json`` per finished work unit
and its ``plan.json``, which is what makes a killed run resumable.

Every entry records the key it was made for and the sha256 of its content, and both are
checked on read: an entry that does not verify (edited, truncated, unreadable, made for
another key) is reported in one line, removed and recomputed — never used, never a crash
on every rerun.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from harness.artifacts import encode, write_json


def _checksum(value: Any) -> str:
    return hashlib.sha256(json.dumps(encode(value), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class StageCache:
    """Verified entries under `root`; `enabled=False` recomputes (and overwrites) every entry."""

    def __init__(self, root: Path, enabled: bool = True, log: Callable[[str], None] = lambda line: None):
        self.root = Path(root)
        self.enabled = enabled
        self.log = log

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def read(self, path: Path, key: str, written_by_this_run: bool = False) -> Any | None:
        """The value stored at `path` for `key`, or None when absent or not verifiable (or when
        the cache is disabled, unless this run wrote the entry)."""
        if not (self.enabled or written_by_this_run) or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            problem = None
            if not isinstance(entry, dict) or not {"key", "sha256", "value"} <= entry.keys():
                problem = "not a cache entry"
            elif entry["key"] != key:
                problem = f"made for key {entry['key']}"
            elif entry["sha256"] != _checksum(entry["value"]):
                problem = "content does not match its checksum"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"unreadable: {type(exc).__name__}"
        if problem:
            self.discard(path, problem)
            return None
        return entry["value"]

    def write(self, path: Path, key: str, value: Any) -> None:
        write_json(path, {"key": key, "sha256": _checksum(value), "value": value})

    def discard(self, path: Path, problem: str) -> None:
        self.log(f"  cache: discarded {path} ({problem}); recomputing it")
        path.unlink(missing_ok=True)

    def get(self, stage: str, key: str) -> Any | None:
        return self.read(self.folder(stage, key) / "result.json", key)

    def put(self, stage: str, key: str, value: Any) -> None:
        self.write(self.folder(stage, key) / "result.json", key, value)

    def unit_path(self, stage: str, key: str, index: int) -> Path:
        return self.folder(stage, key) / f"unit-{index:05d}.json"
