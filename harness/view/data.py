"""What `harness view` shows, as plain JSON values read from a finished run (or sweep) folder.

Every statistic name is built here from the run's grid (`harness.grid`) and `harness.statnames`;
the page's script only lays out what it is handed, and names no statistic of its own.
Undefined numbers (NaN, ±inf) become null, which JSON and JavaScript both read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.inputs import read_json
from harness.diagnostics import overall_metric, text_diagnostics
from harness.rundir import RunRecord, load_run, read_criteria
from harness.stages.criteria import from_json, outcome, summary_line
from harness.stages.report import direction_notes, token_attribution
from harness.statnames import (
    CORRELATION_STATS,
    DESCRIPTIVE_STATS,
    INTERVALS,
    LAYER_ADJUSTED_P,
    MIXEDLM_STATS,
    OVERALL,
    PAIRED_STATS,
    TEXT_METRIC_NAMES,
    correlation_name,
    descriptive_name,
    layer_scope,
    mixedlm_name,
    paired_name,
)
from harness.sweep import SWEEP_FILE

SIGNIFICANT_DIGITS = 4
"""Per-token delta norms are rounded to this many significant digits: the heatmap's colours and
hover values need no more, and it keeps the quickstart's view small."""

CORRELATION_SCOPES = ("pooled", "difference")
"""Correlation scopes besides the conditions' own."""


def finite(value: Any) -> Any:
    """A copy of `value` with every NaN or infinite float as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def run_data(run_dir: Path) -> dict:
    """Everything the page of one run shows."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    spec = run.spec
    primary, comparison = next(iter(spec.comparisons.items()))
    results = [from_json(row) for row in run.criteria]
    names = statistic_index(run)
    diagnostics_file = run_dir / "diagnostics.json"
    diagnostics = read_json(diagnostics_file) if diagnostics_file.is_file() else text_diagnostics(run.texts, run.table, spec)
    return finite({
        "kind": "run",
        "title": spec.name,
        "run_id": run.manifest.get("run_id", run_dir.name),
        "point": run.manifest.get("point"),
        "description": (spec.description or "").strip(),
        "hypothesis": (spec.report.hypothesis or "").strip(),
        "summary": summary_line(results),
        "primary": {"comparison": primary, "a": comparison.a, "b": comparison.b, "metric": spec.stats.correlate[1],
                    "text_metric": spec.stats.correlate[0]},
        "alpha": spec.report.alpha,
        "headline": {"metric": spec.stats.correlate[1], **{
            stat: run.stats.get(paired_name(spec.stats.correlate[1], OVERALL, stat)) for stat in ("d", "d_ci_low", "d_ci_high", "p")}},
        "comparisons": [{"name": name, "a": c.a, "b": c.b} for name, c in spec.comparisons.items()],
        "conditions": list(spec.conditions),
        "layers": run.layers,
        "criteria": [
            {"name": row["name"], "expr": row["expr"], "outcome": outcome(result), "error": row.get("error"),
             "statistics": [describe(name, value, run, names) for name, value in row["values"].items()]}
            for row, result in zip(run.criteria, results)
        ],
        "effects": effect_curves(run),
        "means": mean_curves(run),
        "windows": window_columns(run),
        "samples": samples(run, diagnostics["dropped"]),
        "tokens": token_heatmaps(run),
        "directions": direction_notes(run, primary) if spec.directions else [],
        "interventions": run.manifest.get("interventions") or spec.model_dump(mode="json").get("interventions"),
        "diagnostics": diagnostics["conditions"],
        "manifest": run.manifest,
        "spec_yaml": (run_dir / "spec.yaml").read_text(encoding="utf-8"),
    })


# --- statistics -------------------------------------------------------------------------------


def statistic_index(run: RunRecord) -> dict[str, dict]:
    """Every statistic name the run's grid can write, built from its parts: name -> what it is
    (kind, comparison, column, condition, scope, stat). A criterion's values are looked up here."""
    spec, grid = run.spec, run.spec.grid
    columns = [*TEXT_METRIC_NAMES, *(column.name for column in grid.per_layer_columns())]
    scopes = [OVERALL, *(layer_scope(layer) for layer in run.layers)]
    found: dict[str, dict] = {}
    for comparison in (None, *spec.comparisons):
        for column in columns:
            for scope in scopes:
                for stat in (*PAIRED_STATS, *LAYER_ADJUSTED_P):
                    found[paired_name(column, scope, stat, comparison)] = {
                        "kind": "paired", "comparison": comparison, "column": column, "scope": scope, "stat": stat}
        for scope in (*CORRELATION_SCOPES, *spec.conditions):
            for stat in CORRELATION_STATS:
                found[correlation_name(scope, stat, comparison)] = {
                    "kind": "correlation", "comparison": comparison, "scope": scope, "stat": stat}
        for stat in MIXEDLM_STATS:
            found[mixedlm_name(stat, comparison)] = {"kind": "mixedlm", "comparison": comparison, "stat": stat}
    for column in columns:
        for condition in spec.conditions:
            for stat in DESCRIPTIVE_STATS:
                found[descriptive_name(column, condition, stat)] = {
                    "kind": "descriptive", "column": column, "condition": condition, "scope": None, "stat": stat}
    return found


