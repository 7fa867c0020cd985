"""Statistics over the per-sample metrics: descriptives, paired tests, correlations, a mixed model.

Input is ``per_sample.csv`` in tidy long form (``sample_id,condition,layer,metric,value``;
``layer`` empty for per-text metrics). Output is one FLAT ``name -> float`` dict whose names
are words joined by dots, so that criteria can refer to them:

- descriptives, per condition ``c`` (unprefixed only): ``m.c.mean``, ``m.c.sd`` (ddof=1),
  ``m.c.n``; for trajectory metrics also ``m.c.layer<l>.mean`` and ``m.c.overall_<rule>.mean``.
  The value of a trajectory metric for a sample as a whole ("overall") aggregates its layers by
  the first rule of ``stats.overall`` (default ``mean``: the mean over layers); each further rule
  names its own scope, ``overall_<rule>`` (``harness.statnames.overall_scope``), and
  ``<scope>.rule.<rule>`` = 1 records which rule a scope used.
- per comparison ``k`` (a vs b, on ``a - b`` per sample): ``k.m.overall.<stat>`` and, for
  trajectory metrics, ``k.m.layer<l>.<stat>`` (``PAIRED_STATS``; per layer also the
  ``LAYER_ADJUSTED_P`` across the layers of the metric); per overall scope the influence
  diagnostic ``k.m.overall.d_loo_max_change`` and ``…_sample`` (``INFLUENCE_STATS``: the largest
  change of d_z when one sample is left out, and its id); per trajectory metric
  ``k.m.layers.<summary>`` (``LAYER_SUMMARIES``: layers with d > 0 or < 0 and p_holm below
  ``report.alpha``, the median d, the largest share of the mean over layers one layer carries,
  `layer_shares`); ``k.correlation.<scope>.<stat>``;
  ``k.mixedlm.<stat>``. The primary comparison (the first) also gets every name without
  the ``k.`` prefix.
- a metric ``m`` is a column of the grid (``harness.grid``): it may be a projection column
  ``<metric>.<direction>`` or a per-window column ``<column>.window<s>_<e>``
  (``capture.windows``); the names follow the same rules (``smoothness.window0_5.layer3.d``).
  The ``LAYER_ADJUSTED_P`` of a column adjust across its family (``Column.family``): the
  layers of its metric, or for a per-window column every window x layer of its metric, the
  family a position breakdown tests.

Every name is built by ``harness.statnames``.

Choices worth knowing:

- Samples are in numeric order of their ids (`sample_order`; "2" before "10"), as per_sample.csv
  lists them, whatever order the table's rows come in: the bootstrap resamples them in that order.
- ``standardized`` divides each layer's values by their SD (ddof 1) over every text of the table
  at that layer (every condition: for a spec of two conditions, both together), then averages.
- Missing values are dropped pairwise. A text lacks a metric when the metric is undefined for
  it (a trajectory metric of a response shorter than the metric needs: per_sample.csv has no
  row for it, or a NaN value); a trajectory metric's overall value is missing when any of its
  layers is. Each column (metric and scope) of a comparison uses the samples present in both
  conditions whose column has a value in both, and ``n`` counts them; the other columns keep
  the sample. A correlation uses the (x, y) pairs of its scope that have both values (pooled
  and per condition: texts; difference: samples with all four values); the mixed model, the
  texts that have both. Fewer than 2 pairs give NaN tests, d, r and intervals.
- Cohen's d_z = mean(diff) / sd(diff, ddof=``stats.ddof``); the seed analysis used ddof=0.
- Confidence intervals are BCa bootstrap intervals that resample sample ids, exactly as
  ``scipy.stats.bootstrap((a, b), statistic, paired=True, method="BCa", rng=default_rng(stats.seed))``
  does for one statistic on the samples it uses, in numeric order: the same resampled ids, bias correction and
  acceleration. Only the arithmetic differs (it agrees to rounding): every statistic here is a
  function of sums over samples, so a resample's statistics are one matrix product of the
  resample counts with per-sample terms, for every column at once, and the jackknife behind
  the acceleration is the total minus one sample's terms. Statistics on the same samples share
  one set of resampled ids. Degenerate bootstrap distributions give NaN bounds; fewer than 2
  samples or ``bootstrap_resamples: 0`` give NaN intervals.
- Correlations are Pearson's r between the text metric ``stats.correlate[0]`` and the overall
  trajectory metric ``stats.correlate[1]``, within each condition, pooled over both conditions'
  samples, and between the per-sample differences.
"""

