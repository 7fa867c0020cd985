"""`accelerate launch` with 2 CPU processes gives the same per_sample.csv as one process."""

from __future__ import annotations

import os
import subprocess
import sys

from test_run import tiny_spec


def test_two_processes_match_one(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir)
    env = {**os.environ, "HARNESS_CACHE_DIR": str(tmp_path / "cache-2"), "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "harness", "run", str(spec), "--runs-dir", str(tmp_path / "runs-2"),
    ]
    two = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode in (0, 1), two.stderr[-3000:]
    single_env = {**env, "HARNESS_CACHE_DIR": str(tmp_path / "cache-1")}
    one = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(spec), "--runs-dir", str(tmp_path / "runs-1")],
        env=single_env, capture_output=True, text=True, timeout=600,
    )
    assert one.returncode in (0, 1), one.stderr[-3000:]
    [run_two] = (tmp_path / "runs-2" / "tiny").iterdir()
    [run_one] = (tmp_path / "runs-1" / "tiny").iterdir()
    assert (run_two / "per_sample.csv").read_bytes() == (run_one / "per_sample.csv").read_bytes()
    # both processes did part of the work: the 2-process cache holds units from each rank's share
    assert len(list((tmp_path / "cache-2" / "capture").glob("*/unit-00001.json"))) == 2
