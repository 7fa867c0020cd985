"""Run folders are one experiment's each; cache entries are verified before they are trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from harness import rundir
from harness.artifacts import write_json
from harness.inputs import read_json
from harness.cache import StageCache
from harness.executor import Executor, Stage


class FrozenClock:
    """datetime whose now() is one fixed second: forces two runs into the same second."""

    @staticmethod
    def now() -> datetime:
        return datetime(2026, 1, 2, 3, 4, 5)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "datetime", FrozenClock)
    first, second = rundir.RunFolder(tmp_path, "small"), rundir.RunFolder(tmp_path, "small")
    assert first.run_id == "20260102-030405" and second.run_id == "20260102-030405-2"
    for folder, samples in ((first, 6), (second, 5)):
        write_json(folder.path / "stats.json", {"samples": samples, "run_id": folder.run_id})
    committed = [second.commit(), first.commit()]
    assert [read_json(path / "stats.json")["run_id"] for path in committed] == [second.run_id, first.run_id]
    assert [path.name for path in committed] == [second.run_id, first.run_id]
    third = rundir.RunFolder(tmp_path, "small")  # the first id is now a finished run
    assert third.run_id == "20260102-030405-3"


def test_staging_of_a_dead_process_is_removed_and_a_live_one_kept(tmp_path):
    parent = tmp_path / "small"
    dead, live = parent / ".20260101-000000.partial", parent / ".20260101-000001.partial"
    for folder in (dead, live):
        folder.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (dead / rundir.OWNER_FILE).write_text(finished.stdout.strip())
    (live / rundir.OWNER_FILE).write_text(str(os.getpid()))
    rundir.RunFolder(tmp_path, "small").discard()
    assert not dead.exists() and live.exists()


def test_a_discarded_run_leaves_no_empty_spec_folder(tmp_path):
    rundir.RunFolder(tmp_path, "new").discard()
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    rundir.RunFolder(tmp_path, "old").discard()
    assert (tmp_path / "old").is_dir()  # not made by this run: kept


class Squares(Stage):
    """A stage computed in units: item i is i², three per unit."""

    name = kind = "squares"
    version = 1

    def __init__(self, n: int):
        self.n, self.computed = n, []

    def inputs(self) -> dict:
        return {"n": self.n}

    def units(self) -> list[list[int]]:
        return [list(range(start, min(start + 3, self.n))) for start in range(0, self.n, 3)]

    def compute(self, unit, folder: Path) -> list[int]:
        self.computed.append(unit)
        return [i * i for i in unit]

    def check(self, output: list[int]) -> str | None:
        return None if len(output) == self.n else f"{len(output)} items for {self.n}"


def run_squares(cache_dir: Path, n: int = 7) -> tuple[list[int], Squares, list[str]]:
    log: list[str] = []
    stage = Squares(n)
    output = Executor(StageCache(cache_dir, log=log.append), log.append).run(stage)
    return output, stage, log


def result_file(cache_dir: Path) -> Path:
    [path] = cache_dir.glob("squares/*/result.json")
    return path


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda path: path.write_text(path.read_text()[:40]), "unreadable"),
        (lambda path: path.write_text(path.read_text().replace("36", "37")), "does not match its checksum"),
        (lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "key": "other"})), "made for key other"),
        (lambda path: path.write_text(json.dumps([0, 1, 4])), "not a cache entry"),
    ],
)
def test_a_damaged_cache_entry_is_reported_discarded_and_recomputed(tmp_path, damage, reason):
    expected, first, _ = run_squares(tmp_path)
    damaged = []
    for file in sorted(tmp_path.glob("squares/*/*.json")):
        before = file.read_text()
        damage(file)
        if file.read_text() != before and file.name.startswith("unit-"):
            damaged.append(first.computed[int(file.stem.split("-")[1])])
    output, stage, log = run_squares(tmp_path)
    assert output == expected == [i * i for i in range(7)]
    assert damaged and stage.computed == damaged  # only the damaged units are computed again
    discarded = [line for line in log if "discarded" in line]
    assert discarded and all(reason in line for line in discarded)
    assert str(result_file(tmp_path)) in discarded[0]
    assert run_squares(tmp_path)[1].computed == []  # healed: the next run reuses everything


def test_an_entry_with_the_wrong_row_count_is_not_used(tmp_path):
    run_squares(tmp_path, n=7)
    folder = result_file(tmp_path).parent
    cache = StageCache(tmp_path)
    cache.write(folder / "result.json", folder.name, [0, 1, 4])  # a valid entry cut to 3 rows
    output, stage, log = run_squares(tmp_path, n=7)
    assert output == [i * i for i in range(7)] and any("3 items for 7" in line for line in log)