def describe(name: str, value: float | None, run: RunRecord, names: dict[str, dict]) -> dict:
    """A criterion's statistic: its value, its confidence interval where it has one, the
    statistics beside it (same scope) and its per-layer curve where the run has one."""
    info = names.get(name)
    entry = {"name": name, "value": value, "kind": info["kind"] if info else "other", "ci": None, "related": {}, "curve": None}
    if info is None:
        return entry
    stat, comparison = info["stat"], info.get("comparison")
    if info["kind"] == "paired":
        column, scope = info["column"], info["scope"]
        entry["related"] = _present(run, {s: paired_name(column, scope, s, comparison) for s in PAIRED_STATS})
        entry["ci"] = _interval(run, stat, lambda bound: paired_name(column, scope, bound, comparison))
        entry["curve"] = _paired_curve(run, column, stat, comparison)
        entry["comparison"] = _comparison_label(run, comparison)
    elif info["kind"] == "correlation":
        scope = info["scope"]
        entry["related"] = _present(run, {s: correlation_name(scope, s, comparison) for s in CORRELATION_STATS})
        entry["ci"] = _interval(run, stat, lambda bound: correlation_name(scope, bound, comparison))
        entry["comparison"] = _comparison_label(run, comparison)
    elif info["kind"] == "descriptive":
        column, condition = info["column"], info["condition"]
        entry["related"] = _present(run, {s: descriptive_name(column, condition, s) for s in DESCRIPTIVE_STATS})
        layers = {layer: descriptive_name(column, condition, "mean", layer_scope(layer)) for layer in run.layers}
        if stat == "mean" and all(name in run.stats for name in layers.values()) and layers:
            entry["curve"] = {"label": f"{column} mean, {condition}", "layers": list(layers),
                              "values": [run.stats[name] for name in layers.values()]}
    elif info["kind"] == "mixedlm":
        entry["related"] = _present(run, {s: mixedlm_name(s, comparison) for s in MIXEDLM_STATS})
    return entry


def _present(run: RunRecord, names: dict[str, str]) -> dict[str, float | None]:
    return {label: run.stats[name] for label, name in names.items() if name in run.stats}


def _interval(run: RunRecord, stat: str, build) -> list[float | None] | None:
    bounds = INTERVALS.get(stat)
    if bounds is None or not all(build(bound) in run.stats for bound in bounds):
        return None
    return [run.stats[build(bound)] for bound in bounds]


def _comparison_label(run: RunRecord, comparison: str | None) -> str:
    name = comparison or next(iter(run.spec.comparisons))
    pair = run.spec.comparisons[name]
    return f"{name} ({pair.a} − {pair.b})"


def _by_layer(run: RunRecord, column: str, stat: str, comparison: str | None) -> dict[int, float | None]:
    """`stat` of `column` at each captured layer that has it."""
    names = {layer: paired_name(column, layer_scope(layer), stat, comparison) for layer in run.layers}
    return {layer: run.stats[name] for layer, name in names.items() if name in run.stats}


def _paired_curve(run: RunRecord, column: str, stat: str, comparison: str | None) -> dict | None:
    """Per layer: `stat` of `column`, with its interval's bounds where it has one."""
    values = _by_layer(run, column, stat, comparison)
    if not values:
        return None
    curve = {"label": f"{column} {stat} by layer", "layers": list(values), "values": list(values.values())}
    for side, bound in zip(("ci_low", "ci_high"), INTERVALS.get(stat, ())):
        bounds = _by_layer(run, column, bound, comparison)
        curve[side] = [bounds.get(layer) for layer in values]
    return curve


def effect_curves(run: RunRecord) -> dict[str, dict[str, dict]]:
    """Per comparison and per-layer column: d by layer with its interval, mean difference, p and
    Holm-adjusted p."""
    curves: dict[str, dict[str, dict]] = {}
    for comparison in run.spec.comparisons:
        curves[comparison] = {}
        for column in run.spec.grid.per_layer_columns():
            named = {stat: _by_layer(run, column.name, stat, comparison) for stat in ("d", "d_ci_low", "d_ci_high", "mean_diff", "p", "p_holm")}
            layers = list(named["d"])
            if layers:
                curves[comparison][column.name] = {"layers": layers, **{
                    stat: [by_layer.get(layer) for layer in layers] for stat, by_layer in named.items()}}
    return curves


def mean_curves(run: RunRecord) -> dict[str, dict[str, list]]:
    """Per whole-response column and condition: the mean over samples at each layer."""
    return {
        column.name: {
            condition: [run.stats.get(descriptive_name(column.name, condition, "mean", layer_scope(layer))) for layer in run.layers]
            for condition in run.spec.conditions
        }
        for column in run.spec.grid.whole_columns()
    }


