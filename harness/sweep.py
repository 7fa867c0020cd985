"""Sweeps: a spec's `matrix:` expanded into points, each point an ordinary run, and the
verdicts and combined report over the points.

A point's values are set with the same key-path mechanism as `--set` (`harness.overrides`)
and each point is validated like a file before anything runs. Points whose every stage would
have the same cache key are an error (the matrix varies nothing that is computed). The stage
cache makes stages that points share compute once: a temperature change recomputes only that
condition's generation and capture.

The sweep folder `runs/<name>/<time>-sweep/` lies beside the point runs: sweep.json (points,
sweep statistics, sweep criteria), RESULTS.md and the relative-depth figure.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from harness.errors import InputError
from harness.overrides import Override, flow
from harness.runlog import logged_warnings
from harness.schema import Spec, dose_axis
from harness.spec import load_spec
from harness.stages import criteria as criteria_stage
from harness.statnames import (
    SWEEP_ADJUSTED_P,
    SWEEP_CRITERION_STATS,
    SWEEP_SUMMARIES,
    SWEEP_TREND,
    SWEEP_TREND_STATS,
    sweep_name,
)

SWEEP_FILE = "sweep.json"
FIGURE_FILE = "effect_by_relative_depth.png"


@dataclass(frozen=True)
class Point:
    """One run of a sweep: the spec with the point's matrix values set."""

    id: str
    """`name[key=value,...]` (pytest's parametrize ids); the spec's name alone without a matrix."""
    values: dict[str, Any]
    """Matrix key path -> this point's value."""
    overrides: tuple[Override, ...]
    """The command line's, then the point's matrix values."""
    spec: Spec

    @property
    def label(self) -> str | None:
        """The point's values for its run id: `base=SmolLM2-135M,temperature=0.7` (file-name safe)."""
        inside = self.id[self.id.find("[") + 1 : -1] if self.values else ""
        return re.sub(r"[^A-Za-z0-9_.,=-]", "_", inside) or None

    def run_label(self, tag: str | None) -> str | None:
        """What ends the point's run id: the `--tag`, then the point's values."""
        return "-".join(filter(None, (tag, self.label))) or None


@dataclass(frozen=True)
class Sweep:
    """A spec file's points (one, without a matrix) and its sweep criteria."""

    path: Path
    name: str
    points: list[Point]
    criteria: dict[str, str]
    dose: str | None = None
    """The matrix's key when it is its only one, with numeric values: the sweep statistics'
    `trend` is taken across them (`harness.schema.dose_axis`)."""

    @property
    def is_matrix(self) -> bool:
        return bool(self.points[0].values)


def expand(path: Path, overrides: Sequence[Override] = ()) -> Sweep:
    """Every point of the spec's matrix, each validated like a file (one-line errors naming the
    point's key and value)."""
    spec = load_spec(path, overrides)
    if not spec.matrix:
        return Sweep(Path(path), spec.name, [Point(spec.name, {}, tuple(overrides), spec)], {})
    keys = list(spec.matrix)
    names = _short_names(keys)
    points, seen = [], set()
    for combination in itertools.product(*(enumerate(values) for values in spec.matrix.values())):
        values = {key: value for key, (_, value) in zip(keys, combination)}
        assignments = tuple(Override(key, value, f"matrix: {key}={flow(value)}") for key, value in values.items())
        labels = [_value_label(names[key], value, index) for key, (index, value) in zip(keys, combination)]
        point_id = f"{spec.name}[{','.join(f'{names[key]}={label}' for key, label in zip(keys, labels))}]"
        if point_id in seen:  # two values with one label: number it, as pytest does
            point_id = f"{point_id[:-1]},{len(points)}]"
        seen.add(point_id)
        point_spec = load_spec(path, (*overrides, *assignments), point=True)
        points.append(Point(point_id, values, (*overrides, *assignments), point_spec))
    return Sweep(Path(path), spec.name, points, dict(spec.sweep_criteria), dose_axis(spec.matrix))


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last segment (`temperature`), or as many last segments as make it unique."""
    for depth in itertools.count(1):
        names = {key: ".".join(key.split(".")[-depth:]) for key in keys}
        if len(set(names.values())) == len(keys):
            return names
    raise AssertionError("unreachable: full key paths are unique")


def _value_label(name: str, value: Any, index: int) -> str:
    """A scalar as written; a model mapping by the last part of its id; anything else `<name><index>`."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"].rstrip("/").rsplit("/", 1)[-1]
    return f"{name}{index}"


# --- running ------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    points: list[tuple[Point, Any]]
    """Each point and its `harness.runner.RunOutcome`."""
    sweep_dir: Path | None
    """None on ranks other than 0, which write nothing."""
    results: list[criteria_stage.CriterionResult]
    """The sweep criteria's verdicts."""
    seconds: float

    @property
    def run_dir(self) -> Path | None:
        """Where the sweep's own outputs are (as a run's are in its run folder)."""
        return self.sweep_dir

    @property
    def all_results(self) -> list[criteria_stage.CriterionResult]:
        return [result for _, outcome in self.points for result in outcome.results] + self.results