from __future__ import annotations

import gc
import io
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.artifacts import content_hash
from harness.errors import RunFailure
from harness.executor import Stage
from harness.grid import Column
from harness.lazy import lazy_import
from harness.statnames import (
    COLUMNS,
    CORRELATION_STATS,
    INFLUENCE_STATS,
    LAYER_ADJUSTED_P,
    LAYER_SUMMARIES,
    LAYER_SUMMARY_SCOPE,
    MIXEDLM_STATS,
    OVERALL,
    PAIRED_STATS,
    correlation_name,
    descriptive_name,
    is_layer_scope,
    layer_scope,
    mixedlm_name,
    paired_name,
    prefixed,
    rule_name,
)
from harness.schema import Comparison, OverallRule, Spec, StatsSpec, rule_label

# pandas and scipy take a second to import, and a cached stats stage needs neither (harness.lazy)
pd = lazy_import("pandas")
special, scipy_stats = lazy_import("scipy.special"), lazy_import("scipy.stats")

STAGE_VERSION = 4
"""Bump when a change here changes any statistic: cached stats stages are then recomputed.
2: missing values dropped pairwise; intervals from sums (their last bits changed).
3: per-window columns adjusted across windows x layers.
4: samples in numeric order (the bootstrap resampled them in text order, "0", "1", "10", ...:
the resampled ids, and so the interval bounds, changed; the point statistics did not, beyond
rounding); overall rules; layer summaries; leave-one-out influence."""

_RESAMPLE_CHUNK_DRAWS = 2**20
"""Resampled ids drawn and counted at a time: bounds memory, does not change the result."""


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
    rules = dict(zip(spec.grid.overall_scopes(), spec.stats.overall_rules))
    scales = _layer_scales(table) if "standardized" in rules.values() else None
    per_condition = {
        condition: _per_sample(table, condition, rules, scales) for condition in table["condition"].unique()
    }
    stats = _descriptives(per_condition)
    stats |= {rule_name(scope, rule_label(rule)): 1.0 for scope, rule in rules.items()}
    for index, (name, comparison) in enumerate(spec.comparisons.items()):
        paired = _comparison_stats(per_condition, name, comparison, spec.stats, spec.report.alpha)
        if index == 0:
            stats |= paired
        stats |= {prefixed(name, key): value for key, value in paired.items()}
    return {key: float(value) for key, value in stats.items()}


def sample_order(sample_ids: Iterable[str]) -> list[str]:
    """Sample ids in numeric order (``2`` before ``10``); ids that are not numbers after them, as text."""
    return sorted(sample_ids, key=lambda sample: (0, int(sample), "") if sample.isdecimal() else (1, 0, sample))


def _per_sample(
    table: pd.DataFrame, condition: str, rules: dict[str, OverallRule], scales: pd.Series | None
) -> pd.DataFrame:
    """One condition's values: a row per sample_id (numeric order), a column per (metric, scope).

    Text metrics have the scope ``overall``; trajectory metrics one overall scope per rule of
    ``stats.overall`` (``rules``: scope -> rule) and ``layer<l>`` for each layer, in layer order.
    """
    rows = table[table["condition"] == condition]
    columns: dict[tuple[str, str], pd.Series] = {}
    for metric, values in rows[rows["layer"].isna()].groupby("metric", sort=False):
        columns[(metric, OVERALL)] = values.set_index("sample_id")["value"]
    for metric, values in rows[rows["layer"].notna()].groupby("metric", sort=False):
        layers = values.pivot(index="sample_id", columns="layer", values="value")
        columns |= {(metric, scope): _overall(layers, rule, scales, metric) for scope, rule in rules.items()}
        columns |= {(metric, layer_scope(layer)): layers[layer] for layer in layers.columns}
    frame = pd.DataFrame(columns)
    return frame.reindex(sample_order(frame.index))


