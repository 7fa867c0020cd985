"""Report stage: a finished run folder → diagnostics.json, figures and RESULTS.md.

All decisions (which statistics go where, which interpretation holds, which threats to
validity apply) are made here and handed to a jinja2 template as a context dict of plain
values; the template only formats and lays them out. Missing statistics are NaN in the
context and shown as "–", so a run without a mixed model or with one comparison renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pandas as pd
import yaml

import harness
from harness import plots
from harness.artifacts import read_json, read_jsonl, write_json, write_text
from harness.stages.criteria import CriterionResult, format_number, outcome, summary_line
from harness.diagnostics import ARTIFACT_PATTERNS, overall_metric, text_diagnostics
from harness.errors import InputError
from harness.schema import Comparison, Spec
from harness.stages.conditions import ShuffledCondition
from harness.statnames import TEXT_METRIC_NAMES
from harness.stages.stats import CORRELATION_STATS, MIXEDLM_STATS, OVERALL, PAIRED_STATS, load_table

TEMPLATES_DIR = Path(harness.__file__).parent.parent / "reports" / "templates"
"""Templates shipped with the harness; `report.template` names one of these, or a path."""

ALPHA = 0.05
"""Significance level of the interpretation and the per-layer Holm marks."""

TOP_TOKENS = 5
CONTEXT_TOKENS = 3
"""Token attribution: the largest steps per condition, shown with this many tokens either side."""

REPETITION_MEAN_FLAG = 0.10
REPETITION_MAX_FLAG = 0.30
"""Repeated 4-gram fractions above which a condition is flagged as looping (mean / worst text)."""
EARLY_STOP_FLAG = 0.20
"""Share of generated texts ended by EOS above which early stopping is flagged."""
LENGTH_DIFFERENCE_FLAG = 0.10
"""Relative difference of mean response lengths (primary comparison) above which it is flagged."""

NORMALIZED_METRIC = "normalized_smoothness"

PLOT_FILES = {
    "effect": "effect_by_layer.png",
    "means": "metric_by_layer.png",
    "scatter": "correlation_scatter.png",
    "deltas": "delta_norms_by_position.png",
}


@dataclass(frozen=True)
class RunFiles:
    """The contents of a finished run folder."""

    spec: Spec
    manifest: dict
    texts: list[dict]
    table: pd.DataFrame
    token_deltas: list[dict]
    stats: dict[str, float | None]
    criteria: list[dict]

    def stat(self, name: str) -> float:
        """A statistic, NaN when absent or null (so templates and comparisons need no special case)."""
        value = self.stats.get(name)
        return math.nan if value is None else float(value)

    @property
    def layers(self) -> list[int]:
        """Captured layers of the studied trajectory metric, in order."""
        rows = self.table[self.table["metric"] == self.spec.stats.correlate[1]]
        return sorted(int(layer) for layer in rows["layer"].dropna().unique())


def load_run(run_dir: Path) -> RunFiles:
    run_dir = Path(run_dir)
    deltas_file = run_dir / "token_deltas.jsonl"
    return RunFiles(
        spec=Spec.model_validate(yaml.safe_load((run_dir / "spec.yaml").read_text(encoding="utf-8"))),
        manifest=read_json(run_dir / "manifest.json"),
        texts=read_jsonl(run_dir / "texts.jsonl"),
        table=load_table(run_dir / "per_sample.csv"),
        token_deltas=read_jsonl(deltas_file) if deltas_file.is_file() else [],
        stats=read_json(run_dir / "stats.json"),
        criteria=read_json(run_dir / "criteria.json"),
    )


def render_report(run_dir: Path, template: Path | None = None) -> Path:
    """Write diagnostics.json, the figures (unless `report.plots` is off) and RESULTS.md; return its path.

    `template` overrides the spec's `report.template`.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    template_path = _explicit_template(Path(template)) if template else find_template(run.spec, run.manifest["spec_file"])
    diagnostics = text_diagnostics(run.texts, run.table, run.spec)
    write_json(run_dir / "diagnostics.json", diagnostics)
    figures = draw_plots(run, run_dir) if run.spec.report.plots else []
    text = render_template(template_path, build_context(run, diagnostics, figures))
    results = run_dir / "RESULTS.md"
    write_text(results, text)
    return results


# --- templates ----------------------------------------------------------------------------


