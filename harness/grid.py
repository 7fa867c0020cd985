"""The grid of what a run measures: metric × capture site × direction set × position window.

A `Column` is one cell of it: a trajectory or projection metric, read at one capture site,
projected onto one direction set (projection metrics only), over whole responses or over one
window of response tokens. It builds its own name, which is the `metric` of per_sample.csv and
the first words of its statistics, and parses one back:

    smoothness                                        resid_post, whole responses
    smoothness_attn_out                               another site suffixes the metric
    projection_mean.refusal                           onto the direction set `refusal`
    smoothness.window0_5                              response tokens 0 to 4
    projection_variance_attn_out.refusal.window5_20   all four

A `Grid` is a spec's columns (`Grid.from_spec`, or `Spec.grid`): in the order capture fills its
device buffer, in per_sample.csv's order, the primary ones the report summarises, the words a
criterion may use, and the samples each held-out direction set's columns leave out.

Imports no torch: spec validation asks the grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Mapping

from harness.sites import DEFAULT_SITE, SITES
from harness.statnames import INTERVENED_TEXT_METRIC_NAMES, STAT_KEYWORDS, TEXT_METRIC_NAMES, overall_scope
from harness.metrics import PROJECTION_METRICS

if TYPE_CHECKING:
    from harness.schema import Spec

_WINDOW_WORD = re.compile(r"window(\d+)_(\d+)")
"""A position window's word: ``window5_20`` covers response tokens 5 to 19."""


def is_axis_word(word: str) -> bool:
    """Whether `word` looks like a word the grid's axes put into names (`window0_5`): no
    condition, comparison or direction set may be called so."""
    return _WINDOW_WORD.fullmatch(word) is not None


@dataclass(frozen=True)
class Window:
    """Response tokens ``start <= i < end`` (one entry of ``capture.windows``)."""

    start: int
    end: int

    @property
    def name(self) -> str:
        """The word naming the window in column and statistic names: ``window0_5``."""
        return f"window{self.start}_{self.end}"

    @classmethod
    def parse(cls, word: str) -> Window | None:
        """The window `word` names, or None when it names none."""
        match = _WINDOW_WORD.fullmatch(word)
        window = cls(int(match[1]), int(match[2])) if match else None
        return window if window and window.name == word else None  # `window05_5` is not a window's name


@dataclass(frozen=True)
class Column:
    """One measured quantity: a metric at a capture site, onto a direction set, over a window."""

    metric: str
    """A trajectory or projection metric (registered in metrics/)."""
    site: str = DEFAULT_SITE
    """Where in each decoder block the stream is read (harness/sites.py)."""
    direction: str | None = None
    """The direction set a projection metric projects onto; None for a trajectory metric."""
    window: Window | None = None
    """The response tokens measured; None: whole responses."""

    @property
    def metric_at_site(self) -> str:
        """The name's first word: the metric, suffixed by its site unless that is the default one."""
        return self.metric if self.site == DEFAULT_SITE else f"{self.metric}_{self.site}"

    @property
    def words(self) -> tuple[str, ...]:
        """The words of the name, in order."""
        direction = (self.direction,) if self.direction is not None else ()
        window = (self.window.name,) if self.window is not None else ()
        return (self.metric_at_site, *direction, *window)

    @property
    def name(self) -> str:
        """``<metric>[_<site>][.<direction>][.<window>]``: the column of per_sample.csv."""
        return ".".join(self.words)

    def __str__(self) -> str:
        return self.name

    def at(self, window: Window | None) -> Column:
        """The same metric, site and direction set over `window` (None: whole responses)."""
        return replace(self, window=window)

    @property
    def family(self) -> tuple[Column, bool]:
        """Which columns' per-layer p-values are adjusted together (`p_holm`, `p_bh`): the layers
        of a whole-response column; for a window column, every window x layer of its metric at
        its site and direction set. Columns of one family share this key: (the whole-response
        column, whether it is the family of its windows)."""
        return self.at(None), self.window is not None

    @classmethod
    def parse(cls, name: str) -> Column:
        """The column `name` names (ValueError if it names none). The first word's longest
        `_<site>` suffix of a registered site other than the default one is its site; a metric
        whose own name ends that way is refused by spec validation, so parsing is exact."""
        first, *rest = name.split(".")
        window = Window.parse(rest[-1]) if rest else None
        if window is not None:
            rest.pop()
        if len(rest) > 1 or not first or not all(rest):
            raise ValueError(f"{name!r} is not a column name (<metric>[_<site>][.<direction>][.<window>])")
        metric, site = first, DEFAULT_SITE
        for candidate in sorted(SITES, key=len, reverse=True):
            if candidate != DEFAULT_SITE and first.endswith(f"_{candidate}") and len(first) > len(candidate) + 1:
                metric, site = first[: -len(candidate) - 1], candidate
                break
        return cls(metric, site, rest[0] if rest else None, window)


