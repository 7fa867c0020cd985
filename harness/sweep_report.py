"""The sweep folder, `runs/<name>/<time>-sweep/`, beside the point runs: sweep.json, the
relative-depth figure and RESULTS.md (reports/templates/sweep.md.j2), all from the point run
folders, which is what makes `harness compare` of a sweep folder possible too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness.artifacts import read_jsonl, write_json, write_text
from harness.errors import InputError
from harness.inputs import read_json
from harness.rundir import SAMPLES_FILE, RunFolder, read_criteria, read_stats
from harness.stages import criteria as criteria_stage
from harness.statnames import (
    OVERALL,
    SWEEP_TREND,
    correlation_name,
    descriptive_name,
    paired_name,
    per_layer_names,
    sweep_name,
)
from harness.sweep import FIGURE_FILE, SWEEP_FILE, Point, Sweep, sweep_statistics
from harness.templates import TEMPLATES_DIR, render_template

TEMPLATE = "sweep.md.j2"
DOSE_FIGURE_FILE = "dose_response.png"


def write_sweep(sweep: Sweep, outcomes: list[tuple[Point, Any]], runs_dir: Path, tag: str | None = None):
    """Write the sweep folder; return it and the sweep criteria's verdicts."""
    run_dirs = [outcome.run_dir for _, outcome in outcomes]
    shares = shared_samples(run_dirs)
    point_stats = [read_stats(run_dir) for run_dir in run_dirs]
    point_criteria = [read_criteria(run_dir) for run_dir in run_dirs]
    dose = sweep.dose
    doses = [point.values[dose] for point, _ in outcomes] if dose else None
    statistics = sweep_statistics(point_stats, point_criteria, doses)
    results = criteria_stage.evaluate_criteria(sweep.criteria, statistics)
    folder = RunFolder(runs_dir, sweep.name, "-".join(filter(None, (tag, "sweep"))))
    try:
        write_json(folder.path / SWEEP_FILE, {
            "spec_file": str(sweep.path.resolve()),
            "points": [{"id": point.id, "values": point.values, "run": run_dir.name, "shared_samples": share}
                       for (point, _), run_dir, share in zip(outcomes, run_dirs, shares)],
            "statistics": statistics,
            "criteria": criteria_stage.to_json(results),
        })
        spec = outcomes[0][0].spec
        metric = spec.stats.correlate[1]
        figure = dose_figure = None
        comparison = next(iter(spec.comparisons))
        if spec.report.plots:
            from harness import plots  # matplotlib only where the figure is drawn: `harness view` and `harness log` read this module

            depths = [model_layers(run_dir, spec.capture_model) for run_dir in run_dirs]
            effects = pd.DataFrame(_depth_rows([point.id for point, _ in outcomes], point_stats, depths, metric))
            figure = plots.effect_by_relative_depth(effects, metric, folder.path / FIGURE_FILE).name
            if doses is not None:
                rows = [{"dose": value, **{key: _number(stats.get(paired_name(metric, OVERALL, key)))
                                           for key in ("d", "d_ci_low", "d_ci_high")}}
                        for value, stats in zip(doses, point_stats)]
                dose_figure = plots.dose_response(pd.DataFrame(rows), dose, metric, comparison,
                                                  folder.path / DOSE_FIGURE_FILE).name
        context = {
            "title": sweep.name,
            "hypothesis": spec.report.hypothesis.strip(),
            "run_id": folder.run_id,
            "metric": metric,
            "primary": next(iter(spec.comparisons.values())).model_dump(),
            "criteria_names": list(spec.criteria),
            "rows": [_row(point, run_dir, stats, rows, spec) | {"shared": f"{share['shared']}/{share['of']} ({share['percent']:.0f} %)"} for (point, _), run_dir, stats, rows, share
                     in zip(outcomes, run_dirs, point_stats, point_criteria, shares)],
            "sweep_criteria": [
                {"outcome": criteria_stage.outcome(r), "name": r.name, "expr": r.expr, "stat_values": r.values, "error": r.error}
                for r in results
            ],
            "summary": criteria_stage.summary_line(results),
            "figure": figure,
            "dose": dose and {"key": dose, "figure": dose_figure, "comparison": comparison,
                              "rho": statistics.get(sweep_name(paired_name(metric, OVERALL, "d"), SWEEP_TREND, "rho")),
                              "p": statistics.get(sweep_name(paired_name(metric, OVERALL, "d"), SWEEP_TREND, "p"))},
        }
        write_text(folder.path / "RESULTS.md", render_template(TEMPLATES_DIR / TEMPLATE, context))
        return folder.commit(), results
    except BaseException:
        folder.discard()
        raise


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def _row(point: Point, run_dir: Path, stats: dict, criteria_rows: list[dict], spec) -> dict:
    """A point's line of the combined table: CE per condition, the effect, the correlation, the criteria."""
    comparison = next(iter(spec.comparisons.values()))
    metric = spec.stats.correlate[1]

    def stat(name: str) -> float:
        value = stats.get(name)
        return float("nan") if value is None else value

    return {
        "id": point.id,
        "report": f"../{run_dir.name}/RESULTS.md",
        "ce_a": stat(descriptive_name("ce_loss", comparison.a, "mean")),
        "ce_b": stat(descriptive_name("ce_loss", comparison.b, "mean")),
        **{key: stat(paired_name(metric, OVERALL, key)) for key in ("d", "d_ci_low", "d_ci_high", "p")},
        "r": stat(correlation_name("pooled", "r")),
        "outcomes": {row["name"]: criteria_stage.outcome(criteria_stage.from_json(row)) for row in criteria_rows},
    }


