"""`accelerate launch` with 2 CPU processes gives the same per_sample.csv as one process: with
the model condition measured by the capture forward (a random model's texts do not re-tokenize to
their ids) and measured while decoding (a model speaking words)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_run import tiny_spec


@pytest.mark.parametrize("model, measured_by", [("tiny_model_dir", "forward"), ("words_model_dir", "generation")])
def test_two_processes_match_one(tmp_path, request, model, measured_by):
    spec = tiny_spec(tmp_path, request.getfixturevalue(model))
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
    for run in (run_one, run_two):
        texts = [json.loads(line) for line in (run / "texts.jsonl").read_text().splitlines()]
        assert {text["measured_by"] for text in texts if text["condition"] == "model"} == {measured_by}
    # both processes did part of the work: the 2-process cache holds units from each rank's share
    # (the human condition's capture, and the model condition's where the forward measures it)
    captured = 2 if measured_by == "forward" else 1
    assert len(list((tmp_path / "cache-2" / "capture").glob("*/unit-00001.json"))) == captured
    assert len(list((tmp_path / "cache-2" / "generate").glob("*/unit-00001.json"))) == 1
