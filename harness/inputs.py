"""The one bounded reader: every file a spec names, and every run-folder file the CLI reads.

A spec names files (a dataset, direction tensors, a report template, specs it extends), and the
CLI reads files of finished runs (stats.json, criteria.json, ...). Any of them may be a FIFO, a
device, a 300 MB file of NUL bytes, one 20 MB line or a tensor whose header lies. Every read goes
through here, so each is bounded the same way and fails in one line naming file and field:

- **regular files only**: `open_input` stats the path (a symlink is followed to what it names),
  opens it without blocking and checks the open file again, so a folder, FIFO, socket or device
  is refused before a byte is read, and a file swapped for a FIFO in between as well;
- **size limits per kind** (`LIMITS`, one `Limits` per `Kind`; the README's table lists them):
  the file's size, one line's (or row's) bytes, the number of lines, a tensor's bytes;
- **streaming hash of the bytes used**: `InputFile.sha256` is the sha256 of exactly the bytes
  read so far through that handle, so a cache key made from it describes the rows actually used,
  read once (a file edited between a hash and a second read cannot cache new rows under an old hash);
- **lines and rows bounded before any tokenizer sees one**: `InputFile.lines()` reads at most
  the line limit (+1 byte) per line and stops at the row limit, decoding each line as UTF-8
  (a bad byte or a NUL byte is one line naming the file's line number);
- **tensor headers before data**: `tensor_file` reads a safetensors, `.npy` or `.pt` file's
  names, dtypes and shapes without reading tensor data (`.npy`: its header, checked against the
  file's size; `.pt`: `torch.load(mmap=True, weights_only=True)`, which maps rather than reads);
  `TensorFile.load` then reads one tensor after the caller's own shape check passed.

Errors are `InputError` (exit 2): ``f"{where}: {problem}"``, where `where` is what the caller
passes to name the file and field (``"spec.yaml: dataset.path: data.jsonl"``; default: the path).

    with open_input(path, "dataset", where) as file:
        for number, line in file.lines():     # 1-based line number, text without its line ending
            ...
        key = file.sha256                     # of the bytes read above, no second read

    text = read_text(path, "template", where)           # whole file, bounded, UTF-8
    stats = read_json(run / "stats.json", expect=dict)  # kind "run_json"; a list is one error line
    tensors = tensor_file(path, where)                  # header only
    shape = tensors.shapes[name]; check(shape); tensor = tensors.load(name)

Imports no torch at module level: validation reads headers and texts without it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.errors import InputError

Kind = Literal["dataset", "directions", "template", "spec", "run_json", "model_config"]
"""What a file is to the harness; its limits are `LIMITS[kind]`."""

KiB, MiB, GiB = 2**10, 2**20, 2**30


@dataclass(frozen=True)
class Limits:
    """The most a file of one kind may hold; None: no limit of that sort."""

    max_bytes: int
    """The file's size."""
    max_line_bytes: int | None = None
    """One line (`InputFile.lines`) or one row of a table, in bytes with its line ending."""
    max_lines: int | None = None
    """Lines (rows) read from one file: reading stops with an error past it."""
    max_tensor_bytes: int | None = None
    """One tensor read from a tensor file (its header's shape × dtype size)."""


LIMITS: dict[str, Limits] = {
    # prompts and responses: n_samples is at most 10,000, so a million rows leave room for filters
    "dataset": Limits(max_bytes=256 * MiB, max_line_bytes=1 * MiB, max_lines=1_000_000),
    # a [layers, d_model] direction is a few MB; the file may hold other, larger tensors (never read)
    "directions": Limits(max_bytes=64 * GiB, max_tensor_bytes=256 * MiB),
    "template": Limits(max_bytes=1 * MiB, max_line_bytes=64 * KiB),
    # a spec file or a file it extends
    "spec": Limits(max_bytes=1 * MiB),
    # stats.json, criteria.json, manifest.json, sweep.json of a run folder
    "run_json": Limits(max_bytes=64 * MiB),
    # a model folder's config.json (real ones are a few KB)
    "model_config": Limits(max_bytes=4 * MiB),
}
"""Per kind of file, its limits: the README's table "Input limits" lists these values."""

CHUNK = 1 * MiB
"""Bytes read at a time by `InputFile.read`."""


def size_words(n_bytes: int) -> str:
    """A size as an error line says it: `1 MiB`, `286.1 MiB`, `37 bytes`."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n_bytes >= unit:
            return f"{n_bytes // unit} {name}" if n_bytes % unit == 0 else f"{n_bytes / unit:.1f} {name}"
    return f"{n_bytes} bytes"


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def check_regular(path: Path, where: str | None = None) -> os.stat_result:
    """`path`'s stat when it names (perhaps through symlinks) a regular file; else InputError."""
    where = where or str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{where}: file not found") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot be read ({exc.strerror})") from None
    problem = _not_regular(info.st_mode)
    if problem:
        raise InputError(f"{where}: {problem}")
    return info