def _layer_scales(table: pd.DataFrame) -> pd.Series:
    """Per (metric, layer): the SD (ddof 1) of the values over every condition's texts."""
    return table[table["layer"].notna()].groupby(["metric", "layer"])["value"].std(ddof=1)


def _overall(layers: pd.DataFrame, rule: OverallRule, scales: pd.Series | None, metric: str) -> pd.Series:
    """A sample's overall value by `rule` from its values per layer (``layers``: samples x layers);
    missing when any layer the rule uses is."""
    if rule == "mean":
        return layers.mean(axis=1, skipna=False)
    if rule == "standardized":
        return (layers / scales[metric].reindex(layers.columns)).mean(axis=1, skipna=False)
    if rule == "median_layer":
        return layers.median(axis=1, skipna=False)
    depth = np.linspace(0.0, 1.0, len(layers.columns)) if len(layers.columns) > 1 else np.zeros(1)
    low, high = rule.layers
    chosen = layers.columns[(depth >= low - 1e-9) & (depth <= high + 1e-9)]  # 1e-9: 0.25 of 4 layers is layer 1
    return layers[chosen].mean(axis=1, skipna=False)


def _descriptives(per_condition: dict[str, pd.DataFrame]) -> dict[str, float]:
    stats: dict[str, float] = {}
    for condition, values in per_condition.items():
        for (metric, scope), column in values.items():
            if scope == OVERALL:
                stats[descriptive_name(metric, condition, "mean")] = column.mean()
                stats[descriptive_name(metric, condition, "sd")] = column.std(ddof=1)
                stats[descriptive_name(metric, condition, "n")] = column.count()
            else:  # a layer's, or a further overall rule's
                stats[descriptive_name(metric, condition, "mean", scope)] = column.mean()
    return stats


def _comparison_stats(
    per_condition: dict[str, pd.DataFrame], name: str, comparison: Comparison, settings: StatsSpec, alpha: float
) -> dict[str, float]:
    """The unprefixed statistics of one comparison: paired tests, correlations, mixed model."""
    for condition in (comparison.a, comparison.b):
        if condition not in per_condition:
            raise RunFailure(f"comparison {name}: the per-sample table has no rows for condition {condition!r}")
    a, b = per_condition[comparison.a].align(per_condition[comparison.b], join="inner")
    order = sample_order(a.index)
    a, b = a.loc[order], b.loc[order]
    if len(a) < 2:
        raise RunFailure(
            f"comparison {name}: needs at least 2 samples present in both {comparison.a} and {comparison.b}, "
            f"found {len(a)}"
        )
    x_column, y_column = [(metric, OVERALL) for metric in settings.correlate]
    for column in (x_column, y_column):
        if column not in a.columns:
            raise RunFailure(f"stats.correlate: the per-sample table has no metric {column[0]!r}")
    stats = _paired_stats(a, b, settings, alpha)
    stats |= _correlations(a[x_column], b[x_column], a[y_column], b[y_column], comparison, settings)
    if settings.mixed_model:
        stats |= _mixed_model(a[x_column], b[x_column], a[y_column], b[y_column])
    return stats


def _cohens_dz(diff: np.ndarray, ddof: int, axis: int) -> np.ndarray:
    """Paired Cohen's d_z: mean difference over the SD of the differences."""
    with np.errstate(divide="ignore", invalid="ignore"):  # zero SD: inf or NaN, as it should
        return diff.mean(axis=axis) / diff.std(axis=axis, ddof=ddof)


# --- BCa bootstrap over weighted sums -------------------------------------------------------


@dataclass(frozen=True)
class _Estimator:
    """Statistics that are functions of sums over samples, so that a resample is a reweighting.

    A bootstrap resample's sums are ``counts @ terms`` (how often each sample was drawn), a
    jackknife resample's are the total minus one sample's terms: no resampled data is built.
    """

    keep: np.ndarray
    """Which of the comparison's samples the statistics use (bool, one per sample)."""
    terms: np.ndarray
    """Additive terms of each kept sample, ``[kept samples, k]``."""
    statistic: Callable[[np.ndarray], np.ndarray]
    """Sums over samples ``[..., k]`` -> the statistics ``[..., width]``."""
    width: int
    """How many statistics."""


