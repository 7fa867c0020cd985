"""`harness log --to mlflow`: a finished run or sweep folder logged into an MLflow tracking store.

One MLflow run per harness run, in the experiment named after the spec:
- params: the resolved spec (spec.yaml), flattened to dotted keys (``dataset.n_samples``);
- metrics: each criterion's outcome (``criterion.<name>``: 1 passed, 0 not), the statistics
  its criteria read and the key statistics (`harness.statnames.KEY_STATISTICS`);
- artifacts: the run folder;
- tags: ``harness.spec``, ``harness.point`` (a matrix point), ``harness.run_id`` and MLflow's
  own ``mlflow.source.git.commit``.
A sweep is a parent run (the sweep folder's criteria and statistics, its folder as artifacts)
with a child run per point.

The store is ``MLFLOW_TRACKING_URI`` when set, else the file store ``mlruns/`` in the working
directory (MLflow 3 keeps that backend in maintenance mode and asks for an opt-in, which a
run of the harness gives it unless the environment says otherwise). mlflow is the optional extra
``tracking``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from harness.inputs import read_json
from harness.errors import InputError
from harness.rundir import is_run_dir, read_criteria, read_stats
from harness.statnames import KEY_STATISTICS
from harness.sweep import SWEEP_FILE
from harness.sweep_report import is_sweep_dir, point_runs

DEFAULT_STORE = "mlruns"
"""The file store's folder, in the working directory, when MLFLOW_TRACKING_URI is not set."""

PARAM_VALUE_LIMIT = 6000
"""MLflow's longest param value; a longer spec value is cut there, with a final ``…``."""

BATCH = 100
"""Params (and metrics) per `log_batch` call: MLflow's per-request limit for params."""

CRITERION_METRIC = "criterion.{}"


def require_mlflow() -> None:
    """Check that mlflow is installed before anything runs (one line, exit 2, if not)."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise InputError("logging to MLflow needs mlflow: pip install 'harness[tracking]' (or pip install mlflow)") from None


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the file store mlruns/ in the working directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path.cwd() / DEFAULT_STORE).as_uri()


def log_folder(target: Path) -> list[str]:
    """Log the run or sweep folder `target`; return the MLflow run ids (a sweep's parent first)."""
    target = Path(target)
    if not (is_run_dir(target) or is_sweep_dir(target)):
        raise InputError(f"{target}: not a finished run folder or sweep folder (no stats.json / criteria.json / sweep.json)")
    require_mlflow()
    from mlflow.tracking import MlflowClient  # an optional extra (harness[tracking]), checked just above

    client = MlflowClient(tracking_uri=tracking_uri())
    if is_run_dir(target):
        return [_log_run(client, target, parent=None)]
    sweep = read_json(target / SWEEP_FILE)
    runs = point_runs(target)
    spec_name = _spec(runs[0])["name"]
    parent = _start(client, spec_name, f"{spec_name}/{target.name}", {
        "harness.spec": spec_name, "harness.run_id": target.name, "harness.kind": "sweep",
        **_commit_tag(read_json(runs[0] / "manifest.json")),
    })
    _log_values(client, parent, [], _metrics(sweep["criteria"], sweep["statistics"]))
    client.log_artifacts(parent, str(target))
    children = [_log_run(client, run_dir, parent=parent) for run_dir in runs]
    client.set_terminated(parent, "FINISHED")
    return [parent, *children]


def _log_run(client, run_dir: Path, parent: str | None) -> str:
    manifest, spec = read_json(run_dir / "manifest.json"), _spec(run_dir)
    tags = {"harness.spec": spec["name"], "harness.run_id": manifest["run_id"], "harness.kind": "run",
            "harness.point": manifest.get("point") or "", **_commit_tag(manifest)}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    name = f"{spec['name']}/{manifest['run_id']}"
    run_id = _start(client, spec["name"], name, tags)
    _log_values(client, run_id, list(flatten(spec)), _metrics(read_criteria(run_dir), read_stats(run_dir)))
    client.log_artifacts(run_id, str(run_dir))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _spec(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "spec.yaml").read_text(encoding="utf-8"))


def _commit_tag(manifest: dict) -> dict[str, str]:
    return {"mlflow.source.git.commit": manifest["git_commit"]} if manifest.get("git_commit") else {}


def _start(client, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested spec as (dotted key, value as text) pairs: lists keep their YAML form."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    text = text.removesuffix("\n...").strip()
    yield prefix, text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 1] + "…"


def _metrics(criteria: list[dict], stats: dict[str, float | None]) -> dict[str, float]:
    """Each criterion's outcome, the statistics the criteria read, and the key statistics (finite values)."""
    metrics = {CRITERION_METRIC.format(row["name"]): float(bool(row["passed"])) for row in criteria}
    read = {name: value for row in criteria for name, value in row["values"].items()}
    key = {name: value for name, value in stats.items() if KEY_STATISTICS.match(name)}
    for name, value in {**key, **read}.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[name] = float(value)
    return metrics


def _log_values(client, run_id: str, params: list[tuple[str, str]], metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric, Param  # an optional extra (harness[tracking])

    stamp = int(time.time() * 1000)
    for start in range(0, len(params), BATCH):
        client.log_batch(run_id, params=[Param(key, value) for key, value in params[start : start + BATCH]])
    items = list(metrics.items())
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, metrics=[Metric(key, value, stamp, 0) for key, value in items[start : start + BATCH]])
