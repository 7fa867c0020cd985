"""Text diagnostics: properties of the texts that could explain a trajectory difference.

A model's continuation may differ from the human text in ways that have nothing to do with
"its own text": it may loop, stop early, be shorter, or lack WikiText's tokenization
artifacts. These numbers let the report name such threats to validity.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd
from scipy.stats import pearsonr

from harness.schema import Spec
from harness.statnames import TEXT_METRIC_NAMES

NGRAM_SIZE = 6
"""Repetition is measured on token n-grams of this size (the response tokens the metrics saw:
a loop of digits, one word but many tokens, counts)."""

ARTIFACT_PATTERNS: dict[str, re.Pattern[str]] = {
    "line_breaks": re.compile(r"\n"),
    "wikitext_at_tokens": re.compile(r" @[-,.]@ "),
    "space_before_punctuation": re.compile(r"\s[,.;:!?)\]]"),
}
"""Formatting artifacts, by name: a response has one when its pattern occurs anywhere in it."""


def repeated_ngram_fraction(units: list[str], n: int = NGRAM_SIZE) -> float:
    """Share of the n-grams of `units` (a response's tokens) that already occurred earlier in it
    (0 when it has none): the loop "a b c d a b c d" scores 1/5 with n = 4, of its five 4-grams
    only the last repeats the first."""
    ngrams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for ngram in ngrams:
        repeats += ngram in seen
        seen.add(ngram)
    return repeats / len(ngrams) if ngrams else 0.0


def overall_metric(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (condition, sample_id) the metric's mean over layers: column ``value``."""
    rows = table[(table["metric"] == metric) & table["layer"].notna()]
    overall = rows.groupby(["condition", "sample_id"], as_index=False)["value"].mean()
    return overall.astype({"sample_id": str})


def text_diagnostics(texts: list[dict], table: pd.DataFrame, spec: Spec) -> dict:
    """Per condition: repetition (also per sample), early stops, length, formatting artifacts,
    repetition vs. the metric.

    ``texts`` are texts.jsonl rows, ``table`` is per_sample.csv (long form). The association
    is Pearson's r between a sample's repeated n-gram fraction and its overall value of the
    studied trajectory metric (``stats.correlate[1]``) within the condition. The result is
    JSON-serialisable; undefined numbers (e.g. r of a constant) are None.
    """
    metric, grid = spec.stats.correlate[1], spec.grid
    frame = _text_frame(texts)
    overall = overall_metric(table, metric).rename(columns={"value": metric})
    conditions = {}
    for condition in spec.conditions:
        rows = frame[frame["condition"] == condition]
        paired = rows.merge(overall[overall["condition"] == condition], on=["condition", "sample_id"])
        conditions[condition] = {
            "n_texts": len(rows),
            "repeated_ngram_fraction": _mean_max(rows["repeated_ngram_fraction"]),
            "repeated_ngram_fraction_by_sample": {sample: float(share) for sample, share in zip(rows["sample_id"], rows["repeated_ngram_fraction"])},
            "stopped_early_share": _share(rows["stopped_early"].dropna()),
            "response_tokens": {
                "mean": _number(rows["n_response_tokens"].mean()),
                "min": _number(rows["n_response_tokens"].min()),
                "max": _number(rows["n_response_tokens"].max()),
            },
            "artifact_share": {name: _share(rows[name]) for name in ARTIFACT_PATTERNS},
            "repetition_vs_metric": _pearson(paired["repeated_ngram_fraction"], paired[metric]),
        }
    return {
        "ngram_size": NGRAM_SIZE,
        "ngram_unit": "token" if all("tokens" in text for text in texts) else "word",
        "metric": metric,
        "conditions": conditions,
        # a held-out direction's columns lack the samples that built it by design, not for their length
        "dropped": dropped_texts(texts, table, [*TEXT_METRIC_NAMES, *(
            column.name for column in grid.primary_columns() if column.direction not in grid.held_out
        )]),
    }


def dropped_texts(texts: list[dict], table: pd.DataFrame, metrics: list[str]) -> list[dict]:
    """Texts lacking some of ``metrics`` (undefined for them), which the paired statistics leave out.

    A text lacks a metric when per_sample.csv has no value for it, or a NaN in any layer; its
    sample then leaves that metric's comparisons with the text's condition. One entry per text:
    ``sample_id``, ``condition``, ``metrics`` (those it lacks), ``reason`` (its response length:
    metrics are undefined for responses too short for them).
    """
    complete = table["value"].notna().groupby([table["condition"], table["sample_id"], table["metric"]]).all()
    defined = set(complete.index[complete.to_numpy()])
    dropped = []
    for text in texts:
        condition, sample_id = text["condition"], str(text["sample_id"])
        lacking = [metric for metric in metrics if (condition, sample_id, metric) not in defined]
        if lacking:
            n_tokens = text["n_response_tokens"]
            reason = f"{n_tokens} response token{'' if n_tokens == 1 else 's'}"
            dropped.append({"sample_id": text["sample_id"], "condition": text["condition"], "metrics": lacking, "reason": reason})
    return dropped


def _text_frame(texts: list[dict]) -> pd.DataFrame:
    """One row per text: its condition, sample id and per-text diagnostics."""
    records = []
    for text in texts:
        response = text["response"]
        # a run folder written before texts.jsonl held the tokens: the response's words
        units = text["tokens"] if "tokens" in text else response.lower().split()
        records.append(
            {
                "condition": text["condition"],
                "sample_id": str(text["sample_id"]),
                "repeated_ngram_fraction": repeated_ngram_fraction(units),
                "stopped_early": text.get("stopped_early"),
                "n_response_tokens": text["n_response_tokens"],
                **{name: bool(pattern.search(response)) for name, pattern in ARTIFACT_PATTERNS.items()},
            }
        )
    columns = ["condition", "sample_id", "repeated_ngram_fraction", "stopped_early", "n_response_tokens", *ARTIFACT_PATTERNS]
    return pd.DataFrame(records, columns=columns)


def _number(value: float) -> float | None:
    """A plain float, or None where undefined (NaN, or an empty selection)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _share(flags: pd.Series) -> float | None:
    """Share of True among the flags; None when there are none (e.g. no generated texts)."""
    return _number(flags.astype(bool).mean()) if len(flags) else None


def _mean_max(values: pd.Series) -> dict[str, float | None]:
    return {"mean": _number(values.mean()), "max": _number(values.max())}


def _pearson(x: pd.Series, y: pd.Series) -> dict[str, float | None]:
    """Pearson r and p; None where undefined (fewer than 3 pairs, or a constant variable)."""
    keep = x.notna() & y.notna()
    x, y = x[keep].to_numpy(float), y[keep].to_numpy(float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": None, "p": None, "n": len(x)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant input: a NaN, reported as None
        result = pearsonr(x, y)
    return {"r": _number(result.statistic), "p": _number(result.pvalue), "n": len(x)}