def _mean_and_dz(keep: np.ndarray, diff: np.ndarray, ddof: int) -> _Estimator:
    """The mean difference and d_z of every column of ``diff`` ``[kept samples, columns]``."""
    centre = diff.mean(axis=0) if len(diff) else np.zeros(diff.shape[1])
    centred = diff - centre  # centred terms keep the sums of squares free of cancellation
    width = diff.shape[1]

    def statistic(sums: np.ndarray) -> np.ndarray:
        count, first, second = sums[..., :1], sums[..., 1 : width + 1], sums[..., width + 1 :]
        with np.errstate(divide="ignore", invalid="ignore"):  # zero SD: inf or NaN, as for the estimate
            mean = first / count
            sd = np.sqrt((second - first * mean) / (count - ddof))
            return np.concatenate([centre + mean, (centre + mean) / sd], axis=-1)

    return _Estimator(keep, np.hstack([np.ones((len(diff), 1)), centred, centred**2]), statistic, 2 * width)


def _pearson(x: np.ndarray, y: np.ndarray) -> _Estimator:
    """Pearson's r over the (x, y) pairs that have both values; ``x``, ``y`` are ``[samples, texts]``."""
    valid = ~(np.isnan(x) | np.isnan(y))
    keep = valid.any(axis=1)
    x_centred = np.where(valid, x - (x[valid].mean() if keep.any() else 0.0), 0.0)[keep]
    y_centred = np.where(valid, y - (y[valid].mean() if keep.any() else 0.0), 0.0)[keep]
    products = (valid[keep], x_centred, y_centred, x_centred**2, y_centred**2, x_centred * y_centred)
    terms = np.stack([term.sum(axis=1) for term in products], axis=1)

    def statistic(sums: np.ndarray) -> np.ndarray:
        count, sx, sy, sxx, syy, sxy = np.moveaxis(sums, -1, 0)
        with np.errstate(divide="ignore", invalid="ignore"):  # a constant variable: NaN, as pearsonr
            r = (sxy - sx * sy / count) / np.sqrt((sxx - sx * sx / count) * (syy - sy * sy / count))
        return np.clip(r, -1.0, 1.0)[..., None]

    return _Estimator(keep, terms, statistic, 1)


