"""Statistic names: the words that make up the flat names in stats.json and criteria.

Used both by spec validation (which words a criterion may use) and by the stats stage
(which names it writes), so neither imports the other. A name is words joined by dots, e.g.
``human_vs_model.smoothness.layer3.p_holm``; see ``harness.stages.stats`` for the grammar. The
functions below build every statistic name (and split one into its words): nothing else
joins or splits them. A column (``smoothness``, ``projection_mean.refusal.window0_5``) is
named by ``harness.grid``.
"""

from __future__ import annotations

import re
from typing import Iterable

COLUMNS = ("sample_id", "condition", "layer", "metric", "value")
"""Columns of per_sample.csv."""

OVERALL = "overall"
"""Scope of a metric's value for a whole sample (trajectory metrics: its layers aggregated by
the first rule of ``stats.overall``, by default their mean)."""

OVERALL_RULES = ("mean", "standardized", "median_layer")
"""The named rules of ``stats.overall``; a depth band is named by `depth_band_rule`."""
RULE = "rule"
"""``<overall scope>.rule.<rule>`` = 1 records which rule an overall scope aggregates layers by."""

LAYER_SUMMARY_SCOPE = "layers"
LAYER_SUMMARIES = ("n_positive_significant", "n_negative_significant", "median_d", "share_of_overall_max")
"""Per trajectory column, ``<column>.layers.<summary>``: layers with d > 0 (< 0) and Holm p below
``report.alpha``, the median of the layers' d, and the largest share of the (mean) overall value
one layer carries."""
INFLUENCE_STATS = ("d_loo_max_change", "d_loo_max_change_sample")
"""Per overall scope, the largest change of d when one sample is left out, and that sample's id."""

DESCRIPTIVE_STATS = ("mean", "sd", "n")
PAIRED_STATS = (
    "mean_a",
    "mean_b",
    "mean_diff",
    "mean_diff_ci_low",
    "mean_diff_ci_high",
    "d",
    "d_ci_low",
    "d_ci_high",
    "t",
    "p",
    "wilcoxon_w",
    "wilcoxon_p",
    "n",
)
LAYER_ADJUSTED_P = {"p_holm": "holm", "p_bh": "fdr_bh"}
"""Per-layer p-values adjusted across the layers of one metric: name -> multipletests method."""
CORRELATION_STATS = ("r", "p", "ci_low", "ci_high", "n")
INTERVALS = {"mean_diff": ("mean_diff_ci_low", "mean_diff_ci_high"), "d": ("d_ci_low", "d_ci_high"), "r": ("ci_low", "ci_high")}
"""The statistics that carry a confidence interval: stat -> the names of its bounds (same scope)."""
MIXEDLM_STATS = ("x_coef", "x_p", "condition_coef", "condition_p", "converged")

STAT_KEYWORDS: frozenset[str] = frozenset(
    {OVERALL, "correlation", "pooled", "difference", "mixedlm", RULE, LAYER_SUMMARY_SCOPE}
    | set(LAYER_SUMMARIES)
    | set(INFLUENCE_STATS)
    | set(DESCRIPTIVE_STATS)
    | set(PAIRED_STATS)
    | set(LAYER_ADJUSTED_P)
    | set(CORRELATION_STATS)
    | set(MIXEDLM_STATS)
)
"""Every word of a statistic name that does not come from the spec (metric, condition and
comparison names, and ``layer<N>``)."""

LAYER_SCOPE = re.compile(r"layer(\d+)")
"""Per-layer statistics (``smoothness.layer12.d``) are accepted for any layer number."""

TEXT_METRIC_NAMES = ("ce_loss", "ce_loss_response")
"""Per-text metrics every run computes (see metrics/)."""
INTERVENED_TEXT_METRIC_NAMES = ("kl_from_clean",)
"""Per-text metrics defined only on a forward an `intervene` condition changes (see metrics/)."""