@dataclass(frozen=True)
class Grid:
    """What a run measures (`from_spec`): its axes, and the columns they make."""

    metrics: tuple[str, ...]
    """Trajectory and projection metrics, in the spec's order (``metrics:``)."""
    sites: tuple[str, ...] = (DEFAULT_SITE,)
    """Capture sites (``capture.sites``); the first one's columns are the primary ones."""
    directions: tuple[str, ...] = ()
    """Direction sets (``directions:``), each projection metric's columns in this order."""
    windows: tuple[Window, ...] = ()
    """Position windows (``capture.windows``); every column is also measured on each."""
    held_out: frozenset[str] = frozenset()
    """Direction sets evaluated only on the samples that did not build them (``evaluate_on: held_out``)."""
    conditions: tuple[str, ...] = ()
    """Condition names: words of the descriptive statistics."""
    comparisons: tuple[str, ...] = ()
    """Comparison names: the prefix of each comparison's statistics."""
    overall_rules: tuple[str, ...] = ("mean",)
    """Names of the rules aggregating a column's layers (``stats.overall``), the first one first."""

    @classmethod
    def from_spec(cls, spec: Spec) -> Grid:
        return cls(
            metrics=tuple(spec.metrics),
            sites=tuple(spec.capture.sites),
            directions=tuple(spec.directions),
            windows=tuple(Window(start, end) for start, end in spec.capture.windows),
            held_out=frozenset(name for name, entry in spec.directions.items() if entry.evaluate_on == "held_out"),
            conditions=tuple(spec.conditions),
            comparisons=tuple(spec.comparisons),
            overall_rules=tuple(spec.stats.overall_rule_names),
        )

    def _at_site(self, site: str) -> list[Column]:
        """Every metric at `site` over whole responses, a projection metric once per direction set."""
        return [
            Column(metric, site, direction)
            for metric in self.metrics
            for direction in (self.directions if metric in PROJECTION_METRICS else (None,))
        ]

    def columns(self) -> list[Column]:
        """Every column in the order capture's device buffer holds them: site by site, per site
        whole responses then each window, per window the metrics (a projection metric's direction
        sets in turn). One hook (a site at a layer) fills a run of consecutive columns per window."""
        return [column.at(window) for site in self.sites for window in (None, *self.windows)
                for column in self._at_site(site)]

    def buffer_shape(self, layers: int, texts: int) -> tuple[int, int, int]:
        """The shape of capture's buffer of column values for a batch: [columns, layers, texts]."""
        return len(self.columns()), layers, texts

    def whole_columns(self) -> list[Column]:
        """The whole-response columns of every site, site by site."""
        return [column for site in self.sites for column in self._at_site(site)]

    def per_layer_columns(self) -> list[Column]:
        """The per-layer metrics of per_sample.csv, in its order: the whole-response columns, then
        each of them per window (``smoothness.window0_5``, ``smoothness.window5_20``, ...)."""
        whole = self.whole_columns()
        return whole + [column.at(window) for column in whole for window in self.windows]

    def primary_columns(self) -> list[Column]:
        """The whole-response columns of the first site: what the report summarises."""
        return self._at_site(self.sites[0])

    def column(self, name: str) -> Column:
        """The grid's column named `name` (KeyError if the grid has none)."""
        try:
            column = Column.parse(name)
        except ValueError:
            column = None
        if column is None or column not in self.per_layer_columns():
            raise KeyError(f"no column {name!r} in this run's grid")
        return column

    def overall_scopes(self) -> dict[str, str]:
        """Per overall scope of a column's statistics, the rule it aggregates layers by:
        ``{"overall": "mean", "overall_standardized": "standardized"}``."""
        return {overall_scope(rule, index == 0): rule for index, rule in enumerate(self.overall_rules)}

    def statistic_vocabulary(self) -> set[str]:
        """Every word that may appear between the dots of a statistic name (besides ``layer<N>``)."""
        words = {word for column in self.per_layer_columns() for word in column.words}
        words |= {*self.overall_scopes(), *self.overall_rules}
        return words | set(TEXT_METRIC_NAMES) | set(INTERVENED_TEXT_METRIC_NAMES) | set(self.conditions) | set(self.comparisons) | set(STAT_KEYWORDS)

    def held_out_samples(self, built_from: Mapping[str, Iterable[int]]) -> dict[str, set[int]]:
        """Per column of a held-out direction set (by name), the samples to leave out of
        per_sample.csv: those that built the set (`built_from`, by direction set), so that its
        statistics use only the others."""
        return {
            column.name: set(built_from[column.direction])
            for column in self.per_layer_columns()
            if column.direction in self.held_out
        }