def _bca_intervals(estimators: list[_Estimator], settings: StatsSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per estimator, the BCa bounds of its statistics; estimators on the same samples share the resamples."""
    groups: dict[bytes, list[int]] = {}
    for index, estimator in enumerate(estimators):
        groups.setdefault(estimator.keep.tobytes(), []).append(index)
    intervals: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0))] * len(estimators)
    for indices in groups.values():
        members = [estimators[index] for index in indices]
        low, high = _bca(_joined(members), settings)
        edges = np.cumsum([member.width for member in members])[:-1]
        for index, low_part, high_part in zip(indices, np.split(low, edges), np.split(high, edges)):
            intervals[index] = (low_part, high_part)
    return intervals


def _joined(members: list[_Estimator]) -> _Estimator:
    """One estimator giving every member's statistics, in order (the members use the same samples)."""
    edges = np.cumsum([member.terms.shape[1] for member in members])[:-1]

    def statistic(sums: np.ndarray) -> np.ndarray:
        parts = np.split(sums, edges, axis=-1)
        return np.concatenate([member.statistic(part) for member, part in zip(members, parts)], axis=-1)

    terms = np.hstack([member.terms for member in members])
    return _Estimator(members[0].keep, terms, statistic, sum(member.width for member in members))


def _bca(estimator: _Estimator, settings: StatsSpec) -> tuple[np.ndarray, np.ndarray]:
    """BCa bounds of the estimator's statistics, resampling its samples as ``scipy.stats.bootstrap`` does.

    The resampled ids are the ones ``bootstrap`` draws (``default_rng(seed).integers(0, n, (resamples, n))``),
    the bias correction and acceleration are its formulas; only the statistics come from sums.
    """
    terms, statistic = estimator.terms, estimator.statistic
    n = len(terms)
    if settings.bootstrap_resamples == 0 or n < 2:
        nan = np.full(estimator.width, np.nan)
        return nan, nan
    totals = terms.sum(axis=0)
    estimate = statistic(totals)
    resampled = np.concatenate([statistic(counts @ terms) for counts in _resample_counts(n, settings)])
    jackknife = statistic(totals - terms)  # leave-one-out sums in closed form
    with np.errstate(divide="ignore", invalid="ignore"):  # degenerate distributions: NaN bounds
        below = ((resampled < estimate).sum(axis=0) + (resampled <= estimate).sum(axis=0)) / (2 * len(resampled))
        bias = special.ndtri(below)
        spread = (n - 1) * (jackknife.mean(axis=0) - jackknife)
        acceleration = 1 / 6 * (np.sum(spread**3, axis=0) / n**3) / (np.sum(spread**2, axis=0) / n**2) ** 1.5
        z = float(special.ndtri((1 - settings.confidence) / 2))
        levels = [special.ndtr(bias + (bias + side) / (1 - acceleration * (bias + side))) for side in (z, -z)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN levels or statistics give NaN bounds
        bounds = scipy_stats.quantile(resampled.T, np.stack(levels, axis=-1), axis=-1)
    return bounds[:, 0], bounds[:, 1]


def _resample_counts(n: int, settings: StatsSpec) -> Iterator[np.ndarray]:
    """How often each of ``n`` samples is drawn, per resample, a chunk of resamples at a time."""
    rng = np.random.default_rng(settings.seed)
    chunk = max(1, _RESAMPLE_CHUNK_DRAWS // n)
    for start in range(0, settings.bootstrap_resamples, chunk):
        rows = min(chunk, settings.bootstrap_resamples - start)
        drawn = rng.integers(0, n, (rows, n)) + n * np.arange(rows)[:, None]
        yield np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(float)


# --- statistics ------------------------------------------------------------------------------


def _paired_stats(a: pd.DataFrame, b: pd.DataFrame, settings: StatsSpec, alpha: float) -> dict[str, float]:
    """``<metric>.<scope>.<stat>`` for every column, on the samples that have the column in both
    conditions, and ``<metric>.layers.<summary>`` for every trajectory metric."""
    a_values, b_values = a.to_numpy(), b.to_numpy()
    groups = []
    for keep, columns in _columns_by_samples(~(np.isnan(a_values) | np.isnan(b_values))):
        # Column-major, like the table's own array: each column's sums come out bit for bit the same.
        a_kept, b_kept = (np.asfortranarray(values[np.ix_(keep, columns)]) for values in (a_values, b_values))
        groups.append((keep, columns, a_kept, b_kept))
    estimators = [_mean_and_dz(keep, a_kept - b_kept, settings.ddof) for keep, _, a_kept, b_kept in groups]
    parts = [
        pd.DataFrame(
            _paired_columns(a_kept, b_kept, settings.ddof, low, high) | _influence(a_kept - b_kept, a.index[keep], settings.ddof),
            index=a.columns[columns],
        )
        for (keep, columns, a_kept, b_kept), (low, high) in zip(groups, _bca_intervals(estimators, settings))
    ]
    per_column = pd.concat(parts).loc[a.columns]
    per_column = per_column.join(_layer_adjusted_p(per_column["p"]))
    stats: dict[str, float] = {}
    for (metric, scope), row in per_column.to_dict("index").items():
        names = (*PAIRED_STATS, *LAYER_ADJUSTED_P) if is_layer_scope(scope) else (*PAIRED_STATS, *INFLUENCE_STATS)
        stats |= {paired_name(metric, scope, stat): row[stat] for stat in names}
    return stats | _layer_summaries(per_column, alpha)


def _influence(diff: np.ndarray, sample_ids: pd.Index, ddof: int) -> dict[str, np.ndarray]:
    """Per column of ``diff`` ``[samples, columns]``: the largest change of d_z when one sample is
    left out, and that sample's id (NaN when it is no number); NaN with fewer than 3 samples."""
    n, width = diff.shape
    if n < 3:
        return dict.fromkeys(INFLUENCE_STATS, np.full(width, np.nan))
    centred = diff - diff.mean(axis=0)
    squares = (centred**2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # zero SD: inf or NaN, as for the estimate
        d = diff.mean(axis=0) / np.sqrt(squares / (n - ddof))
        # leaving sample i out: the mean moves by -c_i / (n - 1), the squares lose c_i^2 n / (n - 1)
        mean_out = diff.mean(axis=0) - centred / (n - 1)
        d_out = mean_out / np.sqrt((squares - centred**2 * n / (n - 1)) / (n - 1 - ddof))
        change = np.abs(d_out - d)
    most = np.nanargmax(np.where(np.isnan(change), -np.inf, change), axis=0)
    ids = np.array([float(sample) if sample.isdecimal() else np.nan for sample in sample_ids])
    return {"d_loo_max_change": change[most, np.arange(width)], "d_loo_max_change_sample": ids[most]}


def layer_shares(mean_a: np.ndarray, mean_b: np.ndarray) -> np.ndarray:
    """Each layer's share of the (mean) overall value, from the layers' means in the two
    conditions: |mean_a + mean_b| over its sum across layers."""
    size = np.abs(np.asarray(mean_a, float) + np.asarray(mean_b, float))
    with np.errstate(divide="ignore", invalid="ignore"):  # all zero: NaN shares
        return size / np.nansum(size)


def _layer_summaries(per_column: pd.DataFrame, alpha: float) -> dict[str, float]:
    """``<metric>.layers.<summary>`` (`LAYER_SUMMARIES`) for every metric with per-layer statistics."""
    stats: dict[str, float] = {}
    layer_rows = per_column[[is_layer_scope(scope) for _, scope in per_column.index]]
    for metric, rows in layer_rows.groupby(level=0, sort=False):
        significant = rows["p_holm"] < alpha
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # every d NaN: NaN summaries
            values = {
                "n_positive_significant": int((significant & (rows["d"] > 0)).sum()),
                "n_negative_significant": int((significant & (rows["d"] < 0)).sum()),
                "median_d": np.nanmedian(rows["d"]),
                "share_of_overall_max": np.nanmax(layer_shares(rows["mean_a"], rows["mean_b"])),
            }
        stats |= {paired_name(metric, LAYER_SUMMARY_SCOPE, stat): values[stat] for stat in LAYER_SUMMARIES}
    return stats


def _columns_by_samples(present: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Columns grouped by the samples that have them: (samples kept, column indices) per group."""
    groups: dict[bytes, list[int]] = {}
    for column in range(present.shape[1]):
        groups.setdefault(present[:, column].tobytes(), []).append(column)
    return [(present[:, columns[0]], np.array(columns)) for columns in groups.values()]


def _paired_columns(
    a: np.ndarray, b: np.ndarray, ddof: int, ci_low: np.ndarray, ci_high: np.ndarray
) -> dict[str, np.ndarray | int]:
    """Paired statistics of columns sharing their samples; ``ci_*`` hold the mean_diff then the d bounds."""
    (n, width), diff = a.shape, a - b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no pairs: NaN means; one: NaN d
        columns = {
            "mean_a": a.mean(axis=0),
            "mean_b": b.mean(axis=0),
            "mean_diff": diff.mean(axis=0),
            "mean_diff_ci_low": ci_low[:width],
            "mean_diff_ci_high": ci_high[:width],
            "d": _cohens_dz(diff, ddof, axis=0),
            "d_ci_low": ci_low[width:],
            "d_ci_high": ci_high[width:],
        }
    if n < 2:  # no test on fewer than 2 pairs
        tests = dict.fromkeys(("t", "p", "wilcoxon_w", "wilcoxon_p"), np.full(width, np.nan))
    else:
        student, signed_rank = scipy_stats.ttest_rel(a, b, axis=0), scipy_stats.wilcoxon(a, b, axis=0)
        tests = {"t": student.statistic, "p": student.pvalue,
                 "wilcoxon_w": signed_rank.statistic, "wilcoxon_p": signed_rank.pvalue}
    return columns | tests | {"n": n}


def _layer_adjusted_p(p: pd.Series) -> pd.DataFrame:
    """Per-layer p-values adjusted across their family (`Column.family`; NaN for overall and NaN p)."""
    from statsmodels.stats.multitest import multipletests  # statsmodels imports in ~1 s: only when computing

    families: dict[tuple[Column, bool], list[int]] = {}
    for row, ((metric, scope), value) in enumerate(p.items()):
        if is_layer_scope(scope) and not np.isnan(value):
            families.setdefault(Column.parse(metric).family, []).append(row)
    adjusted = {stat: np.full(len(p), np.nan) for stat in LAYER_ADJUSTED_P}
    # multipletests' Holm runs gc.collect() on every call (0.2 s with torch loaded): frozen, the
    # objects that exist now are not scanned again.
    gc.freeze()
    try:
        for rows in families.values():
            for stat, method in LAYER_ADJUSTED_P.items():
                adjusted[stat][rows] = multipletests(p.to_numpy()[rows], method=method)[1]
    finally:
        gc.unfreeze()
    return pd.DataFrame(adjusted, index=p.index)


def _correlation_scopes(
    x_a: pd.Series, x_b: pd.Series, y_a: pd.Series, y_b: pd.Series, comparison: Comparison
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (x, y) values each correlation is computed on, by scope name: ``[samples, texts per sample]``."""
    x_a, x_b, y_a, y_b = (values.to_numpy()[:, None] for values in (x_a, x_b, y_a, y_b))
    return {
        "pooled": (np.hstack([x_a, x_b]), np.hstack([y_a, y_b])),
        comparison.a: (x_a, y_a),
        comparison.b: (x_b, y_b),
        "difference": (x_a - x_b, y_a - y_b),
    }


def _correlations(
    x_a: pd.Series, x_b: pd.Series, y_a: pd.Series, y_b: pd.Series, comparison: Comparison, settings: StatsSpec
) -> dict[str, float]:
    """``correlation.<scope>.<stat>``, each on the (x, y) pairs of its scope that have both values."""
    scopes = _correlation_scopes(x_a, x_b, y_a, y_b, comparison)
    intervals = _bca_intervals([_pearson(x, y) for x, y in scopes.values()], settings)
    stats: dict[str, float] = {}
    for (scope, (x, y)), (low, high) in zip(scopes.items(), intervals):
        valid = ~(np.isnan(x) | np.isnan(y)).T  # texts of condition a first, then b (pooled)
        x_kept, y_kept = x.T[valid], y.T[valid]
        r, p = scipy_stats.pearsonr(x_kept, y_kept) if len(x_kept) >= 2 else (np.nan, np.nan)
        values = (r, p, low[0], high[0], len(x_kept))
        stats |= {correlation_name(scope, stat): value for stat, value in zip(CORRELATION_STATS, values)}
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

    frame = frame.dropna()  # texts lacking x or y leave the model; their sample's other text stays
    failed = {mixedlm_name(stat): np.nan for stat in MIXEDLM_STATS} | {mixedlm_name("converged"): 0.0}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is reported as mixedlm.converged = 0
            fit = smf.mixedlm("y ~ x + condition", frame, groups=frame["sample_id"]).fit()
    except (np.linalg.LinAlgError, ValueError):  # singular design (e.g. x constant)
        return failed
    values = (fit.params["x"], fit.pvalues["x"], fit.params["condition"], fit.pvalues["condition"], fit.converged)
    return {mixedlm_name(stat): value for stat, value in zip(MIXEDLM_STATS, values)}


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
            "alpha": self.spec.report.alpha,  # the layer summaries count layers significant at it
        }

    def compute(self, unit: None, folder: Path) -> dict[str, float]:
        return compute_stats(load_table(io.StringIO(self.table_csv)), self.spec)

    def describe(self, output: dict) -> str:
        return f"{len(output)} statistics"

    def placeholder(self, key: str) -> dict:
        return {}
