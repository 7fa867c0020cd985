"""harness.stages.stats against an independent recomputation from the CSV with pandas/scipy/statsmodels."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
import yaml
from scipy.stats import bootstrap, pearsonr, ttest_rel, wilcoxon
from statsmodels.stats.multitest import multipletests

from harness.errors import RunFailure
from harness.schema import Spec
from harness.stages import stats as stats_stage
from harness.stages.stats import compute_stats, load_table
from harness.statnames import STAT_KEYWORDS

N_SAMPLES = 40
N_LAYERS = 4
TRAJECTORY_METRICS = ("smoothness", "magnitude")
TEXT_METRICS = ("ce_loss", "ce_loss_response")

SPEC_YAML = """
name: stats-test
models: {base: {id: some/model}}
conditions:
  human: {source: human}
  model: {source: generate}
  shuffled: {source: shuffle, of: human}
metrics: [smoothness, magnitude]
stats:
  comparisons:
    human_vs_model: {a: human, b: model}
    shuffled_vs_human: {a: shuffled, b: human}
  bootstrap_resamples: 1000
  seed: 7
criteria:
  effect: smoothness.overall.d > 0 and smoothness.overall.p < 0.05
"""


def make_spec(**stats_overrides) -> Spec:
    data = yaml.safe_load(SPEC_YAML)
    data["stats"] |= stats_overrides
    return Spec.model_validate(data)


ABSENT = {("3", "model"): ("smoothness", "magnitude"), ("11", "shuffled"): ("ce_loss_response",)}
"""Gaps of the gapped table, as the runner leaves them: metrics undefined for a short response have no rows."""
UNDEFINED = {("7", "human"): ("magnitude",)}
"""Gaps written as NaN values (every layer)."""


def write_per_sample(path: Path, rng: np.random.Generator, gaps: bool = False) -> Path:
    """Smoothness grows with depth by condition; CE follows smoothness; one model sample is missing.

    With ``gaps``, some texts lack some metrics (``ABSENT``, ``UNDEFINED``); the values are the same.
    """
    shift = {"human": 1.0, "model": 0.0, "shuffled": 1.5}
    rows = []
    for sample in range(N_SAMPLES):
        sample_id = str(sample)  # numbers: "10" sorts before "2" as text, not as a number
        base = rng.normal()
        for condition, effect in shift.items():
            if condition == "model" and sample == N_SAMPLES - 1:
                continue
            smoothness = 10 + base + effect * np.arange(1, N_LAYERS + 1) / N_LAYERS + rng.normal(0, 0.5, N_LAYERS)
            magnitude = 50 + 2 * base + rng.normal(0, 1, N_LAYERS)
            ce_loss = 0.4 * smoothness.mean() + rng.normal(0, 0.3)
            values = {"smoothness": smoothness, "magnitude": magnitude, "ce_loss": [ce_loss],
                      "ce_loss_response": [ce_loss + rng.normal(0, 0.2)]}
            for metric, metric_values in values.items():
                if gaps and metric in ABSENT.get((sample_id, condition), ()):
                    continue
                undefined = gaps and metric in UNDEFINED.get((sample_id, condition), ())
                layers = range(N_LAYERS) if metric in TRAJECTORY_METRICS else [None]
                for layer, value in zip(layers, metric_values):
                    rows.append((sample_id, condition, layer, metric, np.nan if undefined else value))
    frame = pd.DataFrame(rows, columns=["sample_id", "condition", "layer", "metric", "value"])
    frame["layer"] = frame["layer"].astype("Int64")
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory) -> Path:
    return write_per_sample(tmp_path_factory.mktemp("stats") / "per_sample.csv", np.random.default_rng(2024))


@pytest.fixture(scope="module")
def gapped_csv_path(tmp_path_factory) -> Path:
    return write_per_sample(tmp_path_factory.mktemp("gapped") / "per_sample.csv", np.random.default_rng(2024), gaps=True)


@pytest.fixture(scope="module")
def spec() -> Spec:
    return make_spec()


@pytest.fixture(scope="module")
def raw(csv_path) -> pd.DataFrame:
    """The CSV read plainly, for the independent recomputation."""
    return pd.read_csv(csv_path, dtype={"sample_id": str})


@pytest.fixture(scope="module")
def stats(csv_path, spec) -> dict[str, float]:
    return compute_stats(load_table(csv_path), spec)


@pytest.fixture(scope="module")
def gapped_raw(gapped_csv_path) -> pd.DataFrame:
    return pd.read_csv(gapped_csv_path, dtype={"sample_id": str})


@pytest.fixture(scope="module")
def gapped_stats(gapped_csv_path, spec) -> dict[str, float]:
    return compute_stats(load_table(gapped_csv_path), spec)


# --- independent recomputation ----------------------------------------------------------------


def scopes_of(metric: str) -> list[str]:
    return ["overall"] + ([f"layer{layer}" for layer in range(N_LAYERS)] if metric in TRAJECTORY_METRICS else [])


def per_sample(raw: pd.DataFrame, condition: str, metric: str, scope: str) -> pd.Series:
    """A metric's values by sample id; NaN where undefined (a trajectory metric overall: in any layer)."""
    rows = raw[(raw["condition"] == condition) & (raw["metric"] == metric)]
    if scope == "overall":  # text metric: its only value; trajectory metric: mean over layers
        return rows.groupby("sample_id")["value"].agg(lambda values: values.mean() if values.notna().all() else np.nan)
    return rows[rows["layer"] == int(scope.removeprefix("layer"))].set_index("sample_id")["value"]


