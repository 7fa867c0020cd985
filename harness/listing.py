"""`harness ls`: what a spec may name, without reading the README or a stats.json.

`ls stats` of a spec runs the stats stage's own code on a small synthetic table shaped like
the spec's run (its conditions, metrics, comparisons), so the names listed are the names a
run writes; per-layer names are shown once, as `layer<N>`.
"""

from __future__ import annotations

from pathlib import Path

from harness.data_sources import DATA_SOURCES
from harness.errors import InputError
from harness.metrics import LAYER_METRICS, METRIC_OPTIONS, PROJECTION_METRICS, TEXT_METRICS
from harness.registry import Registry, load_plugins
from harness.sources import SOURCES
from harness.sites import SITES
from harness.statnames import (
    LAYER_SCOPE,
    SWEEP_ADJUSTED_P,
    SWEEP_CRITERION_STATS,
    SWEEP_SUMMARIES,
    SWEEP_TREND,
    SWEEP_TREND_STATS,
    sweep_name,
)

SYNTHETIC_SAMPLES = 4
SYNTHETIC_LAYERS = 2


def first_line(text: str | None) -> str:
    return ((text or "").strip().splitlines() or [""])[0]


def metrics() -> list[str]:
    load_plugins()
    rows = [_row(name, LAYER_METRICS, f"per layer{' (options)' if name in METRIC_OPTIONS else ''}: {first_line(fn.__doc__)}")
            for name, fn in LAYER_METRICS.items()]
    rows += [_row(name, PROJECTION_METRICS, f"per layer and direction set: {first_line(fn.__doc__)}")
             for name, fn in PROJECTION_METRICS.items()]
    return rows + [_row(name, TEXT_METRICS, f"per text: {first_line(fn.__doc__)}") for name, fn in TEXT_METRICS.items()]


def sources() -> list[str]:
    """Condition sources (`conditions.<name>.source`), then data sources (`dataset.source`)."""
    load_plugins()
    rows = [_row(name, SOURCES, first_line(source.spec_model.__doc__)) for name, source in SOURCES.items()]
    return rows + [f"{'dataset: ' + name:<26} {DATA_SOURCES.origin(name):<10} {first_line(source.spec_model.__doc__)}"
                   for name, source in DATA_SOURCES.items()]


def sites() -> list[str]:
    """The registered sites, then the decoder families whose sublayers a block is read by role in."""
    from harness.structure import FAMILIES  # imports torch: only this listing needs the model-structure table

    load_plugins()
    rows = [_row(name, SITES, first_line(fn.__doc__)) for name, fn in SITES.items()]
    return rows + [f"{'(families)':<26} {'':<10} attention and MLP sublayers found by role in: {', '.join(FAMILIES)}"]


def _row(name: str, registry: Registry, text: str) -> str:
    """A registry entry's line: its name, the package it comes from, what it is."""
    return f"{name:<26} {registry.origin(name):<10} {text}"


def interventions() -> list[str]:
    from harness.interventions import INTERVENTIONS

    load_plugins()
    return [_row(name, INTERVENTIONS, first_line(kind.spec_model.__doc__)) for name, kind in INTERVENTIONS.items()]


def specs(files: list[Path], width: int) -> list[str]:
    """One line per spec: its name (its file too when the name is not the file's), matrix points,
    offline or hub, a summary; each line cut to `width` characters."""
    from harness.sweep import expand

    rows = []
    for path in files:
        try:
            sweep = expand(path)
        except InputError as exc:
            rows.append((path.stem, "invalid", str(exc)))
            continue
        name = sweep.name if sweep.name == path.stem else f"{sweep.name} ({path})"
        points = f", {len(sweep.points)} points" if sweep.is_matrix else ""
        where = "hub" if any(needs_hub(point.spec) for point in sweep.points) else "offline"
        rows.append((name + points, where, summary(path, sweep.points[0].spec.description)))
    widths = [max((len(row[column]) for row in rows), default=0) for column in range(2)]
    return [cut("  ".join(cell.ljust(size) for cell, size in zip(row, widths)) + "  " + row[2], width) for row in rows]


