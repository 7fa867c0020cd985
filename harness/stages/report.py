"""Report stage: a finished run folder → diagnostics.json, figures and RESULTS.md.

Which statistics go where is decided here and handed to a jinja2 template as a context dict
of plain values; the template formats and lays them out. What one experiment claims — the
hypothesis in words, the verdict grid and what each cell says, the thresholds above which a
diagnostic counts as a threat to validity — comes from the spec's `report:` section, so the
code holds no experiment's wording. Missing statistics are NaN in the context and shown as
"–", so a run without a mixed model or with one comparison renders.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy.stats import t as student_t

from harness.diagnostics import ARTIFACT_PATTERNS, overall_metric, text_diagnostics
from harness.grid import Column, Window
from harness.rundir import RunRecord, load_run
from harness.schema import Comparison
from harness.stages.criteria import from_json, outcome, summary_line
from harness.stages.stats import layer_shares
from harness.statnames import (
    CORRELATION_STATS,
    LAYER_SUMMARIES,
    LAYER_SUMMARY_SCOPE,
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
from harness.stages.report_stage import write_results

TOP_TOKENS = 5
CONTEXT_TOKENS = 3
"""Token attribution: the largest steps per condition, shown with this many tokens either side."""

PLOT_FILES = {
    "effect": "effect_by_layer.png",
    "means": "metric_by_layer.png",
    "scatter": "correlation_scatter.png",
    "deltas": "delta_norms_by_position.png",
    "distribution": "per_sample_by_condition.png",
    "windows": "effect_by_window_and_layer.png",
    "projections": "projection_by_layer.png",
}


def render_report(run_dir: Path, template: Path | None = None) -> Path:
    """Write diagnostics.json, the figures (unless `report.plots` is off) and RESULTS.md; return its path.

    `template` overrides the spec's `report.template`.
    """
    run_dir = Path(run_dir)
    return write_results(run_dir, report_parts(run_dir, run_dir), template)


def report_parts(run_dir: Path, figure_dir: Path) -> dict:
    """What the report shows that follows from the run's data alone, the costly part (the
    `ReportStage` caches it): `diagnostics`, the template's `context` but for the run's id and
    manifest (`report_stage.write_results` adds them), and its `figures`, drawn into `figure_dir`."""
    run = load_run(run_dir)
    diagnostics = text_diagnostics(run.texts, run.table, run.spec)
    figures = draw_plots(run, figure_dir) if run.spec.report.plots else []
    return {"diagnostics": diagnostics, "context": build_context(run, diagnostics, figures)}


# --- plots --------------------------------------------------------------------------------


def draw_plots(run: RunRecord, run_dir: Path) -> list[dict]:
    """Draw every figure beside RESULTS.md; return [{title, file}] in report order."""
    from harness import plots  # matplotlib (1 s to import) only where figures are drawn: `harness view` reads this module too

    spec, metric, x_name = run.spec, run.spec.stats.correlate[1], run.spec.stats.correlate[0]
    name, comparison = next(iter(spec.comparisons.items()))
    figures = [
        (
            f"Per-layer effect size of {metric} ({comparison.a} − {comparison.b})",
            plots.effect_by_layer(pd.DataFrame(layer_rows(run)), metric, name, run_dir / PLOT_FILES["effect"]),
        ),
        (
            f"Mean {metric} by layer",
            plots.means_by_layer(_layer_means(run), metric, run_dir / PLOT_FILES["means"]),
        ),
        (
            f"{x_name} vs {metric} per text",
            plots.paired_scatter(_scatter_pairs(run, comparison), x_name, metric, run_dir / PLOT_FILES["scatter"]),
        ),
        (
            f"{metric} per sample and condition",
            plots.per_sample_distribution(overall_metric(run.table, metric), metric, run_dir / PLOT_FILES["distribution"]),
        ),
    ]
    if spec.grid.windows:
        figures.append((
            f"Effect size of {metric} by layer and position window ({comparison.a} − {comparison.b})",
            plots.window_heatmap(pd.DataFrame(window_cells(run)), metric, name, run_dir / PLOT_FILES["windows"]),
        ))
    if projection_columns(run):
        figures.append(
            ("Projection metrics by layer", plots.projection_by_layer(_projection_means(run), run_dir / PLOT_FILES["projections"]))
        )
    if run.token_deltas:
        figures.append(
            ("Delta norm by token position", plots.delta_norms_by_position(_delta_steps(run), run_dir / PLOT_FILES["deltas"]))
        )
    return [{"title": title, "file": path.name} for title, path in figures]


def _layer_means(run: RunRecord) -> pd.DataFrame:
    metric = run.spec.stats.correlate[1]
    return pd.DataFrame(
        {"condition": condition, "layer": layer, "mean": run.stat(descriptive_name(metric, condition, "mean", layer_scope(layer)))}
        for condition in run.spec.conditions
        for layer in run.layers
    )


def _scatter_pairs(run: RunRecord, comparison: Comparison) -> pd.DataFrame:
    """Per text of the comparison's conditions: x = the text metric, y = the overall trajectory metric."""
    x_name, y_name = run.spec.stats.correlate
    table = run.table.astype({"sample_id": str})
    x = table[(table["metric"] == x_name) & table["layer"].isna()][["sample_id", "condition", "value"]]
    pairs = x.rename(columns={"value": "x"}).merge(
        overall_metric(table, y_name).rename(columns={"value": "y"}), on=["condition", "sample_id"]
    )
    return pairs[pairs["condition"].isin([comparison.a, comparison.b])]