def window_columns(run: RunRecord) -> list[dict]:
    """Per whole-response column, its window columns (names as the grid builds them), with the
    primary comparison's overall d and interval on each window."""
    grid = run.spec.grid
    if not grid.windows:
        return []
    return [
        {"column": column.name, "windows": [
            {"name": window.name, "start": window.start, "end": window.end, "column": column.at(window).name,
             **{stat: run.stats.get(paired_name(column.at(window).name, OVERALL, stat)) for stat in ("d", "d_ci_low", "d_ci_high", "p")}}
            for window in grid.windows]}
        for column in grid.whole_columns()
    ]


# --- samples and tokens -----------------------------------------------------------------------


def samples(run: RunRecord, dropped: list[dict]) -> list[dict]:
    """Per sample: the prompt, every condition's response, its overall value of the studied
    metric and CE, the primary comparison's per-sample differences, and what was dropped."""
    spec = run.spec
    _, comparison = next(iter(spec.comparisons.items()))
    metric, text_metric = spec.stats.correlate[1], spec.stats.correlate[0]
    overall = _by_text(overall_metric(run.table, metric))
    table = run.table.astype({"sample_id": str})
    ce = _by_text(table[(table["metric"] == text_metric) & table["layer"].isna()])
    lacking = {(str(row["sample_id"]), row["condition"]): row for row in dropped}
    rows: dict[str, dict] = {}
    for text in run.texts:
        sample = str(text["sample_id"])
        row = rows.setdefault(sample, {"id": text["sample_id"], "prompt": text["prompt"], "conditions": {}})
        key = (sample, text["condition"])
        row["conditions"][text["condition"]] = {
            "response": text["response"],
            "tokens": text.get("n_response_tokens"),
            "stopped_early": text.get("stopped_early"),
            "metric": overall.get(key),
            "ce": ce.get(key),
            "dropped": lacking[key]["metrics"] if key in lacking else None,
            "reason": lacking[key].get("reason") if key in lacking else None,
        }
    for row in rows.values():
        a, b = row["conditions"].get(comparison.a, {}), row["conditions"].get(comparison.b, {})
        row["diff"] = _difference(a.get("metric"), b.get("metric"))
        row["ce_diff"] = _difference(a.get("ce"), b.get("ce"))
        row["dropped"] = any(entry["dropped"] for entry in row["conditions"].values())
        row["short"] = any(entry["stopped_early"] for entry in row["conditions"].values())
    return list(rows.values())


def _by_text(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(str(sample), condition): float(value) for sample, condition, value
            in zip(frame["sample_id"], frame["condition"], frame["value"])}


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def token_heatmaps(run: RunRecord) -> dict | None:
    """Per sample and condition: the response tokens and, per saved layer, the token-to-token
    delta norms (step i, from token i to i + 1, is attributed to token i + 1, as in the report).
    The first layer shown is the one the report's token attribution uses. None without deltas."""
    if not run.token_deltas:
        return None
    attribution = token_attribution(run.token_deltas, list(run.spec.conditions))
    texts: dict[str, dict[str, dict]] = {}
    for row in run.token_deltas:
        entry = texts.setdefault(str(row["sample_id"]), {}).setdefault(row["condition"], {"tokens": row["tokens"], "norms": {}})
        entry["norms"][str(row["layer"])] = [None if norm is None else float(f"{norm:.{SIGNIFICANT_DIGITS}g}") for norm in row["norms"]]
    return {"layers": sorted({row["layer"] for row in run.token_deltas}), "layer": attribution["layer"], "texts": texts}


# --- sweeps -----------------------------------------------------------------------------------


def sweep_data(sweep_dir: Path, point_links: dict[str, str], headlines: dict[str, dict]) -> dict:
    """A sweep's page: its points (values, criteria outcomes, the studied metric's overall effect
    from `headlines`, a link to each point's page; both by run folder name) and the sweep criteria."""
    record = read_json(Path(sweep_dir) / SWEEP_FILE)
    points = []
    for point in record["points"]:
        run_dir = Path(sweep_dir).parent / point["run"]
        rows = read_criteria(run_dir)
        points.append({"id": point["id"], "values": point["values"], "run": point["run"], "link": point_links[point["run"]],
                       "headline": headlines[point["run"]],
                       "criteria": {row["name"]: outcome(from_json(row)) for row in rows}})
    sweep_results = [from_json(row) for row in record["criteria"]]
    return finite({
        "kind": "sweep",
        "title": Path(sweep_dir).parent.name,
        "run_id": Path(sweep_dir).name,
        "summary": f"{len(points)} points, sweep criteria: {summary_line(sweep_results)}" if sweep_results else f"{len(points)} points, no sweep criteria",
        "points": points,
        "criteria": [{"name": row["name"], "expr": row["expr"], "outcome": outcome(result), "error": row.get("error"),
                      "statistics": [{"name": name, "value": value, "kind": "sweep", "ci": None, "related": {}, "curve": None}
                                     for name, value in row["values"].items()]}
                     for row, result in zip(record["criteria"], sweep_results)],
    })