def summary(path: Path, description: str | None) -> str:
    """What the spec file itself says it is: its own `description`, else the comment it opens
    with (a spec that extends another inherits its description, which says what the parent is)."""
    import yaml

    own = yaml.safe_load(path.read_text(encoding="utf-8")).get("description")  # the file alone: it loaded as a spec
    if isinstance(own, str) and own.strip():
        return " ".join(own.split())
    comment = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# yaml-language-server"):
            comment.append(line.lstrip("# ").strip())
    return " ".join(" ".join(comment).split()) or " ".join((description or "").split())


def cut(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def needs_hub(spec) -> bool:
    """Whether a run of `spec` reads from the Hugging Face hub: a model that is neither a GGUF
    package nor a local path (as `harness.models` tells them apart), or a dataset other than
    a file and the WikiText-2 split shipped with the package."""
    from harness.model_spec import ModelSpec

    models = [*spec.models.values(), *([spec.dataset.tokenizer] if isinstance(spec.dataset.tokenizer, ModelSpec) else [])]
    return spec.dataset.reads_hub or any(model.gguf is None and not Path(model.id).expanduser().exists() for model in models)


def matching(names: list[str], pattern: str) -> list[str]:
    """The names `pattern` selects (`harness.select.pattern_matches`); a per-layer name in the
    pattern (`smoothness.layer12.d`) selects its `layer<N>` line."""
    from harness.select import pattern_matches

    pattern = LAYER_SCOPE.sub("layer<N>", pattern)
    return [name for name in names if pattern_matches(name, pattern)]


def stats(target: Path) -> list[str]:
    """Statistic names of a finished run, a sweep folder, or a spec (what its run will write)."""
    from harness.rundir import is_run_dir, read_stats
    from harness.sweep_report import SWEEP_FILE, is_sweep_dir

    if target.is_dir():
        if is_sweep_dir(target):
            from harness.inputs import read_json

            statistics = read_json(target / SWEEP_FILE, expect=dict).get("statistics")
            if not isinstance(statistics, dict):
                raise InputError(f"{target / SWEEP_FILE}: 'statistics' must be a mapping of names to values")
            return collapse(statistics)
        if not is_run_dir(target):
            raise InputError(f"{target}: neither a finished run folder, a sweep folder nor a spec")
        return collapse(read_stats(target))
    from harness.sweep import expand

    sweep = expand(target)
    names = collapse(synthetic_stats(sweep.points[0].spec))
    if sweep.is_matrix:
        names += [sweep_name(name, "|".join(SWEEP_CRITERION_STATS)) for name in sweep.points[0].spec.criteria]
        names += [sweep_name("<statistic above>", "|".join(SWEEP_SUMMARIES)),
                  sweep_name("<statistic above ending in p>", SWEEP_ADJUSTED_P, "|".join(SWEEP_SUMMARIES))]
        if sweep.dose is not None:
            names += [sweep_name("<statistic above>", SWEEP_TREND, "|".join(SWEEP_TREND_STATS))]
    return names


def collapse(names) -> list[str]:
    """Names in order, each per-layer name once with `layer<N>`."""
    return list(dict.fromkeys(LAYER_SCOPE.sub("layer<N>", name) for name in names))


def synthetic_stats(spec) -> dict[str, float]:
    """The stats stage on random numbers shaped like the spec's per-sample table."""
    import io
    import warnings

    import numpy as np

    from harness.stages.stats import compute_stats, load_table
    from harness.statnames import INTERVENED_TEXT_METRIC_NAMES, TEXT_METRIC_NAMES

    rng = np.random.default_rng(0)
    lines = ["sample_id,condition,layer,metric,value"]
    columns = [column.name for column in spec.grid.per_layer_columns()]
    for sample in range(SYNTHETIC_SAMPLES):
        for condition in spec.conditions:
            intervened = spec.conditions[condition].source == "intervene"
            text_metrics = TEXT_METRIC_NAMES + (INTERVENED_TEXT_METRIC_NAMES if intervened else ())
            lines += [f"{sample},{condition},,{metric},{rng.random()}" for metric in text_metrics]
            lines += [f"{sample},{condition},{layer},{metric},{rng.random()}"
                      for metric in columns for layer in range(SYNTHETIC_LAYERS)]
    quick = spec.model_copy(update={"stats": spec.stats.model_copy(update={"bootstrap_resamples": 0})})
    with warnings.catch_warnings():  # random numbers make poor fits; only the names matter here
        warnings.simplefilter("ignore")
        return compute_stats(load_table(io.StringIO("\n".join(lines) + "\n")), quick)
