"""Statistics over the per-sample metrics: descriptives, paired tests, correlations, a mixed model.

Input is ``per_sample.csv`` in tidy long form (``sample_id,condition,layer,metric,value``;
``layer`` empty for per-text metrics). Output is one FLAT ``name -> float`` dict whose names
are words joined by dots, so that criteria can refer to them:

- descriptives, per condition ``c`` (unprefixed only): ``m.c.mean``, ``m.c.sd`` (ddof=1),
  ``m.c.n``; for trajectory metrics also ``m.c.layer<l>.mean``. The value of a trajectory
  metric for a sample as a whole ("overall") is its mean over layers.
- per comparison ``k`` (a vs b, on ``a - b`` per sample): ``k.m.overall.<stat>`` and, for
  trajectory metrics, ``k.m.layer<l>.<stat>`` (``PAIRED_STATS``; per layer also the
  ``LAYER_ADJUSTED_P`` across the layers of the metric); ``k.correlation.<scope>.<stat>``;
  ``k.mixedlm.<stat>``. The primary comparison (the first) also gets every name without
  the ``k.`` prefix.

Choices worth knowing:

- Paired statistics and correlations of a comparison use the samples present in both of its
  conditions. NaN values are not dropped: they make the statistics they enter NaN.
- Cohen's d_z = mean(diff) / sd(diff, ddof=``stats.ddof``); the seed analysis used ddof=0.
- Confidence intervals are BCa bootstrap intervals (``scipy.stats.bootstrap``) that resample
  sample ids. All bootstrapped statistics of one comparison are computed in one call, so they
  share one set of resampled ids drawn from ``numpy.random.default_rng(stats.seed)``; each
  interval therefore equals what ``scipy.stats.bootstrap(..., method="BCa", rng=default_rng(seed))``
  gives for that statistic on its own. Degenerate bootstrap distributions give NaN bounds;
  ``bootstrap_resamples: 0`` gives NaN intervals.
- Correlations are Pearson's r between the text metric ``stats.correlate[0]`` and the overall
  trajectory metric ``stats.correlate[1]``, within each condition, pooled over both conditions'
  samples, and between the per-sample differences.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import bootstrap, pearsonr, ttest_rel, wilcoxon

from harness.artifacts import content_hash
from harness.errors import RunFailure
from harness.executor import Stage
from harness.statnames import (
    COLUMNS,
    CORRELATION_STATS,
    LAYER_ADJUSTED_P,
    MIXEDLM_STATS,
    OVERALL,
    PAIRED_STATS,
)
from harness.schema import Comparison, Spec, StatsSpec

STAGE_VERSION = 1
"""Bump when a change here changes any statistic: cached stats stages are then recomputed."""

_BOOTSTRAP_BATCH = 250
"""Resamples evaluated per vectorised call: bounds memory, does not change the result."""

def load_table(path: Path | io.StringIO) -> pd.DataFrame:
    """Read per_sample.csv; ``layer`` is a nullable integer (missing for per-text metrics)."""
    try:
        table = pd.read_csv(
            path,
            dtype={"sample_id": str, "condition": str, "metric": str, "layer": "Int64", "value": float},
            # Only empty cells are missing: a sample or condition called "NA" stays a name.
            keep_default_na=False,
            na_values={"layer": [""], "value": ["", "nan", "NaN"]},
        )
    except (OSError, ValueError) as exc:
        raise RunFailure(f"{path}: cannot read the per-sample table ({exc})") from None
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise RunFailure(f"{path}: missing column(s) {', '.join(missing)}")
    if table.duplicated(["sample_id", "condition", "layer", "metric"]).any():
        raise RunFailure(f"{path}: a (sample_id, condition, layer, metric) appears twice")
    return table


def compute_stats(table: pd.DataFrame, spec: Spec) -> dict[str, float]:
    """Every statistic of the run as a flat, JSON-serialisable ``name -> float`` dict."""
    per_condition = {condition: _per_sample(table, condition) for condition in table["condition"].unique()}
    stats = _descriptives(per_condition)
    for index, (name, comparison) in enumerate(spec.comparisons.items()):
        paired = _comparison_stats(per_condition, name, comparison, spec.stats)
        if index == 0:
            stats |= paired
        stats |= {f"{name}.{key}": value for key, value in paired.items()}
    return {key: float(value) for key, value in stats.items()}


def _per_sample(table: pd.DataFrame, condition: str) -> pd.DataFrame:
    """One condition's values: a row per sample_id, a column per (metric, scope).

    Text metrics have the scope ``overall``; trajectory metrics ``overall`` (the mean over
    layers) and ``layer<l>`` for each layer, in layer order.
    """
    rows = table[table["condition"] == condition]
    columns: dict[tuple[str, str], pd.Series] = {}
    for metric, values in rows[rows["layer"].isna()].groupby("metric", sort=False):
        columns[(metric, OVERALL)] = values.set_index("sample_id")["value"]
    for metric, values in rows[rows["layer"].notna()].groupby("metric", sort=False):
        layers = values.pivot(index="sample_id", columns="layer", values="value")
        columns[(metric, OVERALL)] = layers.mean(axis=1)
        columns |= {(metric, f"layer{layer}"): layers[layer] for layer in layers.columns}
    return pd.DataFrame(columns).sort_index()


def _descriptives(per_condition: dict[str, pd.DataFrame]) -> dict[str, float]:
    stats: dict[str, float] = {}
    for condition, values in per_condition.items():
        for (metric, scope), column in values.items():
            if scope == OVERALL:
                stats[f"{metric}.{condition}.mean"] = column.mean()
                stats[f"{metric}.{condition}.sd"] = column.std(ddof=1)
                stats[f"{metric}.{condition}.n"] = column.count()
            else:
                stats[f"{metric}.{condition}.{scope}.mean"] = column.mean()
    return stats


def _comparison_stats(
    per_condition: dict[str, pd.DataFrame], name: str, comparison: Comparison, settings: StatsSpec
) -> dict[str, float]:
    """The unprefixed statistics of one comparison: paired tests, correlations, mixed model."""
    for condition in (comparison.a, comparison.b):
        if condition not in per_condition:
            raise RunFailure(f"comparison {name}: the per-sample table has no rows for condition {condition!r}")
    a, b = per_condition[comparison.a].align(per_condition[comparison.b], join="inner")
    if len(a) < 2:
        raise RunFailure(
            f"comparison {name}: needs at least 2 samples present in both {comparison.a} and {comparison.b}, "
            f"found {len(a)}"
        )
    x_column, y_column = [(metric, OVERALL) for metric in settings.correlate]
    for column in (x_column, y_column):
        if column not in a.columns:
            raise RunFailure(f"stats.correlate: the per-sample table has no metric {column[0]!r}")
    x, y = a.columns.get_loc(x_column), a.columns.get_loc(y_column)

    def resampled(a_values: np.ndarray, b_values: np.ndarray, axis: int) -> np.ndarray:
        # Rows of a_values/b_values are the table's columns; `axis` runs over samples.
        diff = a_values - b_values
        scopes = _correlation_scopes(a_values[x], b_values[x], a_values[y], b_values[y], comparison, axis)
        correlations = [pearsonr(*pair, axis=axis).statistic for pair in scopes.values()]
        return np.concatenate([diff.mean(axis=axis), _cohens_dz(diff, settings.ddof, axis), np.stack(correlations)])

    low, high = _bootstrap_intervals(a.to_numpy().T, b.to_numpy().T, resampled, settings)
    split = 2 * a.shape[1]  # mean_diff and d for every column, then the correlations
    stats = _paired_stats(a, b, settings.ddof, low[:split], high[:split])
    stats |= _correlations(a[x_column], b[x_column], a[y_column], b[y_column], comparison, low[split:], high[split:])
    if settings.mixed_model:
        stats |= _mixed_model(a[x_column], b[x_column], a[y_column], b[y_column])
    return stats


def _cohens_dz(diff: np.ndarray, ddof: int, axis: int) -> np.ndarray:
    """Paired Cohen's d_z: mean difference over the SD of the differences."""
    with np.errstate(divide="ignore", invalid="ignore"):  # zero SD: inf or NaN, as it should
        return diff.mean(axis=axis) / diff.std(axis=axis, ddof=ddof)