def window_cells(run: RunRecord) -> list[dict]:
    """Per position window and layer: the primary comparison's d of the studied metric, and
    whether its p survives Holm across windows x layers."""
    name, alpha, grid = next(iter(run.spec.comparisons)), run.spec.report.alpha, run.spec.grid
    metric = grid.column(run.spec.stats.correlate[1])
    return [
        {"window": f"{window.start}–{window.end}", "layer": layer,
         "d": run.stat(paired_name(metric.at(window).name, layer_scope(layer), "d", name)),
         "significant": run.stat(paired_name(metric.at(window).name, layer_scope(layer), "p_holm", name)) < alpha}
        for window in grid.windows
        for layer in run.layers
    ]


def projection_columns(run: RunRecord) -> list[Column]:
    """The projection metric columns of the first capture site (`<metric>.<direction>`)."""
    return [column for column in run.spec.grid.primary_columns() if column.direction is not None]


def _projection_means(run: RunRecord) -> pd.DataFrame:
    """Per projection column, condition and layer: the mean over samples and its t confidence interval."""
    names = [column.name for column in projection_columns(run)]
    rows = run.table[run.table["metric"].isin(names) & run.table["layer"].notna()]
    summary = rows.groupby(["metric", "condition", "layer"], sort=False)["value"].agg(["mean", "sem", "count"]).reset_index()
    half = summary["sem"] * student_t.ppf((1 + run.spec.stats.confidence) / 2, (summary["count"] - 1).clip(lower=1))
    return summary.assign(column=summary["metric"], ci_low=summary["mean"] - half, ci_high=summary["mean"] + half)


def _delta_steps(run: RunRecord) -> pd.DataFrame:
    """token_deltas.jsonl in long form: one row per (layer, condition, position) step."""
    return pd.DataFrame(
        {"layer": row["layer"], "condition": row["condition"], "position": position, "norm": norm}
        for row in run.token_deltas
        for position, norm in enumerate(row["norms"])
    )


# --- context ------------------------------------------------------------------------------