SWEEP = "sweep"
"""First word of every sweep-level statistic (`sweep_criteria:` of a spec with a `matrix:`)."""
SWEEP_CRITERION_STATS = ("passed_count", "passed_fraction")
"""Per point criterion: `sweep.<criterion>.passed_count`, `.passed_fraction`."""
SWEEP_SUMMARIES = ("min", "median", "max")
"""Per statistic across the points: `sweep.<statistic>.min`, ..."""
SWEEP_ADJUSTED_P = "p_bh"
"""Per `…p` statistic, Benjamini–Hochberg adjusted across the points: `sweep.<statistic>.p_bh.max`, ..."""
SWEEP_TREND = "trend"
"""Per statistic, Spearman's rank correlation with a one-key numeric matrix's values (a dose-response):
`sweep.<statistic>.trend.rho`, `sweep.<statistic>.trend.p`."""
SWEEP_TREND_STATS = ("rho", "p")
SWEEP_KEYWORDS: frozenset[str] = frozenset(
    {SWEEP, SWEEP_ADJUSTED_P, SWEEP_TREND, *SWEEP_CRITERION_STATS, *SWEEP_SUMMARIES, *SWEEP_TREND_STATS}
)


def layer_scope(layer: int) -> str:
    """The scope word of one layer's statistics: ``layer12``."""
    return f"layer{layer}"


def is_layer_scope(scope: str) -> bool:
    """Whether `scope` is one layer's (``layer12``) rather than an overall one."""
    return LAYER_SCOPE.fullmatch(scope) is not None


def depth_band_rule(low: float, high: float) -> str:
    """The name of the rule averaging the layers between relative depths `low` and `high`:
    ``layers25_75`` for [0.25, 0.75]."""
    return f"layers{round(low * 100)}_{round(high * 100)}"


def overall_scope(rule: str, first: bool) -> str:
    """The scope of a rule's overall value: ``overall`` for the first rule of ``stats.overall``,
    ``overall_<rule>`` for each further one (``overall_standardized``)."""
    return OVERALL if first else f"{OVERALL}_{rule}"


def rule_name(scope: str, rule: str) -> str:
    """``<overall scope>.rule.<rule>``: the entry recording which rule `scope` uses."""
    return _joined(scope, RULE, rule)


def _joined(*words: str | None) -> str:
    return ".".join(word for word in words if word is not None)


def paired_name(column: str, scope: str, stat: str, comparison: str | None = None) -> str:
    """A paired statistic, ``[<comparison>.]<column>.<scope>.<stat>`` (``smoothness.layer3.d``);
    without `comparison`, the primary comparison's unprefixed name."""
    return _joined(comparison, column, scope, stat)


def descriptive_name(column: str, condition: str, stat: str, scope: str | None = None) -> str:
    """A condition's descriptive statistic, ``<column>.<condition>[.<scope>].<stat>``
    (``ce_loss.human.mean``, ``smoothness.human.layer3.mean``)."""
    return _joined(column, condition, scope, stat)


def correlation_name(scope: str, stat: str, comparison: str | None = None) -> str:
    """``[<comparison>.]correlation.<scope>.<stat>`` (scope: pooled, a condition, difference)."""
    return _joined(comparison, "correlation", scope, stat)


def mixedlm_name(stat: str, comparison: str | None = None) -> str:
    """``[<comparison>.]mixedlm.<stat>``."""
    return _joined(comparison, "mixedlm", stat)


def prefixed(comparison: str, name: str) -> str:
    """A comparison's unprefixed statistic `name` under its comparison's name."""
    return _joined(comparison, name)


def sweep_name(*words: str) -> str:
    """A sweep-level statistic: ``sweep.<criterion>.passed_count``, ``sweep.<statistic>.p_bh.max``."""
    return _joined(SWEEP, *words)


def words(name: str) -> list[str]:
    """The words of a statistic (or criterion) name."""
    return name.split(".")


def per_layer_names(names: Iterable[str], column: str, stat: str, comparison: str | None = None) -> dict[int, str]:
    """Of `names`, the per-layer `paired_name`s of `column` and `stat`, by layer number."""
    head = words(paired_name(column, layer_scope(0), stat, comparison))[:-2]
    found = {}
    for name in names:
        parts = words(name)
        match = LAYER_SCOPE.fullmatch(parts[-2]) if len(parts) == len(head) + 2 else None
        if match and parts[-1] == stat and parts[:-2] == head:
            found[int(match[1])] = name
    return found


KEY_STATISTICS = re.compile(
    r"^(ce_loss(_response)?\.[A-Za-z0-9_]+\.mean"
    r"|[A-Za-z0-9_]+\.overall\.(d|p|mean_diff)"
    r"|correlation\.[A-Za-z0-9_]+\.r"
    r"|mixedlm\.(x_coef|x_p))$"
)
"""What `harness compare` shows, as unprefixed names: the primary comparison's effects, CE per
condition, correlations."""