def find_template(spec: Spec, spec_file: str) -> Path:
    """`report.template`: a file in reports/templates/, else a path (absolute or relative to the spec file)."""
    name = spec.report.template
    for candidate in (TEMPLATES_DIR / name, Path(spec_file).parent / name):
        if candidate.is_file():
            return candidate
    raise InputError(f"{spec_file}: report.template: template '{name}' not found")


def _explicit_template(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: template not found")
    return path


def render_template(path: Path, context: dict) -> str:
    """Render a jinja2 template; a template error is the user's input error, named by file (and line)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(num=format_value, percent=format_percent, md=escape_markdown)
    try:
        return environment.get_template(path.name).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"{path}: line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise InputError(f"{path}: {exc}") from None


def format_value(value: float | int | None) -> str:
    """A number for a table: 4 significant digits, integers as integers, "–" where missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return format_number(float(value))


def format_percent(share: float | None) -> str:
    """A share (0..1) as a whole percentage, "–" where missing."""
    if share is None or math.isnan(share):
        return "–"
    return f"{share:.0%}"


def escape_markdown(text: str) -> str:
    """Text that renders literally inside a markdown table cell."""
    special = "\\`*_[]<>|#"
    return "".join("\\" + char if char in special else char for char in text)


# --- plots --------------------------------------------------------------------------------


def draw_plots(run: RunFiles, run_dir: Path) -> list[dict]:
    """Draw every figure beside RESULTS.md; return [{title, file}] in report order."""
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
    ]
    if run.token_deltas:
        figures.append(
            ("Delta norm by token position", plots.delta_norms_by_position(_delta_steps(run), run_dir / PLOT_FILES["deltas"]))
        )
    return [{"title": title, "file": path.name} for title, path in figures]


def _layer_means(run: RunFiles) -> pd.DataFrame:
    metric = run.spec.stats.correlate[1]
    return pd.DataFrame(
        {"condition": condition, "layer": layer, "mean": run.stat(f"{metric}.{condition}.layer{layer}.mean")}
        for condition in run.spec.conditions
        for layer in run.layers
    )


def _scatter_pairs(run: RunFiles, comparison: Comparison) -> pd.DataFrame:
    """Per text of the comparison's conditions: x = the text metric, y = the overall trajectory metric."""
    x_name, y_name = run.spec.stats.correlate
    table = run.table.astype({"sample_id": str})
    x = table[(table["metric"] == x_name) & table["layer"].isna()][["sample_id", "condition", "value"]]
    pairs = x.rename(columns={"value": "x"}).merge(
        overall_metric(table, y_name).rename(columns={"value": "y"}), on=["condition", "sample_id"]
    )
    return pairs[pairs["condition"].isin([comparison.a, comparison.b])]


def _delta_steps(run: RunFiles) -> pd.DataFrame:
    """token_deltas.jsonl in long form: one row per (layer, condition, position) step."""
    return pd.DataFrame(
        {"layer": row["layer"], "condition": row["condition"], "position": position, "norm": norm}
        for row in run.token_deltas
        for position, norm in enumerate(row["norms"])
    )


# --- context ------------------------------------------------------------------------------


def build_context(run: RunFiles, diagnostics: dict, figures: list[dict]) -> dict:
    """Everything the template shows, as plain values (floats may be NaN)."""
    spec = run.spec
    name, comparison = next(iter(spec.comparisons.items()))
    return {
        "title": spec.name,
        "description": spec.description.strip(),
        "run_id": run.manifest.get("run_id"),
        "confidence": spec.stats.confidence,
        "alpha": ALPHA,
        "metric": spec.stats.correlate[1],
        "x_metric": spec.stats.correlate[0],
        "conditions": list(spec.conditions),
        "primary": {"name": name, "a": comparison.a, "b": comparison.b},
        "criteria": _criteria(run.criteria),
        "criteria_summary": summary_line([_criterion(row) for row in run.criteria]),
        "summary_rows": _summary_rows(run, name),
        "correlations": _correlation_rows(run, name, comparison),
        "layer_rows": layer_rows(run),
        "other_comparisons": [
            {"name": other, "a": cmp.a, "b": cmp.b, "rows": _paired_rows(run, other)}
            for other, cmp in list(spec.comparisons.items())[1:]
        ],
        "mixed_model": _mixed_model(run, name),
        "interpretation": interpretation(run),
        "attribution": token_attribution(run.token_deltas, list(spec.conditions)),
        "plots_enabled": spec.report.plots,
        "figures": figures,
        "threats": threats_to_validity(run, diagnostics),
        "dropped": diagnostics["dropped"],
        "manifest": _manifest(run.manifest),
    }