class InputFile:
    """An open regular file, read within its kind's limits; `sha256` is of the bytes read so far.

    Made by `open_input`; use it as a context manager (it closes the file)."""

    def __init__(self, path: Path, kind: Kind, where: str, handle: io.BufferedReader, size: int):
        self.path = path
        self.kind = kind
        self.where = where
        self.limits = LIMITS[kind]
        self.size = size
        """The file's size when it was opened."""
        self._handle = handle
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def __enter__(self) -> InputFile:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    @property
    def sha256(self) -> str:
        """Hex sha256 of exactly the bytes read so far through this handle."""
        return self._hash.hexdigest()

    def _took(self, data: bytes) -> bytes:
        self.bytes_read += len(data)
        if self.bytes_read > self.limits.max_bytes:  # the file grew after it was opened
            raise self.error(f"is larger than the {size_words(self.limits.max_bytes)} a {self.kind} file may have")
        self._hash.update(data)
        return data

    def error(self, problem: str) -> InputError:
        """An InputError about this file: `where: problem`."""
        return InputError(f"{self.where}: {problem}")

    def _read(self, read, *args) -> bytes:
        try:
            return read(*args)
        except OSError as exc:  # EIO and the like: a file that stats as regular but does not read
            raise self.error(f"cannot be read ({exc.strerror or type(exc).__name__})") from None

    def read(self) -> bytes:
        """The rest of the file (at most the kind's `max_bytes`), hashed as it is read."""
        parts = []
        while chunk := self._read(self._handle.read, CHUNK):
            parts.append(self._took(chunk))
        return b"".join(parts)

    def lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, the line decoded as UTF-8 without its `\\n` or `\\r\\n`), each
        line at most the kind's `max_line_bytes` and at most `max_lines` of them; a longer line,
        one more line, a NUL byte or bytes that are not UTF-8 is an error naming the line."""
        limit, most = self.limits.max_line_bytes, self.limits.max_lines
        number = 0
        while True:
            raw = self._read(self._handle.readline, -1 if limit is None else limit + 1)
            if not raw:
                return
            number += 1
            if limit is not None and len(raw) > limit:
                raise self.error(f"line {number}: longer than the {size_words(limit)} a line of a {self.kind} file may have")
            if most is not None and number > most:
                raise self.error(f"more than the {most:,} lines a {self.kind} file may have")
            self._took(raw)
            yield number, decode_line(raw, self.where, number)


def decode_line(raw: bytes, where: str, number: int) -> str:
    """One line's bytes as text, line ending removed; a NUL byte or invalid UTF-8 is an InputError."""
    if b"\0" in raw:
        raise InputError(f"{where}: line {number}: contains a NUL byte (a binary file, not text)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: line {number}: not UTF-8 (byte {exc.start + 1} of the line is {raw[exc.start]:#04x})") from None
    return text.removesuffix("\n").removesuffix("\r")


def open_input(path: str | Path, kind: Kind, where: str | None = None) -> InputFile:
    """Open a regular file of `kind` for bounded reading; InputError (naming `where`, default the
    path) when it is missing, unreadable, not a regular file or over the kind's size limit."""
    path = Path(path)
    where = where or str(path)
    check_regular(path, where)  # before open: opening a device may itself do something
    try:  # O_NONBLOCK: a path swapped for a FIFO since the stat must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{where}: cannot be read ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        problem = _not_regular(info.st_mode)
        if problem:
            raise InputError(f"{where}: {problem}")
        limit = LIMITS[kind].max_bytes
        if info.st_size > limit:
            raise InputError(f"{where}: is {size_words(info.st_size)}, more than the {size_words(limit)} a {kind} file may have")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return InputFile(path, kind, where, handle, info.st_size)


def read_bytes(path: str | Path, kind: Kind, where: str | None = None) -> tuple[bytes, str]:
    """The whole file (bounded) and the sha256 of those bytes."""
    with open_input(path, kind, where) as file:
        return file.read(), file.sha256


def read_text(path: str | Path, kind: Kind, where: str | None = None) -> str:
    """The whole file as UTF-8 text (bounded); invalid UTF-8 or a NUL byte is one line naming the line."""
    data, _ = read_bytes(path, kind, where)
    return decode_text(data, where or str(path))


