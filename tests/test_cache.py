"""The stage cache is trusted only as far as its folder: no symlink below the root is followed,
and with HARNESS_CACHE_KEY an entry nobody signed is never used."""

from __future__ import annotations

import json
import math

import pytest

from harness.cache import StageCache
from harness.errors import InputError


@pytest.fixture
def cache(tmp_path) -> StageCache:
    return StageCache(tmp_path / "cache")


@pytest.fixture
def elsewhere(tmp_path):
    """A folder an attacker would like the cache to write into."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def refused(call, *parts: str) -> None:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "is a symbolic link; the stage cache follows no link" in message, message
    assert all(part in message for part in parts), message


def test_entries_round_trip(cache):
    """Exactly: a non-finite float comes back a float, and a text spelled like one stays a text."""
    cache.put("data", "k1", {"rows": [1, 2.5, float("nan"), float("inf"), float("-inf")], "tokens": ["nan", "inf"]})
    value = cache.get("data", "k1")
    assert value["rows"][:2] == [1, 2.5] and math.isnan(value["rows"][2]) and value["rows"][3:] == [math.inf, -math.inf]
    assert value["tokens"] == ["nan", "inf"]
    assert [path.name for path in (cache.root / "data" / "k1").iterdir()] == ["result.json"]  # no temporary left


@pytest.mark.parametrize("linked", ["stage", "key"])
def test_a_symlinked_folder_is_refused_and_nothing_is_written_through_it(cache, elsewhere, linked):
    if linked == "stage":
        cache.root.mkdir()
        (cache.root / "data").symlink_to(elsewhere)
    else:
        (cache.root / "data").mkdir(parents=True)
        (cache.root / "data" / "k1").symlink_to(elsewhere)
    refused(lambda: cache.put("data", "k1", [1]), f"cache/data{'/k1' if linked == 'key' else ''}: ")
    refused(lambda: cache.get("data", "k1"))
    refused(lambda: cache.folder("data", "k1"))
    assert list(elsewhere.iterdir()) == []


def test_a_symlink_inside_a_key_folder_is_refused(cache, elsewhere):
    folder = cache.folder("capture", "k1")
    (folder / "activations").symlink_to(elsewhere)
    refused(lambda: cache.folder("capture", "k1"), "k1/activations: ")


def test_a_symlinked_entry_is_discarded_not_followed(cache, elsewhere):
    target = elsewhere / "planted.json"
    target.write_text(json.dumps({"key": "k1", "sha256": "x", "value": 1}))
    folder = cache.folder("data", "k1")
    (folder / "result.json").symlink_to(target)
    lines = []
    cache.log = lines.append
    assert cache.get("data", "k1") is None
    assert "(a symbolic link)" in lines[0]
    assert not (folder / "result.json").exists() and target.exists()
    (folder / "result.json").symlink_to(target)
    cache.put("data", "k1", [1])  # the rename replaces the link itself
    assert not (folder / "result.json").is_symlink() and json.loads(target.read_text())["value"] == 1


def test_with_a_secret_only_signed_entries_are_used(tmp_path):
    plain = StageCache(tmp_path / "cache")
    plain.put("data", "k1", [1, 2])  # planted by someone without the secret: its sha256 is right
    signed = StageCache(tmp_path / "cache", secret=b"s3cret")
    lines = []
    signed.log = lines.append
    assert signed.get("data", "k1") is None
    assert "not signed with HARNESS_CACHE_KEY" in lines[0]
    signed.put("data", "k1", [1, 2])
    assert signed.get("data", "k1") == [1, 2]
    assert StageCache(tmp_path / "cache", secret=b"other").get("data", "k1") is None
    assert plain.get("data", "k1") is None  # the other secret's read discarded it


def test_the_secret_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_KEY", "from-env")
    assert StageCache(tmp_path).secret == b"from-env"
    monkeypatch.setenv("HARNESS_CACHE_KEY", "")
    assert StageCache(tmp_path).secret is None