def _criterion(row: dict) -> CriterionResult:
    return CriterionResult(row["name"], row["expr"], bool(row["passed"]), row["values"], row.get("error"))


def _criteria(rows: list[dict]) -> list[dict]:
    return [
        {"outcome": outcome(_criterion(row)), "name": row["name"], "expr": row["expr"],
         "stat_values": row["values"], "error": row.get("error")}
        for row in rows
    ]


def _paired(run: RunFiles, prefix: str) -> dict[str, float]:
    return {stat: run.stat(f"{prefix}.{stat}") for stat in PAIRED_STATS}


def _paired_rows(run: RunFiles, comparison: str) -> list[dict]:
    """A comparison's paired statistics per metric (trajectory metrics: overall)."""
    return [
        {"metric": metric, "trajectory": metric in run.spec.metrics, **_paired(run, f"{comparison}.{metric}.{OVERALL}")}
        for metric in (*TEXT_METRIC_NAMES, *run.spec.metrics)
    ]


def _summary_rows(run: RunFiles, comparison: str) -> list[dict]:
    """Per metric: each condition's mean ± sd, then the primary comparison's paired statistics."""
    rows = _paired_rows(run, comparison)
    for row in rows:
        row["conditions"] = [
            {"mean": run.stat(f"{row['metric']}.{c}.mean"), "sd": run.stat(f"{row['metric']}.{c}.sd")}
            for c in run.spec.conditions
        ]
    return rows


def _correlation_rows(run: RunFiles, name: str, comparison: Comparison) -> list[dict]:
    scopes = {
        "pooled": f"pooled ({comparison.a} and {comparison.b})",
        comparison.a: comparison.a,
        comparison.b: comparison.b,
        "difference": f"difference ({comparison.a} − {comparison.b})",
    }
    return [
        {"scope": label, **{stat: run.stat(f"{name}.correlation.{scope}.{stat}") for stat in CORRELATION_STATS}}
        for scope, label in scopes.items()
    ]


def layer_rows(run: RunFiles) -> list[dict]:
    """Per layer: the primary comparison's paired statistics of the studied metric, and the Holm mark."""
    name = next(iter(run.spec.comparisons))
    metric = run.spec.stats.correlate[1]
    rows = []
    for layer in run.layers:
        prefix = f"{name}.{metric}.layer{layer}"
        row = {"layer": layer, **_paired(run, prefix), "p_holm": run.stat(f"{prefix}.p_holm"), "p_bh": run.stat(f"{prefix}.p_bh")}
        row["holm_significant"] = row["p_holm"] < ALPHA
        rows.append(row)
    return rows


def _mixed_model(run: RunFiles, name: str) -> dict | None:
    """The mixed model's statistics, or None when it was not fitted or the fit failed."""
    values = {stat: run.stat(f"{name}.mixedlm.{stat}") for stat in MIXEDLM_STATS}
    if all(math.isnan(values[stat]) for stat in ("x_coef", "condition_coef")):
        return None
    return {**values, "converged": values["converged"] == 1}


OUTCOMES = {
    (True, True): "Supported: the model's own text gives smoother trajectories, and smoothness tracks surprise (CE)",
    (True, False): "Smoother, but not explained by predictability",
    (False, True): "Smoothness tracks surprise, but the conditions do not differ",
    (False, False): "Not supported",
}
"""The four outcomes, keyed by (smoother, tracks)."""