def build_context(run: RunRecord, diagnostics: dict, figures: list[dict]) -> dict:
    """Everything the template shows, as plain values (floats may be NaN), but for the run's id
    and manifest (`report_stage.write_results`)."""
    spec = run.spec
    name, comparison = next(iter(spec.comparisons.items()))
    return {
        "title": spec.name,
        "description": spec.description.strip(),
        "confidence": spec.stats.confidence,
        "alpha": spec.report.alpha,
        "hypothesis": spec.report.hypothesis.strip(),
        "metric": spec.stats.correlate[1],
        "x_metric": spec.stats.correlate[0],
        "conditions": list(spec.conditions),
        "primary": {"name": name, "a": comparison.a, "b": comparison.b},
        "criteria": _criteria(run.criteria),
        "criteria_summary": summary_line([from_json(row) for row in run.criteria]),
        "summary_rows": _summary_rows(run, name),
        "overall_rule": _rule_description(spec.stats.overall_rules[0]),
        "other_rules": _other_rules(run, name),
        "layer_summary": {stat: run.stat(paired_name(spec.stats.correlate[1], LAYER_SUMMARY_SCOPE, stat, name))
                          for stat in LAYER_SUMMARIES},
        "correlations": _correlation_rows(run, name, comparison),
        "layer_rows": layer_rows(run),
        "windows": window_tables(run, name),
        "directions": direction_notes(run, name),
        "interventions": intervention_notes(run),
        "other_comparisons": [
            {"name": other, "a": cmp.a, "b": cmp.b, "rows": _paired_rows(run, other)}
            for other, cmp in list(spec.comparisons.items())[1:]
        ],
        "mixed_model": _mixed_model(run, name),
        "verdict": verdict(run),
        "effect": effect_notes(run),
        "attribution": token_attribution(run.token_deltas, list(spec.conditions)),
        "plots_enabled": spec.report.plots,
        "figures": figures,
        "threats": threats_to_validity(run, diagnostics),
        "dropped": diagnostics["dropped"],
    }


def _rule_description(rule) -> str:
    """How a rule of `stats.overall` makes one value of a sample's layers, in words."""
    if isinstance(rule, str):
        return {
            "mean": "the mean over layers",
            "standardized": "the mean over layers of each layer's values divided by their SD over every text",
            "median_layer": "the median over layers",
        }[rule]
    low, high = rule.layers
    return f"the mean over the layers at relative depths {low:g} to {high:g}"


def _other_rules(run: RunRecord, comparison: str) -> list[dict]:
    """The studied metric's paired statistics by each further rule of `stats.overall`."""
    metric = run.spec.stats.correlate[1]
    return [
        {"scope": scope, "rule": _rule_description(rule), **_paired(run, comparison, metric, scope)}
        for (scope, _), rule in list(zip(run.spec.grid.overall_scopes().items(), run.spec.stats.overall_rules))[1:]
    ]


def _criteria(rows: list[dict]) -> list[dict]:
    return [
        {"outcome": outcome(from_json(row)), "name": row["name"], "expr": row["expr"],
         "stat_values": row["values"], "error": row.get("error")}
        for row in rows
    ]


def _paired(run: RunRecord, comparison: str, column: str, scope: str = OVERALL) -> dict[str, float]:
    return {stat: run.stat(paired_name(column, scope, stat, comparison)) for stat in PAIRED_STATS}


def _paired_rows(run: RunRecord, comparison: str, window: Window | None = None) -> list[dict]:
    """A comparison's paired statistics per metric (trajectory and projection metrics: overall;
    with `window`, on the window's tokens; the rows name the whole-response column)."""
    columns = run.spec.grid.primary_columns()
    return [
        *({"metric": metric, "trajectory": False, **_paired(run, comparison, metric)}
          for metric in ([] if window else TEXT_METRIC_NAMES)),
        *({"metric": column.name, "trajectory": True, **_paired(run, comparison, column.at(window).name)}
          for column in columns),
    ]


def window_tables(run: RunRecord, comparison: str) -> list[dict]:
    """Per position window: each metric's paired statistics on the window's tokens (overall), and
    how many layers are significant after Holm across windows x layers."""
    alpha, grid = run.spec.report.alpha, run.spec.grid
    tables = []
    for window in grid.windows:
        rows = _paired_rows(run, comparison, window)
        for row, column in zip(rows, grid.primary_columns()):
            holm = [run.stat(paired_name(column.at(window).name, layer_scope(layer), "p_holm", comparison))
                    for layer in run.layers]
            row["holm_layers"] = sum(p < alpha for p in holm)
        tables.append({"name": window.name, "start": window.start, "end": window.end, "rows": rows})
    return tables


