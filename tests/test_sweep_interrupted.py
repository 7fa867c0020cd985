"""Two promises of the executor that a sweep relies on: a sweep killed (SIGKILL) in the middle of
a point and run again ends with the same bytes as one never interrupted, and two sweeps sharing
one cache at the same time both finish with the same, consistent results."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from test_resume import harness_run, wait_for_a_capture_unit
from test_run import tiny_spec

MATRIX = "matrix:\n  conditions.model.generation.temperature: [0, 0.9]\n"
POINT_FILES = ("per_sample.csv", "stats.json", "criteria.json", "texts.jsonl")


def sweep_spec(folder: Path, model_dir: Path) -> Path:
    spec = tiny_spec(folder, model_dir, name="tinysweep", extra=MATRIX)
    # one text per forward batch, so capture is many small units and a kill lands between them
    spec.write_text(spec.read_text().replace("token_budget: 600", "token_budget: 1"))
    return spec


def finish(process) -> str:
    _, log = process.communicate(timeout=900)
    assert process.returncode in (0, 1), log
    return log


def point_outputs(runs: Path) -> dict[str, dict[str, bytes]]:
    """Each point's output files by point id (run folders are named by time, so not compared)."""
    outputs = {}
    for manifest in (runs / "tinysweep").glob("*/manifest.json"):
        point = json.loads(manifest.read_text())["point"]
        outputs[point] = {name: (manifest.parent / name).read_bytes() for name in POINT_FILES}
    return outputs


def sweep_statistics(runs: Path) -> dict:
    [sweep_file] = (runs / "tinysweep").glob("*-sweep/sweep.json")
    return json.loads(sweep_file.read_text())["statistics"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted sweep in a cache of its own."""
    folder = tmp_path_factory.mktemp("reference")
    finish(harness_run(sweep_spec(folder, tiny_model_dir), folder / "runs", folder / "cache"))
    return point_outputs(folder / "runs"), sweep_statistics(folder / "runs")


def test_a_sweep_killed_mid_point_and_rerun_gives_the_same_bytes(tmp_path, tiny_model_dir, reference):
    spec = sweep_spec(tmp_path, tiny_model_dir)
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    victim = harness_run(spec, runs, cache)
    wait_for_a_capture_unit(victim, cache)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not list(runs.glob("tinysweep/*-sweep")), "the kill should land before the sweep folder is written"

    log = finish(harness_run(spec, runs, cache))
    assert "resumed from an earlier, interrupted run" in log
    points, statistics = reference
    assert point_outputs(runs) == points
    assert sweep_statistics(runs) == statistics


def test_two_sweeps_sharing_one_cache_at_once_both_finish_consistent(tmp_path, tiny_model_dir, reference):
    spec = sweep_spec(tmp_path, tiny_model_dir)
    cache = tmp_path / "cache"
    first, second = (harness_run(spec, tmp_path / runs, cache) for runs in ("runs-a", "runs-b"))
    finish(first)
    finish(second)
    points, statistics = reference
    for runs in ("runs-a", "runs-b"):
        assert point_outputs(tmp_path / runs) == points, runs
        assert sweep_statistics(tmp_path / runs) == statistics, runs
    # what either wrote into the shared cache is whole: a third sweep reuses every stage, the report's
    # figures and context too (RESULTS.md is rendered anew from them)
    log = finish(harness_run(spec, tmp_path / "runs-c", cache))
    computed = {words[0] for words in map(str.split, log.splitlines()) if len(words) > 1 and words[1] == "computed"}
    assert computed == set(), log
    assert point_outputs(tmp_path / "runs-c") == points