def shared_samples(run_dirs: list[Path]) -> list[dict]:
    """Per point: how many of its samples (the dataset's id and the prompt, from samples.jsonl)
    every other point used too, of how many; the same samples compare like with like."""
    keys = [[(row["id"], row["prompt"]) for row in read_jsonl(run_dir / SAMPLES_FILE)] for run_dir in run_dirs]
    common = set.intersection(*map(set, keys))
    return [{"shared": sum(key in common for key in own), "of": len(own),
             "percent": 100.0 * sum(key in common for key in own) / len(own) if own else 0.0} for own in keys]


def model_layers(run_dir: Path, alias: str) -> int | None:
    """The capture model's number of decoder blocks, as the run's manifest records it."""
    return read_json(run_dir / "manifest.json", expect=dict)["models"].get(alias, {}).get("source", {}).get("layers")


def _depth_rows(point_ids: list[str], point_stats: list[dict], depths: list[int | None], metric: str) -> list[dict]:
    """Per point and captured layer: relative depth (layer / the model's number of layers; where
    the manifest does not say, the highest captured layer + 1) and the primary comparison's d."""
    rows = []
    for point_id, stats, depth in zip(point_ids, point_stats, depths):
        names = per_layer_names(stats, metric, "d")
        layers = sorted(names)
        for layer in layers:
            d = stats[names[layer]]
            rows.append({"point": point_id, "relative_depth": layer / (depth or layers[-1] + 1), "d": float("nan") if d is None else d})
    return rows


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def point_runs(sweep_dir: Path) -> list[Path]:
    """The run folders of a sweep folder's points (they lie beside it)."""
    sweep_dir = Path(sweep_dir)
    if not is_sweep_dir(sweep_dir):
        raise InputError(f"{sweep_dir}: not a sweep folder (no {SWEEP_FILE})")
    path = sweep_dir / SWEEP_FILE
    points = read_json(path, expect=dict).get("points")
    if not isinstance(points, list) or not all(isinstance(point, dict) and isinstance(point.get("run"), str) for point in points):
        raise InputError(f"{path}: 'points' must be a list of {{run: folder, ...}}")
    return [sweep_dir.parent / point["run"] for point in points]