def decode_text(data: bytes, where: str) -> str:
    """`data` as UTF-8 text; a bad byte or a NUL byte is an InputError naming its line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{where}: line {number}: not UTF-8 (byte {data[exc.start]:#04x})") from None
    if "\0" in text:
        raise InputError(f"{where}: line {text.count(chr(10), 0, text.index(chr(0))) + 1}: contains a NUL byte (a binary file, not text)")
    return text


def read_json(path: str | Path, kind: Kind = "run_json", where: str | None = None, expect: type | None = None) -> Any:
    """A JSON file (bounded; `NaN`/`Infinity` refused as JSON does); with `expect` (dict or list)
    a value of another type is an InputError saying what it holds instead."""
    where = where or str(path)
    text = read_text(path, kind, where)
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be read") from None
    if expect is not None and not isinstance(value, expect):
        words = {dict: "a mapping", list: "a list"}
        raise InputError(f"{where}: holds {_json_type(value)}, expected {words.get(expect, expect.__name__)}")
    return value


def _refuse_constant(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _json_type(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


# --- tensor files: the header first, the data only for the tensor asked for --------------------

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")


@dataclass
class TensorFile:
    """A tensor file's table of contents, read without its data: `load` reads one tensor."""

    path: Path
    where: str
    shapes: dict[str | None, tuple[int, ...]]
    """Tensor name → shape (None: a file's only, unnamed tensor: `.npy`, or a bare tensor in `.pt`)."""
    dtypes: dict[str | None, str]
    """Tensor name → dtype as the file names it (`F32`, `float32`, `torch.float32`)."""
    metadata: dict[str, str]
    """The file's own metadata (safetensors' `__metadata__`; empty for the others)."""
    floating: dict[str | None, bool]
    """Tensor name → whether its values are floating point."""
    _loaded: dict = field(default_factory=dict, repr=False)
    """`.pt`: the mmapped tensors torch.load returned (nothing is read until used)."""

    def load(self, name: str | None):
        """The tensor `name` as a torch tensor in memory (its bytes within the directions limit)."""
        import numpy as np
        import torch

        n_bytes = math.prod(self.shapes[name]) * _itemsize(self.dtypes[name])
        limit = LIMITS["directions"].max_tensor_bytes
        if limit is not None and n_bytes > limit:
            which = "its tensor" if name is None else f"tensor {name!r}"
            raise InputError(f"{self.where}: {which} of shape {list(self.shapes[name])} is {size_words(n_bytes)}, "
                             f"more than the {size_words(limit)} a direction may have")
        try:
            suffix = self.path.suffix.lower()
            if suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(self.path), "pt") as handle:
                    return handle.get_tensor(name)
            if suffix == ".npy":
                return torch.from_numpy(np.array(np.load(self.path, mmap_mode="r", allow_pickle=False)))
            return self._loaded[name].clone()
        except InputError:
            raise
        except Exception as exc:  # a file damaged past its header
            raise InputError(f"{self.where}: cannot be read ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _itemsize(dtype: str) -> int:
    import numpy as np

    if dtype in _ITEMSIZE:
        return _ITEMSIZE[dtype]
    if dtype.startswith("torch."):
        import torch

        return getattr(torch, dtype.removeprefix("torch.")).itemsize
    return np.dtype(dtype).itemsize


def tensor_file(path: str | Path, where: str | None = None) -> TensorFile:
    """The names, shapes and dtypes of a safetensors, `.npy` or `.pt` file, its data unread.

    The file is checked like any input (regular, within the directions size limit); an `.npy`
    header whose shape does not match the file's size, an object (pickle) dtype, or a file its
    reader cannot parse is one InputError line."""
    path = Path(path)
    where = where or str(path)
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise InputError(f"{where}: not a .safetensors, .pt or .npy file")
    open_input(path, "directions", where).close()  # regular, readable, within the size limit
    try:
        if suffix == ".safetensors":
            return _safetensors_contents(path, where)
        if suffix == ".npy":
            return _npy_contents(path, where)
        return _pt_contents(path, where)
    except InputError:
        raise
    except Exception as exc:  # a damaged or foreign file fails in its reader's own way: one line, whatever it is
        raise InputError(f"{where}: cannot be read ({_first_line(exc)})") from None


def _safetensors_contents(path: Path, where: str) -> TensorFile:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:  # parses and checks the header only
        names = list(handle.keys())
        slices = {name: handle.get_slice(name) for name in names}
        shapes = {name: tuple(slices[name].get_shape()) for name in names}
        dtypes = {name: slices[name].get_dtype() for name in names}
        metadata = dict(handle.metadata() or {})
    floating = {name: dtypes[name].startswith(("F", "BF")) for name in names}
    return TensorFile(path, where, shapes, dtypes, metadata, floating)


def _npy_contents(path: Path, where: str) -> TensorFile:
    import numpy as np

    with path.open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle, max_header_size=10_000)
        offset = handle.tell()
    if dtype.hasobject:
        raise InputError(f"{where}: holds Python objects (a pickle), not numbers")
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise InputError(f"{where}: its header says shape {list(shape)} of {dtype} ({size_words(expected)} with the header), "
                         f"the file has {size_words(actual)}")
    return TensorFile(path, where, {None: tuple(shape)}, {None: str(dtype)}, {}, {None: dtype.kind == "f"})


def _pt_contents(path: Path, where: str) -> TensorFile:
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no pickle code, data mapped
    tensors = loaded if isinstance(loaded, dict) else {None: loaded}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            which = "it" if name is None else repr(name)
            raise InputError(f"{where}: {which} holds a {type(tensor).__name__}, not a tensor")
    return TensorFile(path, where, {name: tuple(t.shape) for name, t in tensors.items()},
                      {name: str(t.dtype) for name, t in tensors.items()}, {},
                      {name: t.is_floating_point() for name, t in tensors.items()}, tensors)