def run_sweep(
    sweep: Sweep,
    runs_dir: Path = Path("runs"),
    use_cache: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    on_point: Callable[[Point, Any], None] = lambda point, outcome: None,
    tag: str | None = None,
) -> SweepOutcome:
    """Collect every point (all checks first), refuse points that would compute the same, run
    each, then write the sweep folder. `on_point` sees each point's outcome as it finishes."""
    from harness import runner

    started = time.perf_counter()
    with logged_warnings(log):
        plans = collect_points(sweep, runs_dir, use_cache, log, tag)
        outcomes = []
        for point, plan in zip(sweep.points, plans):
            outcome = runner.execute(plan, time.perf_counter())
            on_point(point, outcome)
            outcomes.append((point, outcome))
    if outcomes[0][1].run_dir is None:  # a helper process under accelerate launch
        return SweepOutcome(outcomes, None, [], time.perf_counter() - started)
    from harness.sweep_report import write_sweep

    sweep_dir, results = write_sweep(sweep, outcomes, Path(runs_dir), tag)
    return SweepOutcome(outcomes, sweep_dir, results, time.perf_counter() - started)


def collect_points(
    sweep: Sweep, runs_dir: Path, use_cache: bool = True, log: Callable[[str], None] = lambda line: None,
    tag: str | None = None,
) -> list:
    """Every point's plan (`harness.runner.collect`: all checks first); InputError when two
    points would compute the same (every stage's key equal)."""
    from harness import runner

    plans = [
        runner.collect(sweep.path, Path(runs_dir), use_cache, log, point.overrides, point.id, point.run_label(tag))
        for point in sweep.points
    ]
    keys = [stage_keys(plan) for plan in plans]
    for (i, a), (j, b) in itertools.combinations(enumerate(keys), 2):
        if a == b:
            raise InputError(
                f"{sweep.path}: matrix: points {i + 1} and {j + 1} are identical ({sweep.points[i].id} and "
                f"{sweep.points[j].id}): every stage has the same inputs; vary a key that changes what is computed"
            )
    return plans


def stage_keys(plan) -> dict[str, str]:
    """Every stage's cache key, computing nothing: each stage's output is stood in for by its
    placeholder, so two plans with the same keys would compute the same numbers."""
    from harness import runner
    from harness.stages.stats import StatsStage

    planning = replace(plan, executor=replace(plan.executor, planning=True, keys={}, log=lambda line: None))
    _, measured = runner.texts_and_measures(planning)
    planning.executor.run(StatsStage(runner.per_sample_table(planning, measured), plan.spec))
    return planning.executor.keys



# --- sweep statistics ---------------------------------------------------------------------


def sweep_statistics(
    point_stats: list[dict[str, float | None]], point_criteria: list[list[dict]], doses: list[float] | None = None
) -> dict[str, float]:
    """Sweep-level statistics, flat like stats.json (see `Spec.sweep_criteria`).

    A statistic enters only where every point computed it (a layer that one model lacks has no
    minimum over the sweep); a NaN makes its summaries NaN, and its BH adjustment is left out.
    With `doses` (a one-key numeric matrix's values, point by point: `dose_axis`), each
    statistic's `trend` is Spearman's rho with them and its p (NaN where either is constant or
    a point's value is NaN).
    """
    from scipy.stats import spearmanr
    from statsmodels.stats.multitest import multipletests

    stats: dict[str, float] = {}
    for name in dict.fromkeys(row["name"] for rows in point_criteria for row in rows):
        passed = [any(row["name"] == name and row["passed"] for row in rows) for rows in point_criteria]
        stats |= dict(zip((sweep_name(name, stat) for stat in SWEEP_CRITERION_STATS), (sum(passed), sum(passed) / len(passed))))
    for name in point_stats[0]:
        values = [point.get(name) for point in point_stats]
        if any(value is None for value in values):
            continue
        stats |= _summaries((name,), np.array(values, dtype=float))
        if name.endswith("p") and np.all(np.isfinite(values)):
            adjusted = multipletests(values, method="fdr_bh")[1]
            stats |= _summaries((name, SWEEP_ADJUSTED_P), adjusted)
        if doses is not None:
            finite = np.all(np.isfinite(values)) and len(set(values)) > 1 and len(set(doses)) > 1
            rho, p = spearmanr(doses, values) if finite else (math.nan, math.nan)
            stats |= {sweep_name(name, SWEEP_TREND, stat): float(value) for stat, value in zip(SWEEP_TREND_STATS, (rho, p))}
    return stats


def _summaries(words: tuple[str, ...], values: np.ndarray) -> dict[str, float]:
    """`sweep.<words>.min|median|max` of the points' values (NaN if any is)."""
    summaries = (math.nan,) * 3 if np.isnan(values).any() else (values.min(), np.median(values), values.max())
    return {sweep_name(*words, name): float(value) for name, value in zip(SWEEP_SUMMARIES, summaries)}