def interpretation(run: RunFiles) -> dict:
    """The four-outcome verdict from the primary comparison's overall effect and pooled correlation.

    smoother: d > 0 and p < ALPHA for the studied metric; tracks: pooled r > 0 and p < ALPHA.
    """
    name = next(iter(run.spec.comparisons))
    metric = run.spec.stats.correlate[1]
    d, p = run.stat(f"{name}.{metric}.{OVERALL}.d"), run.stat(f"{name}.{metric}.{OVERALL}.p")
    r, r_p = run.stat(f"{name}.correlation.pooled.r"), run.stat(f"{name}.correlation.pooled.p")
    smoother, tracks = d > 0 and p < ALPHA, r > 0 and r_p < ALPHA
    return {
        "d": d,
        "p": p,
        "r": r,
        "r_p": r_p,
        "smoother": smoother,
        "tracks": tracks,
        "verdict": OUTCOMES[(smoother, tracks)],
        "grid": [
            [{"text": OUTCOMES[(row, column)], "actual": (row, column) == (smoother, tracks)} for column in (True, False)]
            for row in (True, False)
        ],
        "opposite_effect": d < 0 and p < ALPHA,
        "opposite_correlation": r < 0 and r_p < ALPHA,
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


def threats_to_validity(run: RunFiles, diagnostics: dict) -> dict:
    """What besides "the model's own text" could explain the result, from the diagnostics and spec."""
    spec = run.spec
    per_condition = diagnostics["conditions"]
    name, comparison = next(iter(spec.comparisons.items()))
    return {
        "ngram_size": diagnostics["ngram_size"],
        "repetition": [
            {"condition": c, **d["repeated_ngram_fraction"], **_association(d["repetition_vs_metric"]),
             "flagged": _exceeds(d["repeated_ngram_fraction"]["mean"], REPETITION_MEAN_FLAG)
             or _exceeds(d["repeated_ngram_fraction"]["max"], REPETITION_MAX_FLAG)}
            for c, d in per_condition.items()
        ],
        "early_stop": [
            {"condition": c, "share": d["stopped_early_share"], "flagged": _exceeds(d["stopped_early_share"], EARLY_STOP_FLAG)}
            for c, d in per_condition.items()
            if d["stopped_early_share"] is not None
        ],
        "flags": {"repetition_mean": REPETITION_MEAN_FLAG, "repetition_max": REPETITION_MAX_FLAG,
                  "early_stop": EARLY_STOP_FLAG, "length": LENGTH_DIFFERENCE_FLAG},
        "length": _length_threat(per_condition, comparison),
        "length_matching": spec.capture.length_matching,
        "artifacts": [
            {"condition": c, "source": spec.conditions[c].source, **d["artifact_share"],
             "any": any(share for share in d["artifact_share"].values())}
            for c, d in per_condition.items()
        ],
        "artifact_names": list(ARTIFACT_PATTERNS),
        "shuffled": _shuffle_threat(run),
        "normalized": {
            "computed": NORMALIZED_METRIC in spec.metrics,
            "d": run.stat(f"{name}.{NORMALIZED_METRIC}.{OVERALL}.d"),
            "p": run.stat(f"{name}.{NORMALIZED_METRIC}.{OVERALL}.p"),
        },
    }


def _exceeds(value: float | None, limit: float) -> bool:
    return value is not None and value > limit


def _association(pearson: dict) -> dict:
    return {"r": pearson["r"], "p": pearson["p"], "associated": pearson["p"] is not None and pearson["p"] < ALPHA}


def _length_threat(per_condition: dict, comparison: Comparison) -> dict:
    """Mean response lengths per condition, and whether the primary pair differs by more than the flag."""
    mean_a = per_condition[comparison.a]["response_tokens"]["mean"]
    mean_b = per_condition[comparison.b]["response_tokens"]["mean"]
    difference = abs(mean_a - mean_b) / max(mean_a, mean_b) if mean_a and mean_b else math.nan
    return {
        "rows": [{"condition": c, **d["response_tokens"]} for c, d in per_condition.items()],
        "relative_difference": difference,
        "flagged": difference > LENGTH_DIFFERENCE_FLAG,
        "a": comparison.a,
        "b": comparison.b,
    }


def _shuffle_threat(run: RunFiles) -> dict:
    """Shuffled controls, and whether one of them is the smoothest condition (lowest mean metric)."""
    metric = run.spec.stats.correlate[1]
    shuffled = [c for c, cond in run.spec.conditions.items() if isinstance(cond, ShuffledCondition)]
    means = {c: run.stat(f"{metric}.{c}.mean") for c in run.spec.conditions}
    finite = {c: mean for c, mean in means.items() if not math.isnan(mean)}
    smoothest = min(finite, key=finite.get) if finite else None
    return {
        "conditions": shuffled,
        "smoothest": smoothest,
        "means": means,
        "shuffled_is_smoothest": smoothest in shuffled,
    }


def _manifest(manifest: dict) -> dict:
    """The manifest fields the report shows (a missing one is None), and per stage its time and cache use."""
    keys = ("harness_version", "spec_file", "spec_hash", "run_id", "started", "git_commit", "models", "device", "packages")
    timings, cache = manifest.get("timings") or {}, manifest.get("cache") or {}
    stages = [{"stage": stage, "seconds": timings.get(stage), "cache": cache.get(stage)} for stage in {**timings, **cache}]
    return {**{key: manifest.get(key) for key in keys}, "stages": stages}