def direction_notes(run: RunRecord, comparison: str) -> list[dict]:
    """Per direction set: its file, what built it (a `harness directions` file says), which
    samples its statistics use, and its projection metrics' strongest layer."""
    notes = []
    recorded = run.manifest.get("directions", {})
    for name, entry in run.spec.directions.items():
        record = recorded.get(name, {})
        metadata = record.get("metadata", {})
        rows = []
        for column in projection_columns(run):
            if column.direction != name:
                continue
            layers = [(run.stat(paired_name(column.name, layer_scope(layer), "d", comparison)), layer) for layer in run.layers]
            finite = [(d, layer) for d, layer in layers if not math.isnan(d)]
            strongest = max(finite, key=lambda pair: abs(pair[0])) if finite else (float("nan"), None)
            rows.append({"metric": column.name, **_paired(run, comparison, column.name),
                         "strongest_layer": strongest[1], "strongest_d": strongest[0]})
        samples = metadata.get("samples")
        notes.append({
            "name": name, "path": entry.path, "sha256": record.get("sha256"), "shape": record.get("shape"),
            "held_out": entry.evaluate_on == "held_out", "metadata": metadata, "rows": rows,
            "built_from": samples is not None and id_ranges([int(sample) for sample in samples.split(",") if sample]),
        })
    return notes


def intervention_notes(run: RunRecord) -> list[dict]:
    """Per `intervene` condition, what was changed (as the manifest records it) and what it did to
    the next-token distribution: its mean KL from the clean forward, its CE beside `of`'s."""
    notes = []
    for name, record in run.manifest.get("interventions", {}).items():
        condition = run.spec.conditions[name]
        (kind, settings), = record["do"].items()
        notes.append({
            "name": name, "of": condition.of, "site": record["site"], "layers": record["layers"],
            "positions": record["positions"], "during": record["during"], "kind": kind,
            "settings": {key: value for key, value in settings.items() if key != "direction"},
            "direction": settings.get("direction"), "file": record.get("direction", {}).get("path"),
            "sha256": record.get("direction", {}).get("sha256"),
            "kl": run.stat(descriptive_name("kl_from_clean", name, "mean")),
            "ce": run.stat(descriptive_name("ce_loss", name, "mean")),
            "ce_of": run.stat(descriptive_name("ce_loss", condition.of, "mean")),
        })
    return notes


def id_ranges(ids: list[int]) -> str:
    """Sample ids as runs of consecutive ids: `0–24, 30`."""
    runs: list[list[int]] = []
    for sample in sorted(ids):
        if runs and sample == runs[-1][-1] + 1:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}" for run in runs)


def _summary_rows(run: RunRecord, comparison: str) -> list[dict]:
    """Per metric: each condition's mean ± sd, then the primary comparison's paired statistics."""
    rows = _paired_rows(run, comparison)
    for row in rows:
        row["conditions"] = [
            {"mean": run.stat(descriptive_name(row["metric"], c, "mean")), "sd": run.stat(descriptive_name(row["metric"], c, "sd"))}
            for c in run.spec.conditions
        ]
    return rows


def _correlation_rows(run: RunRecord, name: str, comparison: Comparison) -> list[dict]:
    scopes = {
        "pooled": f"pooled ({comparison.a} and {comparison.b})",
        comparison.a: comparison.a,
        comparison.b: comparison.b,
        "difference": f"difference ({comparison.a} − {comparison.b})",
    }
    return [
        {"scope": label, **{stat: run.stat(correlation_name(scope, stat, name)) for stat in CORRELATION_STATS}}
        for scope, label in scopes.items()
    ]


def layer_rows(run: RunRecord) -> list[dict]:
    """Per layer: the primary comparison's paired statistics of the studied metric, and the Holm mark."""
    name = next(iter(run.spec.comparisons))
    metric = run.spec.stats.correlate[1]
    rows = []
    for layer in run.layers:
        scope = layer_scope(layer)
        row = {"layer": layer, **_paired(run, name, metric, scope),
               **{stat: run.stat(paired_name(metric, scope, stat, name)) for stat in ("p_holm", "p_bh")}}
        row["holm_significant"] = row["p_holm"] < run.spec.report.alpha
        rows.append(row)
    return rows