def _correlation_scopes(
    x_a: np.ndarray, x_b: np.ndarray, y_a: np.ndarray, y_b: np.ndarray, comparison: Comparison, axis: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (x, y) samples each correlation is computed on, by scope name."""
    return {
        "pooled": (np.concatenate([x_a, x_b], axis=axis), np.concatenate([y_a, y_b], axis=axis)),
        comparison.a: (x_a, y_a),
        comparison.b: (x_b, y_b),
        "difference": (x_a - x_b, y_a - y_b),
    }


def _bootstrap_intervals(
    a: np.ndarray, b: np.ndarray, statistic: Callable[..., np.ndarray], settings: StatsSpec
) -> tuple[np.ndarray, np.ndarray]:
    """BCa intervals of every output of ``statistic(a, b, axis)``, resampling samples (last axis) jointly."""
    if settings.bootstrap_resamples == 0:
        nan = np.full(statistic(a, b, axis=-1).shape, np.nan)
        return nan, nan
    with warnings.catch_warnings():
        # Degenerate resamples (constant values, tiny n) only make their bounds NaN.
        warnings.simplefilter("ignore")
        result = bootstrap(
            (a, b),
            statistic,
            n_resamples=settings.bootstrap_resamples,
            batch=_BOOTSTRAP_BATCH,
            vectorized=True,
            paired=True,
            axis=-1,
            confidence_level=settings.confidence,
            method="BCa",
            rng=np.random.default_rng(settings.seed),
        )
    return result.confidence_interval.low, result.confidence_interval.high


def _paired_stats(
    a: pd.DataFrame, b: pd.DataFrame, ddof: int, ci_low: np.ndarray, ci_high: np.ndarray
) -> dict[str, float]:
    """``<metric>.<scope>.<stat>`` for every column; ``ci_*`` hold the mean_diff then the d bounds."""
    width = a.shape[1]
    a_values, b_values = a.to_numpy(), b.to_numpy()
    diff = a_values - b_values
    student, signed_rank = ttest_rel(a_values, b_values, axis=0), wilcoxon(a_values, b_values, axis=0)
    per_column = pd.DataFrame(
        {
            "mean_a": a_values.mean(axis=0),
            "mean_b": b_values.mean(axis=0),
            "mean_diff": diff.mean(axis=0),
            "mean_diff_ci_low": ci_low[:width],
            "mean_diff_ci_high": ci_high[:width],
            "d": _cohens_dz(diff, ddof, axis=0),
            "d_ci_low": ci_low[width:],
            "d_ci_high": ci_high[width:],
            "t": student.statistic,
            "p": student.pvalue,
            "wilcoxon_w": signed_rank.statistic,
            "wilcoxon_p": signed_rank.pvalue,
            "n": len(a),
        },
        index=a.columns,
    )
    per_column = per_column.join(_layer_adjusted_p(per_column["p"]))
    stats: dict[str, float] = {}
    for (metric, scope), row in per_column.to_dict("index").items():
        names = PAIRED_STATS if scope == OVERALL else (*PAIRED_STATS, *LAYER_ADJUSTED_P)
        stats |= {f"{metric}.{scope}.{stat}": row[stat] for stat in names}
    return stats


def _layer_adjusted_p(p: pd.Series) -> pd.DataFrame:
    """Per-layer p-values adjusted across the layers of their metric (NaN for overall and NaN p)."""
    from statsmodels.stats.multitest import multipletests  # statsmodels imports in ~1 s: only when computing

    metrics, scopes = p.index.get_level_values(0), p.index.get_level_values(1)
    adjusted = {stat: np.full(len(p), np.nan) for stat in LAYER_ADJUSTED_P}
    for metric in metrics.unique():
        rows = np.flatnonzero((metrics == metric) & (scopes != OVERALL) & p.notna().to_numpy())
        if rows.size:
            for stat, method in LAYER_ADJUSTED_P.items():
                adjusted[stat][rows] = multipletests(p.to_numpy()[rows], method=method)[1]
    return pd.DataFrame(adjusted, index=p.index)


def _correlations(
    x_a: pd.Series,
    x_b: pd.Series,
    y_a: pd.Series,
    y_b: pd.Series,
    comparison: Comparison,
    ci_low: np.ndarray,
    ci_high: np.ndarray,
) -> dict[str, float]:
    """``correlation.<scope>.<stat>``; ``ci_*`` are in the order of ``_correlation_scopes``."""
    scopes = _correlation_scopes(x_a.to_numpy(), x_b.to_numpy(), y_a.to_numpy(), y_b.to_numpy(), comparison, axis=0)
    stats: dict[str, float] = {}
    for (scope, (x, y)), low, high in zip(scopes.items(), ci_low, ci_high):
        result = pearsonr(x, y)
        values = (result.statistic, result.pvalue, low, high, len(x))
        stats |= {f"correlation.{scope}.{stat}": value for stat, value in zip(CORRELATION_STATS, values)}
    return stats


def _mixed_model(x_a: pd.Series, x_b: pd.Series, y_a: pd.Series, y_b: pd.Series) -> dict[str, float]:
    """MixedLM ``y ~ x + condition`` (b=0, a=1), random intercept per sample; NaN if the fit fails."""
    frame = pd.DataFrame(
        {
            "sample_id": np.concatenate([x_a.index, x_b.index]),
            "x": np.concatenate([x_a, x_b]),
            "y": np.concatenate([y_a, y_b]),
            "condition": np.repeat([1, 0], [len(x_a), len(x_b)]),
        }
    )
    import statsmodels.formula.api as smf

    failed = {f"mixedlm.{stat}": np.nan for stat in MIXEDLM_STATS} | {"mixedlm.converged": 0.0}
    if frame.isna().any(axis=None):  # NaN values make statistics NaN, here as everywhere
        return failed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is reported as mixedlm.converged = 0
            fit = smf.mixedlm("y ~ x + condition", frame, groups=frame["sample_id"]).fit()
    except (np.linalg.LinAlgError, ValueError):  # singular design (e.g. x constant)
        return failed
    values = (fit.params["x"], fit.pvalues["x"], fit.params["condition"], fit.pvalues["condition"], fit.converged)
    return {f"mixedlm.{stat}": value for stat, value in zip(MIXEDLM_STATS, values)}


@dataclass
class StatsStage(Stage):
    """Every statistic of a run's per-sample table (the table's text is the input)."""

    table_csv: str
    spec: Spec
    name = kind = "stats"
    version = STAGE_VERSION

    def inputs(self) -> dict:
        return {
            "table": content_hash(self.table_csv),
            "comparisons": {name: c.model_dump(mode="json") for name, c in self.spec.comparisons.items()},
            "stats": self.spec.stats.model_dump(mode="json"),
        }

    def compute(self, unit: None, folder: Path) -> dict[str, float]:
        return compute_stats(load_table(io.StringIO(self.table_csv)), self.spec)

    def describe(self, output: dict) -> str:
        return f"{len(output)} statistics"
