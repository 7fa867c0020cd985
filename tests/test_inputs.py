"""harness.inputs, the one bounded reader: what it refuses, in one line, and what it hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness.errors import InputError
from harness.inputs import LIMITS, Limits, open_input, read_json, read_text, tensor_file

WHERE = "spec.yaml: dataset.path"


def refused(call, *parts: str) -> str:
    """The one-line InputError `call` raises; it names WHERE and each of `parts`."""
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{WHERE}: "), message
    assert all(part in message for part in parts), message
    return message


def lines_of(path, kind="dataset") -> list[tuple[int, str]]:
    with open_input(path, kind, WHERE) as file:
        return list(file.lines())


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.mkdir(), "is a folder, not a file"),
    (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
    (lambda p: p.symlink_to("/dev/null"), "is a device, not a regular file"),
    (lambda p: p.symlink_to(p.parent / "nowhere"), "file not found"),
], ids=["folder", "fifo", "symlink-to-device", "dangling-symlink"])
def test_only_regular_files_are_opened(tmp_path, make, problem):
    path = tmp_path / "data.txt"
    make(path)
    refused(lambda: open_input(path, "dataset", WHERE), problem)


def test_a_symlink_to_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "data.txt").symlink_to(tmp_path / "pipe")
    refused(lambda: open_input(tmp_path / "data.txt", "dataset", WHERE), "FIFO")


def test_a_file_over_its_kinds_size_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setitem(LIMITS, "dataset", Limits(max_bytes=100))
    path = tmp_path / "data.txt"
    path.write_bytes(b"x" * 101)
    refused(lambda: open_input(path, "dataset", WHERE), "is 101 bytes, more than the 100 bytes a dataset file may have")


def test_lines_are_decoded_without_their_endings_and_numbered(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes("first\r\nsecond é\n\nlast".encode())
    assert lines_of(path) == [(1, "first"), (2, "second é"), (3, ""), (4, "last")]


def test_the_hash_is_of_exactly_the_bytes_read(tmp_path):
    path = tmp_path / "data.txt"
    content = b"one\ntwo\nthree\n"
    path.write_bytes(content)
    with open_input(path, "dataset", WHERE) as file:
        lines = file.lines()
        next(lines)
        assert file.sha256 == hashlib.sha256(b"one\n").hexdigest()
        list(lines)
        assert file.sha256 == hashlib.sha256(content).hexdigest()
    with open_input(path, "spec", WHERE) as file:
        assert file.read() == content and file.sha256 == hashlib.sha256(content).hexdigest()


def test_a_line_over_the_limit_is_refused_after_reading_only_the_limit(tmp_path):
    path = tmp_path / "data.txt"
    limit = LIMITS["dataset"].max_line_bytes
    path.write_bytes(b"ok\n" + b"a" * (limit * 3))
    with open_input(path, "dataset", WHERE) as file:
        refused(lambda: list(file.lines()), "line 2: longer than the 1 MiB a line of a dataset file may have")
        assert file.bytes_read == 3  # the long line was never taken in whole


def test_more_lines_than_the_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(LIMITS, "dataset", Limits(max_bytes=1000, max_line_bytes=100, max_lines=3))
    path = tmp_path / "data.txt"
    path.write_text("a\nb\nc\nd\n")
    refused(lambda: lines_of(path), "more than the 3 lines a dataset file may have")


@pytest.mark.parametrize("content, problem", [
    (b"fine\ncaf\xe9\n", "line 2: not UTF-8 (byte 4 of the line is 0xe9)"),
    (b"fine\n\0\0\0\0", "line 2: contains a NUL byte"),
], ids=["latin1", "nul"])
def test_bad_text_names_its_line(tmp_path, content, problem):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    refused(lambda: lines_of(path), problem)
    refused(lambda: read_text(path, "template", WHERE), problem.split(" (")[0])


def test_read_json_says_what_a_file_holds_instead(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("[1, 2]")
    refused(lambda: read_json(path, where=WHERE, expect=dict), "holds a list, expected a mapping")
    path.write_text('{"a": NaN}')
    refused(lambda: read_json(path, where=WHERE), "not valid JSON (line 1")
    path.write_text("{" * 100_000)
    refused(lambda: read_json(path, where=WHERE), "not valid JSON")
    path.write_text('{"d": 0.5}')
    assert read_json(path, where=WHERE, expect=dict) == {"d": 0.5}


# --- tensor files ----------------------------------------------------------------------------


def test_safetensors_contents_come_from_the_header_and_load_reads_one_tensor(tmp_path):
    path = tmp_path / "probe.safetensors"
    save_file({"direction": torch.ones(3, 4), "other": torch.zeros(2, dtype=torch.int64)}, str(path), metadata={"a": "b"})
    contents = tensor_file(path, WHERE)
    assert contents.shapes == {"direction": (3, 4), "other": (2,)}
    assert contents.floating == {"direction": True, "other": False}
    assert contents.metadata == {"a": "b"}
    assert torch.equal(contents.load("direction"), torch.ones(3, 4))


def test_npy_header_is_checked_against_the_file_size(tmp_path):
    path = tmp_path / "probe.npy"
    np.save(path, np.ones((3, 4), dtype=np.float32))
    assert tensor_file(path, WHERE).shapes == {None: (3, 4)}
    with path.open("r+b") as handle:  # a header that claims far more data than the file has
        header = handle.read(128)
        handle.seek(0)
        handle.write(header.replace(b"(3, 4)", b"(3, 9)"))
    refused(lambda: tensor_file(path, WHERE), "its header says shape [3, 9] of float32")


def test_a_sparse_npy_that_lies_is_refused_on_its_header(tmp_path):
    """4 GiB of holes behind a header for a [1, 4] array: the header is all that is read."""
    path = tmp_path / "probe.npy"
    np.save(path, np.ones((1, 4), dtype=np.float32))
    with path.open("r+b") as handle:
        handle.truncate(4 * 2**30)
    refused(lambda: tensor_file(path, WHERE), "its header says shape [1, 4]", "the file has 4 GiB")


def test_an_object_npy_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "probe.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(lambda: tensor_file(path, WHERE), "holds Python objects (a pickle)")


def test_pt_files_are_mapped_with_weights_only(tmp_path):
    path = tmp_path / "probe.pt"
    torch.save({"direction": torch.ones(3, 4)}, path)
    contents = tensor_file(path, WHERE)
    assert contents.shapes == {"direction": (3, 4)}
    assert torch.equal(contents.load("direction"), torch.ones(3, 4))
    path.write_bytes(pickle.dumps(os.getcwd))  # code, not tensors
    refused(lambda: tensor_file(path, WHERE), "cannot be read")


def test_a_tensor_over_the_limit_is_not_loaded(tmp_path, monkeypatch):
    path = tmp_path / "probe.safetensors"
    save_file({"direction": torch.ones(64, 64)}, str(path))
    monkeypatch.setitem(LIMITS, "directions", Limits(max_bytes=2**20, max_tensor_bytes=1024))
    refused(lambda: tensor_file(path, WHERE).load("direction"), "shape [64, 64] is 16 KiB, more than the 1 KiB")


def test_other_suffixes_are_refused(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps([1.0]))
    refused(lambda: tensor_file(path, WHERE), "not a .safetensors, .pt or .npy file")


def test_a_large_legitimate_safetensors_file_reads_one_tensor_without_reading_the_rest(tmp_path):
    """A 3 GiB direction file (a huge tensor beside a small one, sparse on disk) is accepted, and
    loading the small tensor copies only its bytes: the loading process's anonymous memory, watched
    from outside while it loads, stays far below the file's size. (Resident file pages are not
    counted: how much of a mapped file the kernel maps in around a read is its choice, and it
    differs between machines.)"""
    import json
    import struct
    import subprocess
    import sys
    import time

    huge = 3 * 1024**3 // 4
    header = {"small": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "huge": {"dtype": "F32", "shape": [huge], "data_offsets": [16, 16 + 4 * huge]}}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = tmp_path / "large.safetensors"
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
        out.truncate(8 + len(encoded) + 16 + 4 * huge)  # the huge tensor: zeros, sparse on disk
    code = (
        "from harness.inputs import tensor_file; "
        f"f = tensor_file({str(path)!r}); print(f.shapes['huge'][0], f.load('small').tolist())"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon_kib = 0
    while child.poll() is None:
        peak_anon_kib = max(peak_anon_kib, _anonymous_kib(child.pid))
        time.sleep(0.002)  # a copy of the huge tensor would stay resident far longer than this
    stdout, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr
    assert stdout.strip() == f"{huge} [1.0, 2.0, 3.0, 4.0]"
    assert peak_anon_kib // 1024 < 1024, f"{peak_anon_kib // 1024} MiB of anonymous memory for one 16-byte tensor of a 3 GiB file"


def _anonymous_kib(pid: int) -> int:
    """The process's resident anonymous memory in KiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("RssAnon:")), 0)
    except (FileNotFoundError, ProcessLookupError):
        return 0
