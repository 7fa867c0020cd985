"""The documented entry points besides the CLI: the Python API (`harness.run`, `harness.load_run`),
the pytest options (`--harness-set`, `--harness-limit`, `--harness-runs-dir`), recorded like
`harness run`'s, and the one session that collects each point once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import harness
from test_run import tiny_spec


def test_the_python_api_runs_a_spec_and_reads_its_run_back(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, name="api")
    outcome = harness.run(spec, overrides={"dataset.n_samples": 4}, runs_dir=tmp_path / "runs", log=lambda line: None)
    assert outcome.run_dir.parent == tmp_path / "runs" / "api"
    assert int(outcome.exit_code) in (0, 1)
    run = harness.load_run(outcome.run_dir)
    assert run.spec.dataset.n_samples == 4 and run.manifest["overrides"] == ["--set dataset.n_samples=4"]
    assert sorted({row["sample_id"] for row in run.texts}) == [0, 1, 2, 3]
    assert [row["name"] for row in run.criteria] == [result.name for result in outcome.results]
    assert set(run.stats) == set(json.loads((outcome.run_dir / "stats.json").read_text()))
    assert run.stat("smoothness.overall.d") == outcome.results[1].values["smoothness.overall.d"]


def test_pytest_takes_limit_and_set_and_records_them_like_harness_run(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, name="viapytest")
    args = [sys.executable, "-m", "pytest", str(spec), "-p", "no:cacheprovider", "--harness-runs-dir", str(tmp_path / "runs"),
            "--harness-limit", "3", "--harness-set", "conditions.model.generation.max_new_tokens=5"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode in (0, 1), result.stdout[-3000:]
    (run_dir,) = (tmp_path / "runs" / "viapytest").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["overrides"] == ["--set conditions.model.generation.max_new_tokens=5", "--limit 3"]
    texts = [json.loads(line) for line in (run_dir / "texts.jsonl").read_text().splitlines()]
    assert sorted({row["sample_id"] for row in texts}) == [0, 1, 2]

    bad = subprocess.run([*args[:-1], "nonexistent.key=1", "--collect-only"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    assert bad.returncode != 0 and "--set nonexistent.key=1: nonexistent: unknown key" in bad.stdout + bad.stderr
    malformed = subprocess.run([*args[:-1], "no-equals-sign"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                               env=dict(os.environ))
    assert malformed.returncode == 4 and "error: --set no-equals-sign: expected key.path=value" in malformed.stderr


def test_a_session_collects_each_point_once(tmp_path, tiny_model_dir, monkeypatch):
    from harness import runner
    from harness.session import Session
    from harness.sweep import expand

    calls = []
    collect = runner.collect
    monkeypatch.setattr(runner, "collect", lambda *args, **kwargs: calls.append(args[0]) or collect(*args, **kwargs))
    sweep = expand(tiny_spec(tmp_path, tiny_model_dir, name="once", extra="matrix: {stats.ddof: [0, 1]}\n"))
    session = Session(tmp_path / "runs", log=lambda line: None)
    session.collect(sweep)
    outcomes = [(point, session.execute(sweep, index)) for index, point in enumerate(sweep.points)]
    session.finish(sweep, outcomes, 0.0)
    assert len(calls) == len(sweep.points) == 2
