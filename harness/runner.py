"""The runner: *collect* every pre-run check into a plan, then *execute* the plan.

    spec → data → conditions (generate) → capture (forward + metrics) → stats → criteria → report

Collection (like pytest's) fails on any bad input before a stage runs or a file is written.
Execution only sequences the stages; each stage module owns its inputs, key and work units,
and `harness.executor` caches, resumes, shards, times and logs them. The run folder is
assembled under a hidden name and renamed into place at the end (`harness.rundir`); its
manifest is built here, from the plan. `harness.session` drives these for every point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import harness
from harness import rundir, structure
from harness.artifacts import content_hash, number
from harness.cache import ROOT_VARIABLE, StageCache, cache_root
from harness.data_sources import Table, read_table
from harness.directions import DirectionSet, load_direction_sets
from harness.errors import ExitCode, InputError
from harness.executor import Executor, Shard
from harness.interventions import describe
from harness.overrides import Override
from harness.pool import ModelPool
from harness.schema import Spec
from harness.sites import DEFAULT_SITE
from harness.sources import SOURCES
from harness.stages import capture, conditions, criteria, data, decode_capture, report_stage, stats
from harness.templates import find_template
from harness.writing import check_writable_folder

@dataclass
class RunOutcome:
    run_dir: Path | None
    """None on ranks other than 0, which write nothing."""
    results: list[criteria.CriterionResult]
    seconds: float

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.PASSED if all(result.passed for result in self.results) else ExitCode.FAILED


@dataclass
class Plan:
    """A spec that passed every pre-run check, with what it runs on."""

    spec_path: Path
    spec: Spec
    runs_dir: Path
    template: Path
    executor: Executor
    pool: ModelPool
    directions: dict[str, DirectionSet] = field(default_factory=dict)
    """The spec's direction sets, read and checked against the capture model."""
    overrides: tuple[Override, ...] = ()
    """Command-line settings (and a matrix point's values), recorded in the manifest."""
    point: str | None = None
    """The matrix point's id (`name[key=value,...]`); `label` ends the run id (a --tag, a point's values)."""
    label: str | None = None
    table: Table | None = None
    """A local dataset file's records, read and checked at collection (`harness.data_sources`)."""


def collect(spec_path: Path, spec: Spec, runs_dir: Path, use_cache: bool, log: Callable[[str], None],
            overrides: Sequence[Override] = (), point: str | None = None, label: str | None = None) -> Plan:
    """Every check that can fail on the user's input, before anything runs or is written
    (`spec`: loaded from `spec_path` with `overrides` set, as `harness.sweep.expand` does)."""
    template = find_template(spec, spec_path)
    cache_dir = cache_root(runs_dir)
    check_writable_folder(runs_dir, "--runs-dir")
    check_writable_folder(cache_dir, ROOT_VARIABLE)
    executor = Executor(StageCache(cache_dir, use_cache, log), log, Shard.detect())
    pool = ModelPool(spec, spec_path, executor)
    table = read_table(spec.dataset, str(spec_path)) if spec.dataset.read_at_collection else None
    check_models(spec, pool)
    # explicit layers and extra sites need the model's structure (a default spec loads no model here)
    for field, value, check in (("capture.layers", spec.capture.layers, structure.resolve_layers),
                                ("capture.sites", spec.capture.sites, structure.resolve_sites)):
        if value not in ("all", [DEFAULT_SITE]):
            try:
                check(pool.model(spec.capture_model).model, value)
            except ValueError as exc:
                raise InputError(f"{spec_path}: {field}: {exc}") from None
    # their width and layer count must match the capture model's
    directions = load_direction_sets(spec, spec_path, pool.model(spec.capture_model).model) if spec.directions else {}
    n = spec.dataset.n_samples or (f"≤{len(table.records)}" if table else "all")
    executor.header = f"harness {harness.__version__} · {spec_path} · {n} samples · {len(spec.conditions)} conditions"
    return Plan(spec_path, spec, runs_dir, template, executor, pool, directions, tuple(overrides), point, label, table)


def check_models(spec: Spec, pool: ModelPool, tokenizers: bool = False) -> None:
    """The checks that need each model's files or config but not its weights: a missing
    package, file, path or device, and whether each generation fits the model's context;
    with `tokenizers`, each tokenizer loads too (`harness validate --models`)."""
    for alias in sorted(models_used(spec)):
        pool.check(alias)
        if tokenizers:
            pool.check_tokenizer(alias)
    for name, condition in spec.conditions.items():
        source = SOURCES[condition.source]
        if source.check is not None:
            source.check(name, condition, spec, pool)


def models_used(spec: Spec) -> set[str]:
    return {spec.capture_model, *filter(None, [spec.dataset_tokenizer]), *(a for c in spec.conditions.values() for a in c.models(spec))}


