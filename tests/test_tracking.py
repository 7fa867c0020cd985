"""MLflow logging against a real local file store, read back with MLflow's own client: a sweep run
with `harness run --log mlflow --view` (a parent run, a child per point), and one point logged
again with `harness log --to mlflow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.sweep_report import point_runs
from harness.tracking import flatten
from test_run import tiny_spec
from conftest import unavailable

try:
    from mlflow.tracking import MlflowClient
except ImportError:
    unavailable("the MLflow tests need mlflow (pip install 'harness[tracking]')")

REPO = Path(__file__).resolve().parent.parent


def harness_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("tracking")
    tiny_spec(folder, tiny_model_dir, name="tinylog")
    (folder / "tinylogsweep.yaml").write_text("extends: tinylog.yaml\nname: tinylogsweep\nmatrix:\n  stats.bootstrap_resamples: [100, 200]\n")
    run = harness_cli("run", "tinylogsweep.yaml", "--runs-dir", "runs", "--log", "mlflow", "--view", cwd=folder)
    assert run.returncode in (0, 1), run.stderr
    assert "logged to MLflow" in run.stdout
    sweep_dir = next((folder / "runs" / "tinylogsweep").glob("*-sweep"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks readers of a file store to opt in, too
        yield folder, sweep_dir, MlflowClient(tracking_uri=(folder / "mlruns").as_uri())


def runs_of(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    return client.search_runs([experiment.experiment_id])


def test_a_sweep_is_a_parent_run_with_a_child_per_point(logged):
    folder, sweep_dir, client = logged
    runs = runs_of(client, "tinylogsweep")
    parents = [run for run in runs if run.data.tags.get("harness.kind") == "sweep"]
    children = [run for run in runs if run.data.tags.get("harness.kind") == "run"]
    assert len(parents) == 1 and len(children) == 2
    assert all(child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for child in children)
    manifests = [json.loads((run / "manifest.json").read_text()) for run in point_runs(sweep_dir)]
    assert {child.data.tags["harness.point"] for child in children} == {m["point"] for m in manifests} and None not in {m["point"] for m in manifests}
    assert all(child.data.tags["harness.spec"] == "tinylogsweep" for child in children)
    commit = manifests[0]["git_commit"]
    assert commit is None or all(child.data.tags["mlflow.source.git.commit"] == commit for child in children)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"sweep.json", "RESULTS.md", "view"}


def test_params_metrics_and_artifacts_read_back(logged):
    folder, sweep_dir, client = logged
    run_dir = point_runs(sweep_dir)[0]
    children = [run for run in runs_of(client, "tinylogsweep") if run.data.tags.get("harness.run_id") == run_dir.name]
    assert len(children) == 1
    run = client.get_run(children[0].info.run_id)
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert run.data.params == dict(flatten(spec))
    assert run.data.params["dataset.n_samples"] == "6" and run.data.params["models.base.id"] == spec["models"]["base"]["id"]
    criteria = json.loads((run_dir / "criteria.json").read_text())
    stats = json.loads((run_dir / "stats.json").read_text())
    for row in criteria:
        assert run.data.metrics[f"criterion.{row['name']}"] == float(row["passed"])
        for name, value in row["values"].items():
            assert run.data.metrics[name] == pytest.approx(value)
    assert run.data.metrics["smoothness.overall.mean_diff"] == pytest.approx(stats["smoothness.overall.mean_diff"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "stats.json", "criteria.json", "per_sample.csv", "manifest.json", "texts.jsonl"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "stats.json", str(folder / "download")))
    assert local.read_bytes() == (run_dir / "stats.json").read_bytes()


def test_harness_log_adds_a_run_and_refuses_what_is_no_run(logged, tmp_path):
    folder, sweep_dir, client = logged
    run_dir = point_runs(sweep_dir)[1]
    before = len(runs_of(client, "tinylogsweep"))
    logged_again = harness_cli("log", str(run_dir), "--to", "mlflow", cwd=folder)
    assert logged_again.returncode == 0, logged_again.stderr
    assert len(runs_of(client, "tinylogsweep")) == before + 1
    refused = harness_cli("log", str(tmp_path), "--to", "mlflow", cwd=folder)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "not a finished run folder" in refused.stderr