def _mixed_model(run: RunRecord, name: str) -> dict | None:
    """The mixed model's statistics, or None when it was not fitted or the fit failed."""
    values = {stat: run.stat(mixedlm_name(stat, name)) for stat in MIXEDLM_STATS}
    if all(math.isnan(values[stat]) for stat in ("x_coef", "condition_coef")):
        return None
    return {**values, "converged": values["converged"] == 1}


def verdict(run: RunRecord) -> dict | None:
    """The spec's verdict grid, the cell the two criteria's outcomes pick marked; None without one."""
    grid = run.spec.report.verdict
    if grid is None:
        return None
    passed = {row["name"]: bool(row["passed"]) for row in run.criteria}
    actual = (passed[grid.rows], passed[grid.columns])
    cells = [
        [{"text": grid.cells[i][j], "actual": actual == (row, column)} for j, column in enumerate((True, False))]
        for i, row in enumerate((True, False))
    ]
    used = {row["name"]: list(row["values"]) for row in run.criteria}
    others = [{"name": row["name"], "outcome": outcome(from_json(row)), "stat_values": row["values"]}
              for row in run.criteria if row["name"] not in (grid.rows, grid.columns)]
    return {"rows": grid.rows, "columns": grid.columns, "grid": cells, "text": grid.cells[not actual[0]][not actual[1]],
            "rows_statistics": used[grid.rows], "columns_statistics": used[grid.columns], "other_criteria": others}


def effect_notes(run: RunRecord) -> dict:
    """The primary comparison's effect on the studied metric and the pooled correlation: values,
    and whether either is significant in the negative direction or missing."""
    name = next(iter(run.spec.comparisons))
    metric, alpha = run.spec.stats.correlate[1], run.spec.report.alpha
    d, p = run.stat(paired_name(metric, OVERALL, "d", name)), run.stat(paired_name(metric, OVERALL, "p", name))
    r, r_p = run.stat(correlation_name("pooled", "r", name)), run.stat(correlation_name("pooled", "p", name))
    pair_r, pair_p = (run.stat(correlation_name("difference", stat, name)) for stat in ("r", "p"))
    return {
        "d": d,
        "p": p,
        "r": r,
        "r_p": r_p,
        "difference_r": pair_r,
        "difference_p": pair_p,
        "difference_correlation": pair_r > 0 and pair_p < alpha,
        "effect": d > 0 and p < alpha,
        "correlation": r > 0 and r_p < alpha,
        "negative_effect": d < 0 and p < alpha,
        "negative_correlation": r < 0 and r_p < alpha,
        "effect_missing": math.isnan(d) or math.isnan(p),
        "correlation_missing": math.isnan(r) or math.isnan(r_p),
    }