def texts_and_measures(plan: Plan) -> tuple[list[dict], dict[str, list[dict]], dict[str, dict]]:
    """The data, conditions and capture stages: the samples, every condition's texts and what capture measured."""
    spec, executor, pool = plan.spec, plan.executor, plan.pool
    samples = executor.run(data.DataStage(spec, plan.spec_path, pool, plan.table))
    settings = capture.CaptureSettings.from_spec(spec, plan.directions)
    decoded: dict[str, list[dict | None]] = {}
    texts = conditions.condition_texts(spec, samples, executor, pool, plan.directions, settings, decoded)
    # with a chat capture model, each text holds the prompt as it reads it (`model_prompt`)
    texts = pool.with_model_prompts(spec.capture_model, texts)
    return samples, texts, decode_capture.measure_conditions(executor, spec, texts, settings, decoded, pool, plan.directions)


def per_sample_table(plan: Plan, measured: dict[str, dict], samples: list[dict]) -> str:
    """per_sample.csv: what the stats stage reads (with the dataset's covariates, if it lists any)."""
    grid = plan.spec.grid
    left_out = grid.held_out_samples({name: direction.built_from or [] for name, direction in plan.directions.items()})
    covariates = [sample["covariates"] for sample in samples] if plan.spec.dataset.covariate_names() else None
    return rundir.per_sample_csv([column.name for column in grid.per_layer_columns()], measured, left_out, covariates)


def execute(plan: Plan, started: float) -> RunOutcome:
    spec, executor = plan.spec, plan.executor
    samples, texts, measured = texts_and_measures(plan)
    if executor.shard.rank != 0:
        return RunOutcome(None, [], time.perf_counter() - started)

    folder = rundir.RunFolder(plan.runs_dir, spec.name, plan.label)
    try:
        with executor.timed("write"):
            rundir.write_spec(folder.path, spec)
            rundir.write_samples(folder.path, samples)
            rundir.write_texts(folder.path, texts, measured)
            table = per_sample_table(plan, measured, samples)
            rundir.write_per_sample(folder.path, table)
            if spec.capture.save_activations:
                rundir.collect_activations({name: executor.cache.folder("capture", executor.keys[f"capture[{name}]"])
                                            / "activations" for name in measured}, folder.path)
        statistics = {name: number(value) for name, value in executor.run(stats.StatsStage(table, spec)).items()}
        rundir.write_stats(folder.path, statistics)
        results = criteria.evaluate_criteria(spec.criteria, statistics)
        rundir.write_criteria(folder.path, criteria.to_json(results))
        manifest = build_manifest(plan, folder.run_id)
        rundir.write_manifest(folder.path, manifest)
        report_stage.publish_report(executor, folder.path, draw_report, plan.template)
        rundir.write_manifest(folder.path, manifest.model_copy(update={"timings": dict(executor.timings)}))
        run_dir = folder.commit()
    except BaseException:
        folder.discard()
        raise
    return RunOutcome(run_dir, results, time.perf_counter() - started)


def draw_report(run_dir: Path, figure_dir: Path) -> dict:
    """The report's figures, diagnostics and context (`report.report_parts`)."""
    from harness.stages.report import report_parts  # pandas, scipy, matplotlib: only when a report is drawn

    return report_parts(run_dir, figure_dir)


def build_manifest(plan: Plan, run_id: str) -> rundir.Manifest:
    """The manifest of a run of `plan`, as its folder `run_id` records it."""
    spec, executor = plan.spec, plan.executor
    absolute, cwd = plan.spec_path.resolve(), Path.cwd().resolve()
    return rundir.Manifest(
        harness_version=harness.__version__,
        spec_name=spec.name,
        spec_file=str(absolute),
        spec_file_in_repo=str(absolute.relative_to(cwd)) if absolute.is_relative_to(cwd) else None,
        spec_hash=content_hash(spec.model_dump(mode="json")),
        run_id=run_id,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        git_commit=rundir.git_commit(),
        packages=rundir.package_versions(),
        models=plan.pool.provenance(),
        processes=executor.shard.world,
        threads=plan.pool.threads,
        seeds={"conditions": {name: c.random_seed() for name, c in spec.conditions.items()}, "bootstrap": spec.stats.seed},
        cache_keys=dict(executor.keys),
        timings=dict(executor.timings),
        cache=dict(executor.reuse),
        directions={name: direction.record() for name, direction in plan.directions.items()},
        overrides=[override.origin for override in plan.overrides],
        point=plan.point,
        interventions={
            name: describe(c.at, c.do, c.during, plan.directions.get(next(iter(c.do.spec.direction_sets()), None)))
            for name, c in spec.conditions.items() if c.source == "intervene"
        },
    )
