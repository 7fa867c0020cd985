"""The content-addressed stage cache: ``<root>/<stage>/<key>/``.

The key hashes exactly the inputs that determine a stage's output. A stage's result is
``result.json``; a chunked stage also keeps one ``unit-NNNNN.json`` per finished work unit
and its ``plan.json``, which is what makes a killed run resumable. Entries are JSON with its
`NaN`/`Infinity` extension, which only the harness reads: a non-finite float comes back a float,
so a reused output is the computed one (`artifacts.encode` would give back the strings "nan" and
"inf", which a text such as a token can also be).

Every entry records the key it was made for and the sha256 of its content, and both are
checked on read: an entry that does not verify (edited, truncated, unreadable, made for
another key) is reported in one line, removed and recomputed — never used, never a crash
on every rerun.

The cache is trusted only as far as its folder. The root is what the user named
(`HARNESS_CACHE_DIR`, default `<runs dir>/.cache`); below it, every folder is opened one
component at a time without following symlinks, so a stage or key folder replaced by a symlink
is refused in one line (`InputError`) instead of being written through, and an entry file is
read and written with `O_NOFOLLOW` (a symlinked entry is discarded, never followed). A
checksum proves only that an entry is intact, not who wrote it: anyone who can write in a
shared cache can plant an entry with a matching sha256. With `HARNESS_CACHE_KEY` set, every
entry also carries an HMAC-SHA256 of its key and checksum under that secret, and an entry
without a valid one is discarded and recomputed.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable

from harness.artifacts import encode
from harness.errors import InputError

ROOT_VARIABLE = "HARNESS_CACHE_DIR"
"""Environment variable naming the cache root; unset or empty: `<runs dir>/.cache`."""
SECRET_VARIABLE = "HARNESS_CACHE_KEY"
"""Environment variable holding the per-cache secret that signs entries (optional)."""


def cache_root(runs_dir: Path) -> Path:
    """The cache root: `HARNESS_CACHE_DIR`, or `<runs dir>/.cache` when it is unset or empty
    (an empty value must not put the cache in the working directory)."""
    return Path(os.environ.get(ROOT_VARIABLE) or Path(runs_dir) / ".cache")


def _checksum(value: Any) -> str:
    return hashlib.sha256(json.dumps(encode(value), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _signature(secret: bytes, key: str, checksum: str) -> str:
    return hmac.new(secret, f"{key}\0{checksum}".encode(), hashlib.sha256).hexdigest()


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class StageCache:
    """Verified entries under `root`; `enabled=False` recomputes (and overwrites) every entry.

    `secret`: signs and checks entries (default: `HARNESS_CACHE_KEY` when set)."""

    def __init__(self, root: Path, enabled: bool = True, log: Callable[[str], None] = lambda line: None,
                 secret: bytes | None = None):
        self.root = Path(root)
        self.enabled = enabled
        self.log = log
        if secret is None and os.environ.get(SECRET_VARIABLE):
            secret = os.environ[SECRET_VARIABLE].encode()
        self.secret = secret

    def _parts(self, path: Path) -> tuple[str, ...]:
        try:
            parts = Path(path).relative_to(self.root).parts
        except ValueError:
            raise ValueError(f"{path} is not inside the cache {self.root}") from None
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{path}: not a plain path inside the cache")
        return parts

    def folder(self, stage: str, key: str) -> Path:
        """`<root>/<stage>/<key>/`, created, each component checked; a symlink anywhere in it
        (an entry or a side folder such as activations/) is refused in one line."""
        fd = _open_folder(self.root, (stage, key), create=True)
        try:
            _refuse_links(self.root, fd, self.root / stage / key)
        finally:
            os.close(fd)
        return self.root / stage / key

    # --- entries ---------------------------------------------------------------------------------

    def read(self, path: Path, key: str, written_by_this_run: bool = False) -> Any | None:
        """The value stored at `path` for `key`, or None when absent or not verifiable (or when
        the cache is disabled, unless this run wrote the entry)."""
        if not (self.enabled or written_by_this_run):
            return None
        *folder, name = self._parts(path)
        fd = _open_folder(self.root, tuple(folder), create=False)
        if fd is None:
            return None
        try:
            problem, entry = _load(fd, name)
        finally:
            os.close(fd)
        if problem is None and entry is None:
            return None
        if problem is None:
            problem = self._problem(entry, key)
        if problem:
            self.discard(path, problem)
            return None
        return entry["value"]

    def _problem(self, entry: Any, key: str) -> str | None:
        if not isinstance(entry, dict) or not {"key", "sha256", "value"} <= entry.keys():
            return "not a cache entry"
        if entry["key"] != key:
            return f"made for key {entry['key']}"
        if entry["sha256"] != _checksum(entry["value"]):
            return "content does not match its checksum"
        if self.secret is not None and not (
            isinstance(entry.get("hmac"), str) and hmac.compare_digest(entry["hmac"], _signature(self.secret, key, entry["sha256"]))
        ):
            return f"not signed with {SECRET_VARIABLE}"
        return None

    def write(self, path: Path, key: str, value: Any) -> None:
        """Write the entry atomically (a temporary file, then a rename) in a checked folder,
        never through a symlink."""
        checksum = _checksum(value)
        entry = {"key": key, "sha256": checksum, "value": value}
        if self.secret is not None:
            entry["hmac"] = _signature(self.secret, key, checksum)
        data = (json.dumps(entry, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        *folder, name = self._parts(path)
        fd = _open_folder(self.root, tuple(folder), create=True)
        temporary = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            file = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                           0o600, dir_fd=fd)
            try:
                with os.fdopen(file, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)  # replaces a link, never follows it
            except BaseException:
                try:
                    os.unlink(temporary, dir_fd=fd)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

    def discard(self, path: Path, problem: str) -> None:
        self.log(f"  cache: discarded {path} ({problem}); recomputing it")
        *folder, name = self._parts(path)
        fd = _open_folder(self.root, tuple(folder), create=False)
        if fd is None:
            return
        try:
            os.unlink(name, dir_fd=fd)  # a symlink itself, not what it names
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def get(self, stage: str, key: str) -> Any | None:
        return self.read(self.root / stage / key / "result.json", key)

    def put(self, stage: str, key: str, value: Any) -> None:
        self.write(self.root / stage / key / "result.json", key, value)

    def unit_path(self, stage: str, key: str, index: int) -> Path:
        return self.root / stage / key / f"unit-{index:05d}.json"


# --- folders: one component at a time, never through a symlink --------------------------------


def _open_folder(root: Path, parts: tuple[str, ...], create: bool) -> int | None:
    """A file descriptor of root/parts (created when `create`), or None when a part is
    missing; every component below the root is opened with O_NOFOLLOW."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    walked = root
    try:
        for part in parts:
            walked = walked / part
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                inner = os.open(part, _DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError as exc:
                raise _refused(root, walked, fd, part, exc) from None
            os.close(fd)
            fd = inner
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    return fd

def _refused(root: Path, path: Path, parent_fd: int, part: str, exc: OSError) -> InputError:
    try:
        mode = os.lstat(part, dir_fd=parent_fd).st_mode
    except OSError:
        mode = 0
    what = "is a symbolic link" if stat.S_ISLNK(mode) else "is not a folder" if mode else f"cannot be opened ({exc.strerror})"
    return InputError(f"{path}: {what}; the stage cache follows no link below {root} "
                      "(remove it, or use a cache only you can write)")

def _refuse_links(root: Path, fd: int, path: Path) -> None:
    for entry in os.scandir(fd):
        if entry.is_symlink():
            raise InputError(f"{path / entry.name}: is a symbolic link; the stage cache follows no link below "
                             f"{root} (remove it, or use a cache only you can write)")
        if entry.is_dir(follow_symlinks=False):
            inner = os.open(entry.name, _DIRECTORY, dir_fd=fd)
            try:
                _refuse_links(root, inner, path / entry.name)
            finally:
                os.close(inner)

def _load(fd: int, name: str) -> tuple[str | None, Any]:
    """(problem, entry): (None, None) when there is no entry."""
    try:
        file = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return ("a symbolic link" if exc.errno == errno.ELOOP else f"unreadable: {exc.strerror}"), None
    with os.fdopen(file, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return "not a regular file", None
        try:
            return None, json.loads(handle.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            return f"unreadable: {type(exc).__name__}", None