def paired_ids(raw: pd.DataFrame, a: str, b: str) -> list[str]:
    """The samples of both conditions in numeric order, as per_sample.csv lists them."""
    return sorted(set(raw.loc[raw["condition"] == a, "sample_id"]) & set(raw.loc[raw["condition"] == b, "sample_id"]), key=int)


def both_present(first: pd.Series, second: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    keep = first.notna() & second.notna()
    return first[keep].to_numpy(), second[keep].to_numpy()


def paired(raw: pd.DataFrame, a: str, b: str, metric: str, scope: str) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of a comparison that have the metric in both conditions."""
    ids = paired_ids(raw, a, b)
    return both_present(per_sample(raw, a, metric, scope).reindex(ids), per_sample(raw, b, metric, scope).reindex(ids))


def expected_descriptives(raw: pd.DataFrame) -> dict[str, float]:
    expected = {}
    for condition in raw["condition"].unique():
        for metric in TRAJECTORY_METRICS + TEXT_METRICS:
            for scope in scopes_of(metric):
                values = per_sample(raw, condition, metric, scope).dropna()
                if scope == "overall":
                    expected[f"{metric}.{condition}.mean"] = values.mean()
                    expected[f"{metric}.{condition}.sd"] = np.std(values.to_numpy(), ddof=1)
                    expected[f"{metric}.{condition}.n"] = len(values)
                else:
                    expected[f"{metric}.{condition}.{scope}.mean"] = values.mean()
    return expected


def expected_paired(raw: pd.DataFrame, a: str, b: str, ddof: int) -> dict[str, float]:
    """Everything of one comparison except the bootstrap intervals, unprefixed."""
    expected = {}
    for metric in TRAJECTORY_METRICS + TEXT_METRICS:
        layer_p = {}
        for scope in scopes_of(metric):
            values_a, values_b = paired(raw, a, b, metric, scope)
            diff = values_a - values_b
            student, signed_rank = ttest_rel(values_a, values_b), wilcoxon(values_a, values_b)
            expected |= {
                f"{metric}.{scope}.mean_a": values_a.mean(),
                f"{metric}.{scope}.mean_b": values_b.mean(),
                f"{metric}.{scope}.mean_diff": diff.mean(),
                f"{metric}.{scope}.d": diff.mean() / diff.std(ddof=ddof),
                f"{metric}.{scope}.t": student.statistic,
                f"{metric}.{scope}.p": student.pvalue,
                f"{metric}.{scope}.wilcoxon_w": signed_rank.statistic,
                f"{metric}.{scope}.wilcoxon_p": signed_rank.pvalue,
                f"{metric}.{scope}.n": len(diff),
            }
            if scope != "overall":
                layer_p[scope] = student.pvalue
            else:
                expected |= expected_influence(diff, paired_ids_with(raw, a, b, metric, scope), ddof, f"{metric}.{scope}")
        for name, method in (("p_holm", "holm"), ("p_bh", "fdr_bh")):
            if layer_p:
                adjusted = multipletests(list(layer_p.values()), method=method)[1]
                expected |= {f"{metric}.{scope}.{name}": p for scope, p in zip(layer_p, adjusted)}
        if layer_p:
            expected |= expected_layer_summaries(expected, metric, list(layer_p))
    return expected


def paired_ids_with(raw: pd.DataFrame, a: str, b: str, metric: str, scope: str) -> list[str]:
    """The sample ids of `paired`'s pairs, in its order."""
    ids = paired_ids(raw, a, b)
    keep = per_sample(raw, a, metric, scope).reindex(ids).notna() & per_sample(raw, b, metric, scope).reindex(ids).notna()
    return [sample for sample, kept in zip(ids, keep) if kept]


def expected_influence(diff: np.ndarray, ids: list[str], ddof: int, stem: str) -> dict[str, float]:
    """d_z recomputed with each sample left out: the largest change and that sample (NaN: not a number)."""
    d = diff.mean() / diff.std(ddof=ddof)
    changes = [abs(np.delete(diff, i).mean() / np.delete(diff, i).std(ddof=ddof) - d) for i in range(len(diff))]
    most = int(np.argmax(changes))
    sample = float(ids[most]) if str(ids[most]).isdecimal() else np.nan
    return {f"{stem}.d_loo_max_change": changes[most], f"{stem}.d_loo_max_change_sample": sample}


def expected_layer_summaries(expected: dict[str, float], metric: str, scopes: list[str], alpha: float = 0.05) -> dict:
    d = np.array([expected[f"{metric}.{scope}.d"] for scope in scopes])
    holm = np.array([expected[f"{metric}.{scope}.p_holm"] for scope in scopes])
    size = np.abs([expected[f"{metric}.{scope}.mean_a"] + expected[f"{metric}.{scope}.mean_b"] for scope in scopes])
    return {
        f"{metric}.layers.n_positive_significant": np.sum((holm < alpha) & (d > 0)),
        f"{metric}.layers.n_negative_significant": np.sum((holm < alpha) & (d < 0)),
        f"{metric}.layers.median_d": np.median(d),
        f"{metric}.layers.share_of_overall_max": np.max(size / size.sum()),
    }


def correlation_inputs(raw: pd.DataFrame, a: str, b: str) -> tuple[pd.Series, ...]:
    """x_a, x_b, y_a, y_b over the samples of both conditions (NaN where a text lacks the metric)."""
    ids = paired_ids(raw, a, b)
    return tuple(
        per_sample(raw, condition, metric, "overall").reindex(ids)
        for metric in ("ce_loss", "smoothness")
        for condition in (a, b)
    )


def correlation_samples(raw: pd.DataFrame, a: str, b: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per scope, the (x, y) pairs that have both values."""
    x_a, x_b, y_a, y_b = correlation_inputs(raw, a, b)
    (xa, ya), (xb, yb) = both_present(x_a, y_a), both_present(x_b, y_b)
    return {
        "pooled": (np.concatenate([xa, xb]), np.concatenate([ya, yb])),
        a: (xa, ya),
        b: (xb, yb),
        "difference": both_present(x_a - x_b, y_a - y_b),
    }


def expected_correlations(raw: pd.DataFrame, a: str, b: str) -> dict[str, float]:
    expected = {}
    for scope, (x, y) in correlation_samples(raw, a, b).items():
        result = pearsonr(x, y)
        expected |= {
            f"correlation.{scope}.r": result.statistic,
            f"correlation.{scope}.p": result.pvalue,
            f"correlation.{scope}.n": len(x),
        }
    return expected


def expected_mixed_model(raw: pd.DataFrame, a: str, b: str) -> dict[str, float]:
    x_a, x_b, y_a, y_b = correlation_inputs(raw, a, b)
    frame = pd.DataFrame(
        {
            "sample_id": paired_ids(raw, a, b) * 2,
            "x": np.concatenate([x_a, x_b]),
            "y": np.concatenate([y_a, y_b]),
            "condition": [1] * len(x_a) + [0] * len(x_b),
        }
    ).dropna()  # texts lacking x or y
    fit = smf.mixedlm("y ~ x + condition", frame, groups=frame["sample_id"]).fit()
    return {
        "mixedlm.x_coef": fit.params["x"],
        "mixedlm.x_p": fit.pvalues["x"],
        "mixedlm.condition_coef": fit.params["condition"],
        "mixedlm.condition_p": fit.pvalues["condition"],
        "mixedlm.converged": float(fit.converged),
    }


def expected_stats(raw: pd.DataFrame, spec: Spec) -> dict[str, float]:
    """Every statistic except the bootstrap intervals, names as compute_stats gives them."""
    expected = expected_descriptives(raw) | {"overall.rule.mean": 1.0}
    for index, (name, comparison) in enumerate(spec.comparisons.items()):
        one = (
            expected_paired(raw, comparison.a, comparison.b, spec.stats.ddof)
            | expected_correlations(raw, comparison.a, comparison.b)
            | expected_mixed_model(raw, comparison.a, comparison.b)
        )
        expected |= {f"{name}.{key}": value for key, value in one.items()}
        if index == 0:
            expected |= one
    return expected


def is_interval_bound(name: str) -> bool:
    return name.endswith(("ci_low", "ci_high"))


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["complete", "gapped"])
def test_every_statistic_equals_independent_recomputation(table, request, spec):
    prefix = "" if table == "complete" else "gapped_"
    stats, raw = request.getfixturevalue(f"{prefix}stats"), request.getfixturevalue(f"{prefix}raw")
    expected = expected_stats(raw, spec)
    assert {name for name in stats if not is_interval_bound(name)} == set(expected)
    for name, value in expected.items():
        tolerance = 1e-6 if ".mixedlm." in f".{name}" else 1e-9  # an optimiser's result
        assert stats[name] == pytest.approx(value, rel=tolerance, abs=1e-12, nan_ok=True), name


@pytest.mark.parametrize("table", ["stats", "gapped_stats"])
def test_output_is_flat_finite_floats_and_json_serialisable(table, request):
    stats = request.getfixturevalue(table)
    assert all(type(value) is float and math.isfinite(value) for value in stats.values())
    assert json.loads(json.dumps(stats)) == stats


def test_the_synthetic_effect_is_found(stats):
    assert stats["smoothness.overall.d"] > 1 and stats["smoothness.overall.p"] < 1e-6
    assert stats["smoothness.layer3.mean_diff"] > stats["smoothness.layer0.mean_diff"]
    assert stats["magnitude.overall.p"] > 0.01
    assert stats["correlation.human.r"] > 0.5


def test_names_use_only_spec_words_keywords_and_layers(stats, spec):
    vocabulary = spec.grid.statistic_vocabulary()
    for name in stats:
        for word in name.split("."):
            assert word in vocabulary or re.fullmatch(r"layer\d+", word), (name, word)
    used = {word for name in stats for word in name.split(".")}
    assert STAT_KEYWORDS <= used  # every keyword is actually produced


def test_primary_comparison_names_equal_its_prefixed_names_and_every_comparison_is_prefixed(stats, spec):
    first, second = spec.comparisons

    def comparison_stats(name: str) -> dict[str, float]:
        return {key.removeprefix(f"{name}."): value for key, value in stats.items() if key.startswith(f"{name}.")}

    primary, other = comparison_stats(first), comparison_stats(second)
    assert primary == {name: stats[name] for name in primary}
    def without_correlations(names) -> set[str]:
        return {name for name in names if not name.startswith("correlation.")}

    assert without_correlations(primary) == without_correlations(other)
    correlation_scopes = {name.split(".")[1] for name in other if name.startswith("correlation.")}
    assert correlation_scopes == {"pooled", "shuffled", "human", "difference"}
    assert other["smoothness.overall.mean_a"] != primary["smoothness.overall.mean_a"]


def test_paired_statistics_use_only_samples_present_in_both_conditions(stats):
    assert stats["ce_loss.human.n"] == N_SAMPLES
    assert stats["ce_loss.model.n"] == N_SAMPLES - 1
    assert stats["human_vs_model.smoothness.overall.n"] == N_SAMPLES - 1
    assert stats["shuffled_vs_human.smoothness.layer2.n"] == N_SAMPLES
    assert stats["human_vs_model.correlation.pooled.n"] == 2 * (N_SAMPLES - 1)


def test_confidence_intervals_bracket_their_estimates(stats):
    bounds = [name.removesuffix("_low") for name in stats if name.endswith("ci_low")]
    columns = len(TEXT_METRICS) + len(TRAJECTORY_METRICS) * (N_LAYERS + 1)
    assert len(bounds) == 3 * (2 * columns + 4)  # (mean_diff, d) per column + 4 r; primary twice, then the other
    for bound in bounds:
        estimate = re.sub(r"(mean_diff|d)_ci$", r"\1", bound).replace(".ci", ".r")
        assert stats[f"{bound}_low"] <= stats[estimate] <= stats[f"{bound}_high"], bound


def scipy_bca(spec: Spec, data, statistic, paired_samples=True) -> tuple[float, float]:
    """``scipy.stats.bootstrap``'s BCa interval with the spec's settings and seed."""
    result = bootstrap(
        data,
        statistic,
        n_resamples=spec.stats.bootstrap_resamples,
        confidence_level=spec.stats.confidence,
        method="BCa",
        paired=paired_samples,
        rng=np.random.default_rng(spec.stats.seed),
    )
    return result.confidence_interval.low, result.confidence_interval.high


def interval(stats: dict[str, float], name: str) -> tuple[float, float]:
    return stats[f"{name}_low"], stats[f"{name}_high"]


def d_z(ddof: int):
    return lambda x, axis: x.mean(axis) / x.std(axis, ddof=ddof)


def r(x, y, axis):
    return pearsonr(x, y, axis=axis).statistic


def test_intervals_are_scipy_bca_bootstraps_of_each_statistic_alone(stats, raw, spec):
    """The documented contract: every statistic of a comparison uses the same seeded resampled ids."""

    def pooled_r(x_a, x_b, y_a, y_b, axis):
        return r(np.concatenate([x_a, x_b], axis), np.concatenate([y_a, y_b], axis), axis)

    smoothness_diff = np.subtract(*paired(raw, "human", "model", "smoothness", "overall"))
    magnitude_diff = np.subtract(*paired(raw, "human", "model", "magnitude", "layer2"))
    x_a, x_b = paired(raw, "human", "model", "ce_loss", "overall")
    y_a, y_b = paired(raw, "human", "model", "smoothness", "overall")
    expected = {
        "smoothness.overall.mean_diff_ci": scipy_bca(spec, (smoothness_diff,), np.mean, paired_samples=False),
        "magnitude.layer2.d_ci": scipy_bca(spec, (magnitude_diff,), d_z(spec.stats.ddof), paired_samples=False),
        "correlation.pooled.ci": scipy_bca(spec, (x_a, x_b, y_a, y_b), pooled_r),
        "correlation.model.ci": scipy_bca(spec, (x_b, y_b), r),
    }
    for name, bounds in expected.items():
        assert interval(stats, name) == pytest.approx(bounds, rel=1e-9), name


def test_intervals_with_gaps_are_scipy_bca_bootstraps_on_the_pairs_kept(gapped_stats, gapped_raw, spec):
    def pooled_r_of_pairs_present(x_a, x_b, y_a, y_b):  # one resample at a time: NaN marks a missing value
        x, y = np.concatenate([x_a, x_b]), np.concatenate([y_a, y_b])
        keep = ~(np.isnan(x) | np.isnan(y))
        return pearsonr(x[keep], y[keep]).statistic

    scopes = correlation_samples(gapped_raw, "human", "model")
    inputs = tuple(values.to_numpy() for values in correlation_inputs(gapped_raw, "human", "model"))
    smoothness_diff = np.subtract(*paired(gapped_raw, "human", "model", "smoothness", "overall"))
    magnitude_diff = np.subtract(*paired(gapped_raw, "human", "model", "magnitude", "layer2"))
    expected = {
        "smoothness.overall.mean_diff_ci": scipy_bca(spec, (smoothness_diff,), np.mean, paired_samples=False),
        "magnitude.layer2.d_ci": scipy_bca(spec, (magnitude_diff,), d_z(spec.stats.ddof), paired_samples=False),
        "correlation.model.ci": scipy_bca(spec, scopes["model"], r),
        "correlation.difference.ci": scipy_bca(spec, scopes["difference"], r),
        "correlation.pooled.ci": scipy_bca(spec, inputs, pooled_r_of_pairs_present),
    }
    assert len(smoothness_diff) == N_SAMPLES - 2 and len(magnitude_diff) == N_SAMPLES - 3
    for name, bounds in expected.items():
        assert interval(gapped_stats, name) == pytest.approx(bounds, rel=1e-9), name


def test_samples_are_in_numeric_order_whatever_order_the_table_lists_them(csv_path, stats):
    assert stats_stage.sample_order(["10", "2", "1", "b", "a"]) == ["1", "2", "10", "a", "b"]
    table = load_table(csv_path)
    shuffled = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert compute_stats(shuffled, make_spec()) == pytest.approx(stats, rel=1e-12, nan_ok=True)


def test_intervals_are_scipys_paired_bca_on_the_samples_in_numeric_order(stats, raw, spec):
    """The call a reader would make: both conditions' values as per_sample.csv orders them, `paired=True`."""
    human, model = paired(raw, "human", "model", "smoothness", "overall")
    assert paired_ids(raw, "human", "model")[:3] == ["0", "1", "2"]  # as text: "0", "1", "10"
    bounds = scipy_bca(spec, (human, model), lambda a, b, axis: d_z(spec.stats.ddof)(a - b, axis))
    assert interval(stats, "smoothness.overall.d_ci") == pytest.approx(bounds, rel=1e-9)
    in_text_order = sorted(range(len(human)), key=lambda index: str(paired_ids(raw, "human", "model")[index]))
    text_bounds = scipy_bca(spec, (human[in_text_order], model[in_text_order]),
                            lambda a, b, axis: d_z(spec.stats.ddof)(a - b, axis))
    assert text_bounds != pytest.approx(bounds, rel=1e-6)  # the order is part of the contract


def per_layer_values(raw: pd.DataFrame, condition: str, metric: str) -> pd.DataFrame:
    rows = raw[(raw["condition"] == condition) & (raw["metric"] == metric)]
    return rows.pivot(index="sample_id", columns="layer", values="value")


def test_overall_rules_equal_their_numpy_computation(csv_path, raw):
    rules = ["standardized", "mean", "median_layer", {"layers": [0.25, 0.75]}]
    stats = compute_stats(load_table(csv_path), make_spec(overall=rules, bootstrap_resamples=0))
    ids = paired_ids(raw, "human", "model")
    layers = {c: per_layer_values(raw, c, "smoothness").reindex(ids).to_numpy() for c in ("human", "model")}
    every_text = raw[(raw["metric"] == "smoothness")].pivot_table(index=["condition", "sample_id"], columns="layer", values="value")
    sd = np.std(every_text.to_numpy(), axis=0, ddof=1)  # per layer, over every condition's texts
    overall = {
        "overall": {c: (values / sd).mean(axis=1) for c, values in layers.items()},
        "overall_mean": {c: values.mean(axis=1) for c, values in layers.items()},
        "overall_median_layer": {c: np.median(values, axis=1) for c, values in layers.items()},
        "overall_layers25_75": {c: values[:, 1:3].mean(axis=1) for c, values in layers.items()},  # depths 1/3, 2/3 of 4
    }
    for scope, values in overall.items():
        diff = values["human"] - values["model"]
        assert stats[f"smoothness.{scope}.d"] == pytest.approx(diff.mean() / diff.std(ddof=1), rel=1e-12), scope
        assert stats[f"smoothness.{scope}.p"] == pytest.approx(ttest_rel(values["human"], values["model"]).pvalue, rel=1e-9)
    assert stats["overall.rule.standardized"] == stats["overall_mean.rule.mean"] == 1
    assert stats["overall_layers25_75.rule.layers25_75"] == 1
    x = per_sample(raw, "human", "ce_loss", "overall").reindex(ids).to_numpy()
    assert stats["correlation.human.r"] == pytest.approx(pearsonr(x, overall["overall"]["human"]).statistic, rel=1e-12)
    assert stats["smoothness.human.overall_mean.mean"] == pytest.approx(
        per_layer_values(raw, "human", "smoothness").mean(axis=1).mean(), rel=1e-12
    )


def test_layer_summaries_name_the_layer_a_huge_norm_dominates(tmp_path, raw):
    big = raw.copy()
    big.loc[(big["metric"] == "smoothness") & (big["layer"] == 3), "value"] *= 1000
    path = tmp_path / "per_sample.csv"
    big.to_csv(path, index=False)
    stats = compute_stats(load_table(path), make_spec(bootstrap_resamples=0))
    assert stats["smoothness.layers.share_of_overall_max"] > 0.99
    assert stats["magnitude.layers.share_of_overall_max"] < 0.3


def test_a_gap_leaves_the_comparisons_of_other_metrics_unchanged(stats, gapped_stats):
    untouched = ("human_vs_model.ce_loss.", "human_vs_model.ce_loss_response.", "shuffled_vs_human.smoothness.",
                 "shuffled_vs_human.ce_loss.", "shuffled_vs_human.correlation.")
    same = [name for name in stats if name.startswith(untouched)]
    assert len(same) > 50 and all(gapped_stats[name] == stats[name] for name in same)
    assert gapped_stats["human_vs_model.smoothness.overall.d"] != stats["human_vs_model.smoothness.overall.d"]


def test_n_counts_the_pairs_that_have_the_metric_in_both_conditions(gapped_stats):
    both = N_SAMPLES - 1  # the model condition lacks s39 altogether
    expected_n = {
        "human_vs_model.ce_loss.overall.n": both,
        "human_vs_model.smoothness.overall.n": both - 1,  # s03 model lacks smoothness
        "human_vs_model.smoothness.layer2.n": both - 1,
        "human_vs_model.magnitude.layer0.n": both - 2,  # ... and magnitude, which s07 human has as NaN
        "shuffled_vs_human.magnitude.overall.n": N_SAMPLES - 1,
        "shuffled_vs_human.ce_loss_response.overall.n": N_SAMPLES - 1,  # s11 shuffled
        "shuffled_vs_human.smoothness.overall.n": N_SAMPLES,
        "human_vs_model.correlation.pooled.n": 2 * both - 1,  # texts with both CE and smoothness
        "human_vs_model.correlation.human.n": both,
        "human_vs_model.correlation.model.n": both - 1,
        "human_vs_model.correlation.difference.n": both - 1,
        "magnitude.human.n": N_SAMPLES - 1,
    }
    assert {name: gapped_stats[name] for name in expected_n} == expected_n


def test_a_column_with_one_pair_gets_nan_tests_and_the_other_columns_are_computed(tmp_path, raw):
    rare = raw[(raw["condition"] != "model") | (raw["metric"] != "magnitude") | (raw["sample_id"] == "0")]
    path = tmp_path / "per_sample.csv"
    rare.to_csv(path, index=False)
    stats = compute_stats(load_table(path), make_spec())
    layer0 = {condition: per_sample(raw, condition, "magnitude", "layer0")["0"] for condition in ("human", "model")}
    assert stats["human_vs_model.magnitude.layer0.n"] == 1
    assert stats["human_vs_model.magnitude.layer0.mean_diff"] == layer0["human"] - layer0["model"]
    for stat in ("d", "t", "p", "wilcoxon_p", "p_holm", "mean_diff_ci_low", "d_ci_high"):
        assert math.isnan(stats[f"human_vs_model.magnitude.layer0.{stat}"]), stat
    assert math.isfinite(stats["human_vs_model.smoothness.overall.d"]) and math.isfinite(stats["correlation.pooled.r"])


def test_resampling_in_smaller_chunks_gives_the_same_intervals(csv_path, stats, monkeypatch):
    monkeypatch.setattr(stats_stage, "_RESAMPLE_CHUNK_DRAWS", 100)  # 2 resamples of 39 samples at a time
    chunked = compute_stats(load_table(csv_path), make_spec())
    assert chunked.keys() == stats.keys()
    for name, value in stats.items():
        assert chunked[name] == pytest.approx(value, rel=1e-12), name


def test_same_input_same_output_and_the_seed_moves_only_intervals(csv_path, stats):
    table = load_table(csv_path)
    assert compute_stats(table, make_spec()) == stats
    reseeded = compute_stats(table, make_spec(seed=8))
    changed = {name for name in stats if reseeded[name] != stats[name]}
    assert changed and all(is_interval_bound(name) for name in changed)


def test_ddof_scales_d_by_exactly_sqrt_n_minus_one_over_n(csv_path, stats):
    population = compute_stats(load_table(csv_path), make_spec(ddof=0))
    d_names = [name for name in stats if name.endswith(".d")]
    assert len(d_names) > 20
    for name in d_names:
        n = stats[name.removesuffix(".d") + ".n"]
        assert stats[name] == pytest.approx(population[name] * math.sqrt((n - 1) / n), rel=1e-12), name
    assert {n for n in stats if n.endswith(".d_ci_low") and population[n] != stats[n]}  # intervals follow d


def test_zero_resamples_gives_nan_intervals_and_the_same_estimates(csv_path, stats):
    without = compute_stats(load_table(csv_path), make_spec(bootstrap_resamples=0))
    assert without.keys() == stats.keys()
    for name, value in without.items():
        if is_interval_bound(name):
            assert math.isnan(value), name
        else:
            assert value == stats[name], name


def test_mixed_model_can_be_switched_off(csv_path, stats):
    without = compute_stats(load_table(csv_path), make_spec(mixed_model=False, bootstrap_resamples=0))
    assert {name for name in stats.keys() - without.keys()} == {name for name in stats if ".mixedlm." in f".{name}"}


def test_singular_mixed_model_gives_nan_not_an_exception(tmp_path, raw):
    constant_ce = raw.copy()
    constant_ce.loc[constant_ce["metric"] == "ce_loss", "value"] = 3.0
    path = tmp_path / "per_sample.csv"
    constant_ce.to_csv(path, index=False)
    stats = compute_stats(load_table(path), make_spec(bootstrap_resamples=0))
    assert stats["mixedlm.converged"] == 0.0
    assert all(math.isnan(stats[f"mixedlm.{name}"]) for name in ("x_coef", "x_p", "condition_coef", "condition_p"))
    assert math.isnan(stats["correlation.pooled.r"])
    assert stats["smoothness.overall.d"] > 1  # everything else still computed


def test_load_table_types(csv_path):
    table = load_table(csv_path)
    assert str(table["layer"].dtype) == "Int64"
    assert table.loc[table["metric"] == "ce_loss", "layer"].isna().all()
    assert set(table.loc[table["metric"] == "smoothness", "layer"]) == set(range(N_LAYERS))
    assert table["sample_id"].map(type).eq(str).all()


def test_load_table_keeps_names_pandas_would_read_as_missing(tmp_path):
    path = tmp_path / "per_sample.csv"
    path.write_text("sample_id,condition,layer,metric,value\nNA,None,,ce_loss,1.5\nnull,None,0,smoothness,\n")
    table = load_table(path)
    assert list(table["sample_id"]) == ["NA", "null"] and list(table["condition"]) == ["None", "None"]
    assert table["layer"].isna().tolist() == [True, False] and math.isnan(table["value"].iloc[1])


@pytest.mark.parametrize(
    "content, message",
    [
        ("sample_id,condition,metric,value\n1,human,ce_loss,2.0\n", "missing column"),
        ("sample_id,condition,layer,metric,value\n1,human,,ce_loss,2\n1,human,,ce_loss,3\n", "appears twice"),
    ],
)
def test_load_table_rejects_malformed_tables(tmp_path, content, message):
    path = tmp_path / "per_sample.csv"
    path.write_text(content)
    with pytest.raises(RunFailure, match=message):
        load_table(path)


def test_a_comparison_needs_two_paired_samples(tmp_path, raw):
    few_models = raw[(raw["condition"] != "model") | (raw["sample_id"] == "0")]
    path = tmp_path / "per_sample.csv"
    few_models.to_csv(path, index=False)
    with pytest.raises(RunFailure, match="human_vs_model.*found 1"):
        compute_stats(load_table(path), make_spec(bootstrap_resamples=0))


# --- undefined metrics: NaN, dropped pairwise, reported ----------------------------------------


def test_metrics_undefined_for_a_short_response_are_nan_and_the_others_match_their_definition():
    import torch
    from torch.nn.functional import cosine_similarity

    from harness.metrics import LAYER_METRICS, TEXT_METRICS

    hidden = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for tokens in range(4):  # row i: i response tokens, from position 2
        mask[tokens, 2 : 2 + tokens] = True
    values = {name: metric(hidden, mask) for name, metric in LAYER_METRICS.items()}
    assert all(torch.isnan(value[0]) for value in values.values())  # no response token
    assert all(torch.isnan(values[name][1]) for name in ("smoothness", "normalized_smoothness", "directional_consistency"))
    assert torch.isnan(values["directional_consistency"][2])  # one delta: no pair of successive deltas
    first, second = hidden[3, 3] - hidden[3, 2], hidden[3, 4] - hidden[3, 3]
    assert values["magnitude"][1].item() == pytest.approx(hidden[1, 2].norm().item(), rel=1e-6)
    assert values["smoothness"][2].item() == pytest.approx((hidden[2, 3] - hidden[2, 2]).norm().item(), rel=1e-6)
    assert values["directional_consistency"][3].item() == pytest.approx(
        cosine_similarity(second, first, dim=0).item(), rel=1e-6
    )
    nll, targets = torch.rand(4, 6), torch.ones(4, 6, dtype=torch.bool)
    targets[:, 0] = False
    assert torch.isnan(TEXT_METRICS["ce_loss_response"](nll, targets, mask)[0])
    assert TEXT_METRICS["ce_loss"](nll, targets, mask)[0].item() == pytest.approx(nll[0, 1:].mean().item(), rel=1e-6)


def test_dropped_texts_name_each_text_lacking_a_metric_and_its_response_length(gapped_csv_path, gapped_raw):
    from harness.diagnostics import dropped_texts

    short = set(ABSENT) | set(UNDEFINED)
    texts = [
        {"sample_id": sample_id, "condition": condition, "n_response_tokens": 1 if (sample_id, condition) in short else 9}
        for (sample_id, condition), _ in gapped_raw.groupby(["sample_id", "condition"])
    ]
    metrics = ["ce_loss", "ce_loss_response", "smoothness", "magnitude"]
    lacking = {key: [metric for metric in metrics if metric in ABSENT.get(key, ()) + UNDEFINED.get(key, ())] for key in short}
    expected = [
        {"sample_id": sample_id, "condition": condition, "metrics": lacking[sample_id, condition], "reason": "1 response token"}
        for sample_id, condition in sorted(short)
    ]
    dropped = dropped_texts(texts, load_table(gapped_csv_path), metrics)
    assert sorted(dropped, key=lambda row: (row["sample_id"], row["condition"])) == expected


def test_a_one_token_response_is_dropped_pairwise_and_reported(tmp_path, tiny_model_dir):
    """WikiText-2 test row 40's rest after its first sentence is a single '"': one response token."""
    from conftest import wikitext_rows
    from test_run import Log, tiny_spec

    from harness.session import run_spec

    rows = wikitext_rows()
    data = tmp_path / "rows.raw"
    data.write_text("\n".join(rows[row] for row in (39, 40, 41, 45, 46, 48)) + "\n", encoding="utf-8")
    tiny_spec(tmp_path, tiny_model_dir)
    spec = tmp_path / "one-token.yaml"
    spec.write_text(f"extends: tiny.yaml\nname: one-token\ndataset: {{path: '{data}'}}\n")
    run_dir = run_spec(spec, tmp_path / "runs", log=Log()).run_dir

    texts = [json.loads(line) for line in (run_dir / "texts.jsonl").read_text().splitlines()]
    [short] = [text for text in texts if text["n_response_tokens"] < 2]
    assert (short["condition"], short["response"], short["n_response_tokens"]) == ("human", '"', 1)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert all(isinstance(value, float) and math.isfinite(value) for value in stats.values())  # NaN would be "nan"
    n_samples = len(texts) // 2
    for metric in ("smoothness", "magnitude"):
        assert stats[f"{metric}.overall.n"] == stats[f"{metric}.layer1.n"] == n_samples - 1
    assert stats["ce_loss.overall.n"] == stats["ce_loss_response.overall.n"] == n_samples
    assert stats["correlation.pooled.n"] == 2 * n_samples - 1
    criteria = json.loads((run_dir / "criteria.json").read_text())
    assert criteria and all(row["error"] is None for row in criteria)

    dropped = {"sample_id": short["sample_id"], "condition": "human", "metrics": ["smoothness", "magnitude"],
               "reason": "1 response token"}
    assert json.loads((run_dir / "diagnostics.json").read_text())["dropped"] == [dropped]
    report = (run_dir / "RESULTS.md").read_text()
    assert "## Dropped samples" in report
    assert f"| {short['sample_id']} | human | smoothness, magnitude | 1 response token |" in report


def test_the_stats_benchmark_runs_and_compares_a_version_with_itself():
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_stats.py"
    stats_py = Path(stats_stage.__file__)
    result = subprocess.run(
        [sys.executable, str(bench), "--n-samples", "12", "--layers", "3", "--baseline", str(stats_py)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "12 samples x 2 conditions x 3 layers" in result.stdout
    assert "point statistics that differ: 0 []; largest relative change of an interval bound: 0" in result.stdout
