"""A run killed mid-capture (SIGKILL) resumes where it stopped and ends with identical results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_run import tiny_spec


HANG_GUARD_POLLS = 1_000_000
"""Polls (2 ms apart, half an hour at least) before a run that never stores a capture unit is called
hung: a guard against a hang, never a measure of speed."""


def harness_run(spec: Path, runs: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "HARNESS_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "harness", "run", str(spec), "--runs-dir", str(runs)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stopped_mid_capture(tmp_path: Path, tiny_model_dir: Path, signal_number: int) -> tuple[Path, subprocess.Popen]:
    """A run of the tiny spec sent `signal_number` once its first capture unit is stored."""
    spec = tiny_spec(tmp_path, tiny_model_dir)
    # one text per forward batch, so capture is many small units and the signal lands between them
    spec.write_text(spec.read_text().replace("token_budget: 600", "token_budget: 1"))
    victim = harness_run(spec, tmp_path / "runs", tmp_path / "cache")
    wait_for_a_capture_unit(victim, tmp_path / "cache")
    victim.send_signal(signal_number)
    return spec, victim


def wait_for_a_capture_unit(victim: subprocess.Popen, cache: Path) -> None:
    """Return once the running `victim` has stored a capture unit in `cache`."""
    for _ in range(HANG_GUARD_POLLS):
        if list(cache.glob("capture/*/unit-*.json")):
            return
        assert victim.poll() is None, f"run ended before it could be stopped: {victim.communicate()}"
        time.sleep(0.002)
    victim.kill()
    pytest.fail(f"no capture unit stored after {HANG_GUARD_POLLS} polls: the run hangs")


def test_sigkill_mid_capture_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    spec, victim = stopped_mid_capture(tmp_path, tiny_model_dir, signal.SIGKILL)
    victim.wait()
    cache = tmp_path / "cache"
    finished = list(cache.glob("capture/*/unit-*.json"))
    assert finished and not list(cache.glob("capture/*/result.json")), "the kill should land mid-capture"
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").iterdir())

    resumed = harness_run(spec, tmp_path / "runs", cache)
    _, log = resumed.communicate(timeout=600)
    assert resumed.returncode in (0, 1), log
    assert "resumed from an earlier, interrupted run" in log
    assert "generate[model]" in log and "reused" in log.split("generate[model]")[1].split("\n")[0]

    reference = harness_run(spec, tmp_path / "runs-ref", tmp_path / "cache-ref")
    _, ref_log = reference.communicate(timeout=600)
    assert reference.returncode in (0, 1), ref_log
    [resumed_dir] = (tmp_path / "runs" / "tiny").iterdir()
    [reference_dir] = (tmp_path / "runs-ref" / "tiny").iterdir()
    assert (resumed_dir / "per_sample.csv").read_bytes() == (reference_dir / "per_sample.csv").read_bytes()


def test_sigterm_mid_capture_exits_143_leaves_no_staging_and_the_rerun_matches(tmp_path, tiny_model_dir):
    spec, victim = stopped_mid_capture(tmp_path, tiny_model_dir, signal.SIGTERM)
    _, log = victim.communicate(timeout=120)
    assert victim.returncode == 143, log
    assert "terminated during capture[" in log and "run the same command again to resume" in log
    assert "Traceback" not in log and len(log.strip().splitlines()) <= 8
    assert not list((tmp_path / "runs").glob("**/.*.partial"))

    resumed = harness_run(spec, tmp_path / "runs", tmp_path / "cache")
    _, log = resumed.communicate(timeout=600)
    assert resumed.returncode in (0, 1), log
    reference = harness_run(spec, tmp_path / "runs-ref", tmp_path / "cache-ref")
    _, ref_log = reference.communicate(timeout=600)
    [resumed_dir] = (tmp_path / "runs" / "tiny").iterdir()
    [reference_dir] = (tmp_path / "runs-ref" / "tiny").iterdir()
    for name in ("per_sample.csv", "stats.json", "criteria.json"):
        assert (resumed_dir / name).read_bytes() == (reference_dir / name).read_bytes(), name
