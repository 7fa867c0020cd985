"""Sweeps: a spec's `matrix:` expanded into points, each point an ordinary run, and the
sweep statistics over the points (`harness.session` runs them, `harness.sweep_report` writes
the sweep folder).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harness.overrides import Override, flow
from harness.schema import Spec, dose_axis
from harness.spec import load_spec
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
