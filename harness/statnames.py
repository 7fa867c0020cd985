"""Statistic names: the words that make up the flat names in stats.json and criteria.

Used both by spec validation (which words a criterion may use) and by the stats stage
(which names it writes), so neither imports the other. A name is words joined by dots, e.g.
``human_vs_model.smoothness.layer3.p_holm``; see ``harness.stages.stats`` for the grammar.
"""

from __future__ import annotations

import re

COLUMNS = ("sample_id", "condition", "layer", "metric", "value")
"""Columns of per_sample.csv."""

OVERALL = "overall"
"""Scope of a metric's value for a whole sample (trajectory metrics: the mean over layers)."""

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
MIXEDLM_STATS = ("x_coef", "x_p", "condition_coef", "condition_p", "converged")

STAT_KEYWORDS: frozenset[str] = frozenset(
    {OVERALL, "correlation", "pooled", "difference", "mixedlm"}
    | set(DESCRIPTIVE_STATS)
    | set(PAIRED_STATS)
    | set(LAYER_ADJUSTED_P)
    | set(CORRELATION_STATS)
    | set(MIXEDLM_STATS)
)
"""Every word of a statistic name that does not come from the spec (metric, condition and
comparison names, and ``layer<N>``)."""

LAYER_SCOPE = re.compile(r"layer\d+")
"""Per-layer statistics (``smoothness.layer12.d``) are accepted for any layer number."""

WINDOW_SCOPE = re.compile(r"window(\d+)_(\d+)")
"""A position window's word: ``window5_20`` covers response tokens 5 to 19 (``stats.positions``)."""


def window_name(start: int, end: int) -> str:
    """The word naming the window of response tokens ``start <= i < end``, e.g. ``window0_5``."""
    return f"window{start}_{end}"

TEXT_METRIC_NAMES = ("ce_loss", "ce_loss_response")
"""Per-text metrics every run computes (see metrics/)."""

SWEEP = "sweep"
"""First word of every sweep-level statistic (`sweep_criteria:` of a spec with a `matrix:`)."""
SWEEP_CRITERION_STATS = ("passed_count", "passed_fraction")
"""Per point criterion: `sweep.<criterion>.passed_count`, `.passed_fraction`."""
SWEEP_SUMMARIES = ("min", "median", "max")
"""Per statistic across the points: `sweep.<statistic>.min`, ..."""
SWEEP_ADJUSTED_P = "p_bh"
"""Per `…p` statistic, Benjamini–Hochberg adjusted across the points: `sweep.<statistic>.p_bh.max`, ..."""
SWEEP_KEYWORDS: frozenset[str] = frozenset({SWEEP, SWEEP_ADJUSTED_P, *SWEEP_CRITERION_STATS, *SWEEP_SUMMARIES})