def token_attribution(token_deltas: list[dict], conditions: list[str]) -> dict | None:
    """Per condition the largest token-to-token steps at the middle saved layer, with context.

    Step i (``norms[i]``) moves from token i to token i + 1; it is attributed to token i + 1,
    the token whose arrival the step measures. None when no deltas were saved.
    """
    if not token_deltas:
        return None
    layers = sorted({row["layer"] for row in token_deltas})
    layer = layers[len(layers) // 2]
    top: dict[str, list[dict]] = {}
    for condition in conditions:
        rows = [row for row in token_deltas if row["layer"] == layer and row["condition"] == condition]
        steps = [(norm, row, i + 1) for row in rows for i, norm in enumerate(row["norms"]) if norm is not None]
        steps.sort(key=lambda step: -step[0])
        top[condition] = [_token_in_context(row, index, norm) for norm, row, index in steps[:TOP_TOKENS]]
    return {"layer": layer, "top": top}


def _token_in_context(row: dict, index: int, norm: float) -> dict:
    """The token made visible (newlines as ↵) with its surrounding whitespace moved to the context."""
    tokens = [_visible(token) for token in row["tokens"]]
    token = tokens[index]
    core = token.strip(" ")
    if core:  # markdown bold must not start or end with a space: move the spaces outside
        leading, trailing = token[: len(token) - len(token.lstrip(" "))], token[len(token.rstrip(" ")) :]
    else:
        leading, core, trailing = "", "␣", ""
    return {
        "sample_id": row["sample_id"],
        "position": index,
        "norm": norm,
        "before": "".join(tokens[max(0, index - CONTEXT_TOKENS) : index]) + leading,
        "token": core,
        "after": trailing + "".join(tokens[index + 1 : index + 1 + CONTEXT_TOKENS]),
    }


def _visible(token: str) -> str:
    return token.replace("\n", "↵").replace("\t", "⇥")


def threats_to_validity(run: RunRecord, diagnostics: dict) -> dict:
    """What besides the conditions' intended difference could explain the result: the text
    diagnostics against the spec's `report.threats` thresholds."""
    spec, limits = run.spec, run.spec.report.threats
    per_condition = diagnostics["conditions"]
    name, comparison = next(iter(spec.comparisons.items()))
    scale_free = limits.scale_free_metric
    threats = {
        "ngram_size": diagnostics["ngram_size"],
        "ngram_unit": diagnostics["ngram_unit"],
        "repetition": [
            {"condition": c, **d["repeated_ngram_fraction"], **_association(d["repetition_vs_metric"], spec.report.alpha),
             "flagged": _exceeds(d["repeated_ngram_fraction"]["mean"], limits.repetition_mean)
             or _exceeds(d["repeated_ngram_fraction"]["max"], limits.repetition_max)}
            for c, d in per_condition.items()
        ],
        "early_stop": [
            {"condition": c, "share": d["stopped_early_share"], "flagged": _exceeds(d["stopped_early_share"], limits.early_stop)}
            for c, d in per_condition.items()
            if d["stopped_early_share"] is not None
        ],
        "flags": limits.model_dump(),
        "length": _length_threat(per_condition, comparison, limits.length_difference),
        "length_matching": spec.capture.length_matching,
        "artifacts": [
            {"condition": c, "source": spec.conditions[c].source, **d["artifact_share"],
             "any": any(share for share in d["artifact_share"].values())}
            for c, d in per_condition.items()
        ],
        "artifact_names": list(ARTIFACT_PATTERNS),
        "controls": _control_threat(run),
        "scale_free": scale_free and {
            "metric": scale_free,
            "d": run.stat(paired_name(scale_free, OVERALL, "d", name)),
            "p": run.stat(paired_name(scale_free, OVERALL, "p", name)),
        },
        "layers": _layer_dominance(run, name, limits.layer_dominance),
        "correlations": _correlation_disagreement(run, name, comparison),
        "influence": _influence(run, name, diagnostics),
    }
    return threats | {"fired": fired_threats(threats)}


def fired_threats(threats: dict) -> list[dict]:
    """The threats that fired, in the report's order: ``kind`` (the anchor of its details) and
    ``row`` (its numbers)."""
    fired = [{"kind": "repetition", "row": row} for row in threats["repetition"] if row["flagged"]]
    fired += [{"kind": "early-stop", "row": row} for row in threats["early_stop"] if row["flagged"]]
    singles = {"length": threats["length"], "layers": threats["layers"], "correlations": threats["correlations"],
               "influence": threats["influence"]}
    if threats["controls"]["warning"]:
        fired.append({"kind": "controls", "row": threats["controls"]})
    return fired + [{"kind": kind, "row": row} for kind, row in singles.items() if row["flagged"]]


def _layer_dominance(run: RunRecord, comparison: str, limit: float) -> dict:
    """The quarter of the layers carrying the largest shares of the studied metric's mean over
    layers (`stats.layer_shares`), their share together, and whether it exceeds `limit`."""
    metric = run.spec.stats.correlate[1]
    means = [[run.stat(paired_name(metric, layer_scope(layer), stat, comparison)) for layer in run.layers]
             for stat in ("mean_a", "mean_b")]
    shares = layer_shares(*means)
    count = max(1, len(run.layers) // 4)
    ranked = sorted(zip(run.layers, shares), key=lambda pair: -pair[1] if not math.isnan(pair[1]) else math.inf)[:count]
    carried = float(sum(share for _, share in ranked)) if ranked else math.nan
    return {"count": count, "n_layers": len(run.layers), "layers": id_ranges([layer for layer, _ in ranked]),
            "share": carried, "max": run.stat(paired_name(metric, LAYER_SUMMARY_SCOPE, "share_of_overall_max", comparison)),
            "flagged": carried > limit}


def _correlation_disagreement(run: RunRecord, name: str, comparison: Comparison) -> dict:
    """The pooled correlation against the within-condition and the pairs' difference correlations:
    those that differ from it in sign or in significance (at `report.alpha`)."""
    alpha = run.spec.report.alpha
    r, p = (run.stat(correlation_name("pooled", stat, name)) for stat in ("r", "p"))
    rows = []
    for scope in (comparison.a, comparison.b, "difference"):
        other_r, other_p = (run.stat(correlation_name(scope, stat, name)) for stat in ("r", "p"))
        disagrees = (other_r > 0) != (r > 0) or (other_p < alpha) != (p < alpha)
        rows.append({"scope": scope, "r": other_r, "p": other_p, "disagrees": disagrees and not math.isnan(other_r)})
    return {"r": r, "p": p, "rows": rows, "flagged": not math.isnan(r) and any(row["disagrees"] for row in rows)}


def _influence(run: RunRecord, name: str, diagnostics: dict) -> dict:
    """The sample whose leaving out changes the primary d of the studied metric most, by how much,
    its texts' repetition, and whether the change exceeds `report.threats.influence`."""
    metric, limits = run.spec.stats.correlate[1], run.spec.report.threats
    change = run.stat(paired_name(metric, OVERALL, "d_loo_max_change", name))
    sample = run.stat(paired_name(metric, OVERALL, "d_loo_max_change_sample", name))
    sample_id = None if math.isnan(sample) else str(int(sample))
    repetition = [
        {"condition": condition, "share": shares[sample_id], "flagged": shares[sample_id] > limits.repetition_max}
        for condition, values in diagnostics["conditions"].items()
        if sample_id in (shares := values["repeated_ngram_fraction_by_sample"])
    ]
    return {"d": run.stat(paired_name(metric, OVERALL, "d", name)), "change": change, "sample": sample_id,
            "repetition": repetition, "flagged": change > limits.influence}


def _exceeds(value: float | None, limit: float) -> bool:
    return value is not None and value > limit


def _association(pearson: dict, alpha: float) -> dict:
    return {"r": pearson["r"], "p": pearson["p"], "associated": pearson["p"] is not None and pearson["p"] < alpha}


def _length_threat(per_condition: dict, comparison: Comparison, limit: float) -> dict:
    """Mean response lengths per condition, and whether the primary pair differs by more than `limit`."""
    mean_a = per_condition[comparison.a]["response_tokens"]["mean"]
    mean_b = per_condition[comparison.b]["response_tokens"]["mean"]
    difference = abs(mean_a - mean_b) / max(mean_a, mean_b) if mean_a and mean_b else math.nan
    return {
        "rows": [{"condition": c, **d["response_tokens"]} for c, d in per_condition.items()],
        "relative_difference": difference,
        "flagged": difference > limit,
        "a": comparison.a,
        "b": comparison.b,
    }


def _control_threat(run: RunRecord) -> dict:
    """Control conditions (derived from another condition, e.g. shuffled), the conditions with
    the lowest and highest mean of the studied metric, and whether a control sits at the end
    the spec reserves for real text (`report.threats.control_must_not_be`)."""
    metric = run.spec.stats.correlate[1]
    controls = [c for c, condition in run.spec.conditions.items() if condition.derived_from()]
    means = {c: run.stat(descriptive_name(metric, c, "mean")) for c in run.spec.conditions}
    finite = {c: mean for c, mean in means.items() if not math.isnan(mean)}
    ends = {"lowest": min(finite, key=finite.get), "highest": max(finite, key=finite.get)} if finite else {}
    forbidden = run.spec.report.threats.control_must_not_be
    return {
        "conditions": controls,
        "means": means,
        "lowest": ends.get("lowest"),
        "highest": ends.get("highest"),
        "warning": forbidden if forbidden and ends.get(forbidden) in controls else None,
        "at_end": ends.get(forbidden) if forbidden else None,
    }
