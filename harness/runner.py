"""The runner: sequences the stages and caches their outputs; it computes nothing itself.

spec → data → generate → capture (forward + metrics) → stats → criteria → report.
Each stage's output is stored in the content-addressed cache under a key built from exactly
the inputs that determine it, so a rerun, a resumed run or a sibling spec sharing a stage
reuses it. The run folder is assembled under a temporary name and renamed into place at the
end: a failed run leaves no half-written result.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import harness
from harness.stages import capture, data, generate
from harness.artifacts import (
    StageCache,
    compute_units,
    content_hash,
    gather_units,
    read_json,
    write_json,
    write_jsonl,
    write_text,
)
from harness.stages.criteria import CriterionResult, evaluate_criteria, to_json
from harness.errors import InputError, Interrupted
from harness.models import LoadedModel, check_device, load_model, load_tokenizer, model_identity
from harness.schema import Spec
from harness.spec import dump_spec, load_spec
from harness.stages.conditions import SOURCES, GeneratedCondition, ShuffledCondition, execution_order

MANIFEST_PACKAGES = ("torch", "transformers", "accelerate", "numpy", "scipy", "statsmodels", "pandas", "pydantic")


def model_cache_dir() -> Path:
    """Converted model weights are per machine, not per run folder."""
    return Path(os.environ.get("HARNESS_MODEL_CACHE", Path.home() / ".cache" / "harness"))


@dataclass
class Distributed:
    """This process's share of the work under `accelerate launch` (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: str | None = None

    @classmethod
    def detect(cls) -> "Distributed":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))


@dataclass
class RunOutcome:
    run_dir: Path | None
    """None on ranks other than 0, which write nothing."""
    results: list[CriterionResult]
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0 if all(result.passed for result in self.results) else 1


@dataclass
class Run:
    spec_path: Path
    spec: Spec
    cache: StageCache
    log: Callable[[str], None]
    dist: Distributed = field(default_factory=Distributed)
    timings: dict[str, float] = field(default_factory=dict)
    reuse: dict[str, str] = field(default_factory=dict)
    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _tokenizers: dict[str, object] = field(default_factory=dict)
    _identities: dict[str, str] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    texts: dict[str, list[dict]] = field(default_factory=dict)
    header: str = ""
    """Logged with the first stage line: a bad input that the data stage finds prints only its error."""

    # -- models, loaded on first use so a fully cached run loads none -------------------------
    def where(self, alias: str) -> str:
        return f"{self.spec_path}: models.{alias}"

    def _model_spec(self, alias: str):
        model_spec = self.spec.models[alias]
        if self.dist.world > 1 and model_spec.device_map == "auto":
            return model_spec.model_copy(update={"device_map": self.dist.device})
        return model_spec

    def identity(self, alias: str) -> str:
        if alias not in self._identities:
            self._identities[alias] = model_identity(self.spec.models[alias], model_cache_dir(), self.where(alias))
        return self._identities[alias]

    def model(self, alias: str) -> LoadedModel:
        if alias not in self._models:
            with self.stage(f"load[{alias}]"):
                self._models[alias] = load_model(self._model_spec(alias), model_cache_dir(), self.where(alias))
        return self._models[alias]

    def tokenizer(self, alias: str):
        if alias in self._models:
            return self._models[alias].tokenizer
        if alias not in self._tokenizers:
            self._tokenizers[alias] = load_tokenizer(self.spec.models[alias], model_cache_dir(), self.where(alias))
        return self._tokenizers[alias]

    def model_key(self, alias: str) -> dict:
        """What about a model changes its numbers: weights and dtype."""
        return {"identity": self.identity(alias), "dtype": self.spec.models[alias].dtype}

    # -- bookkeeping ------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted during {name}; finished batches are kept in {self.cache.root} — "
                f"run the same command again to resume from there"
            ) from None
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def note(self, name: str, reused: bool, detail: str = "") -> None:
        if self.header:
            self.log(self.header)
            self.header = ""
        self.reuse[name] = "reused" if reused else "computed"
        seconds = self.timings.get(name, 0.0)
        self.log(f"  {name:<28} {self.reuse[name]:<9} {seconds:7.1f}s  {detail}".rstrip())

    # -- stages -----------------------------------------------------------------------------
    def load_samples(self) -> list[dict]:
        alias = self.spec.dataset_tokenizer
        key = content_hash(
            {
                "v": data.STAGE_VERSION,
                # the tokenizer enters by identity, so naming the same model by another alias reuses the stage
                "dataset": self.spec.dataset.model_dump(mode="json", exclude={"tokenizer"}),
                "tokenizer": self.identity(alias),
            }
        )
        with self.stage("data"):
            cached = self.cache.get("data", key)
            reused = cached is not None
            if cached is None:
                rows = data.read_rows(self.spec.dataset, str(self.spec_path))
                samples = data.select_samples(rows, self.tokenizer(alias), self.spec.dataset, str(self.spec_path))
                cached = [sample.to_dict() for sample in samples]
                if self.dist.rank == 0:
                    self.cache.put("data", key, cached)
        self.note("data", reused, f"{len(cached)} samples")
        self.samples = cached
        return cached

    def generate(self, name: str, condition: GeneratedCondition) -> list[dict]:
        samples = self.samples
        (alias,) = condition.models(self.spec)
        prompts = [sample["prompt"] for sample in samples]
        settings = condition.generation
        key = content_hash(
            {
                "v": generate.STAGE_VERSION,
                "prompts": content_hash(prompts),
                "model": self.model_key(alias),
                "generation": settings.model_dump(mode="json"),
                "batch_size": self.spec.runtime.generation_batch_size,
            }
        )
        stage_name = f"generate[{name}]"
        with self.stage(stage_name):
            result = self.cache.get("generate", key)
            reused, resumed, how = result is not None, 0, ""
            if result is None:
                loaded = self.model(alias)
                lengths = [len(loaded.tokenizer(prompt)["input_ids"]) for prompt in prompts]
                batch_size = self.spec.runtime.generation_batch_size
                if batch_size == "auto":
                    batch_size = generate.auto_batch_size(
                        loaded.model, loaded.input_device, lengths, settings.max_new_tokens, self.spec.runtime.compile
                    )
                units = generate.plan_batches(lengths, batch_size)
                report = generate.GenerationReport()

                def run_unit(unit: list[int]) -> list[dict]:
                    return generate.generate_batch(
                        loaded.model, loaded.tokenizer, loaded.input_device, [prompts[i] for i in unit],
                        settings, seed=settings.seed * 1_000_003 + unit[0], compile=self.spec.runtime.compile, report=report,
                    )

                result, resumed = self._run_units("generate", key, stage_name, units, run_unit)
                if self.dist.rank == 0:
                    self.cache.put("generate", key, result)
                how = f", batches of {batch_size}, {report.summary()}"
        self.note(stage_name, reused, f"{alias}, {len(result)} continuations{self._resumed(resumed)}{how}")
        return [
            {"prompt": sample["prompt"], "response": out["response"], "stopped_early": out["stopped_early"], "generator": alias}
            for sample, out in zip(samples, result)
        ]

    def condition_texts(self) -> dict[str, list[dict]]:
        """Prompt and response of every sample, per condition (derived conditions after their sources)."""
        self.texts = {}
        for name in execution_order(self.spec.conditions):
            condition = self.spec.conditions[name]
            self.texts[name] = SOURCES[condition.source].texts(name, condition, self)
        return {name: self.texts[name] for name in self.spec.conditions}

    def response_limits(self, texts: dict[str, list[dict]]) -> dict[str, list[int | None]]:
        """Per condition and sample, the response token cap (length matching) or None."""
        n_samples = len(next(iter(texts.values())))
        if not self.spec.capture.length_matching:
            return {name: [None] * n_samples for name in texts}
        tokenizer = self.tokenizer(self.spec.capture_model)
        lengths = {
            name: [
                (lambda t: len(t.input_ids) - t.response_start)(
                    capture.tokenize_for_capture(tokenizer, capture.TextToMeasure(text["prompt"], text["response"]))
                )
                for text in rows
            ]
            for name, rows in texts.items()
        }
        shortest = [min(lengths[name][i] for name in texts) for i in range(n_samples)]
        return {name: shortest for name in texts}

    def measured(self, name: str, rows: list[dict], limits: list[int | None]) -> list[dict]:
        alias = self.spec.capture_model
        to_measure = [capture.TextToMeasure(r["prompt"], r["response"], limit) for r, limit in zip(rows, limits)]
        settings = self.spec.capture
        key = content_hash(
            {
                "v": capture.STAGE_VERSION,
                "texts": content_hash([[t.prompt, t.response, t.max_response_tokens] for t in to_measure]),
                "model": self.model_key(alias),
                "layers": settings.layers,
                "metrics": self.spec.metrics,
                "token_budget": self.spec.runtime.token_budget,
                "activations": settings.save_activations,
            }
        )
        stage_name = f"capture[{name}]"
        with self.stage(stage_name):
            result = self.cache.get("capture", key)
            reused, resumed = result is not None, 0
            if result is None:
                loaded = self.model(alias)
                tokenized = [capture.tokenize_for_capture(loaded.tokenizer, text) for text in to_measure]
                layers = capture.resolve_layers(loaded.model, settings.layers)
                lengths = [len(t.input_ids) for t in tokenized]
                budget = self.spec.runtime.token_budget
                if budget == "auto":
                    budget = capture.auto_token_budget(loaded.model, loaded.input_device, max(lengths))
                units = capture.plan_batches(lengths, budget)

                def run_unit(unit: list[int]) -> list[dict]:
                    records = capture.measure_batch(
                        loaded.model, loaded.input_device, loaded.tokenizer.pad_token_id,
                        [tokenized[i] for i in unit], layers, self.spec.metrics,
                        capture.report_layers(layers), settings.save_activations,
                    )
                    if settings.save_activations:
                        self._save_activations(key, unit, records)
                    for record in records:
                        record["tokens"] = [loaded.tokenizer.decode([token]) for token in record.pop("response_ids")]
                    return records

                records, resumed = self._run_units("capture", key, stage_name, units, run_unit)
                result = {"layers": layers, "records": records}
                if self.dist.rank == 0:
                    self.cache.put("capture", key, result)
        self.note(stage_name, reused, f"{len(rows)} texts{self._resumed(resumed)}")
        result["key"] = key
        return result

    def statistics(self, per_sample: Path) -> dict[str, float]:
        """Every statistic of the per-sample table (see `harness.stages.stats`)."""
        from harness.stages import stats

        key = content_hash(
            {
                "v": stats.STAGE_VERSION,
                "table": content_hash(per_sample.read_text(encoding="utf-8")),
                "comparisons": {name: c.model_dump(mode="json") for name, c in self.spec.comparisons.items()},
                "stats": self.spec.stats.model_dump(mode="json"),
            }
        )
        with self.stage("stats"):
            cached = self.cache.get("stats", key)
            if cached is None:
                result = stats.compute_stats(stats.load_table(per_sample), self.spec)
                # JSON has no NaN or infinity: the cache keeps those as "nan" / "inf" strings
                self.cache.put("stats", key, {k: v if math.isfinite(v) else str(v) for k, v in result.items()})
            else:
                result = {k: float(v) for k, v in cached.items()}
        self.note("stats", cached is not None, f"{len(result)} statistics")
        return result

    def _run_units(
        self, stage: str, key: str, label: str, units: list[list[int]], compute: Callable[[list[int]], list[dict]]
    ) -> tuple[list[dict], int]:
        """This process's share of a chunked stage, then every item in input order (and units resumed).

        The unit plan is stored with the units: a resumed run keeps the batches it started with
        (an `auto` token budget may come out differently), so its numbers match an uninterrupted run.
        """
        plan = self.cache.folder(stage, key) / "plan.json"
        if self.cache.enabled and plan.is_file():
            units = read_json(plan)
        elif self.dist.rank == 0:
            write_json(plan, units)
        resumed = compute_units(
            self.cache, stage, key, units,
            lambda unit: [{"index": i, **item} for i, item in zip(unit, compute(unit))],
            self.dist.rank, self.dist.world, self._progress(label, len(units)),
        )
        self.dist.barrier()
        by_index = {item.pop("index"): item for item in gather_units(self.cache, stage, key, len(units))}
        return [by_index[i] for i in range(len(by_index))], resumed

    @staticmethod
    def _resumed(units: int) -> str:
        return f" ({units} batches resumed from an earlier, interrupted run)" if units else ""

    def _save_activations(self, key: str, unit: list[int], records: list[dict]) -> None:
        from safetensors.torch import save_file

        tensors = {str(i): record.pop("activations").contiguous() for i, record in zip(unit, records)}
        folder = self.cache.folder("capture", key) / "activations"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".unit-{unit[0]:05d}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / f"unit-{unit[0]:05d}.safetensors")

    def _progress(self, stage_name: str, total: int) -> Callable[[], None]:
        done = [0]

        def tick() -> None:
            done[0] += 1
            if total > 1 and sys.stderr.isatty():
                print(f"\r  {stage_name:<28} {done[0]}/{total} batches", end="", file=sys.stderr, flush=True)
                if done[0] == total:
                    print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)

        return tick


def per_sample_csv(spec: Spec, measured: dict[str, dict]) -> str:
    """Tidy long form: sample_id,condition,layer,metric,value (layer empty for per-text metrics).

    Metrics undefined for a text (fewer than two response tokens) are left out.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sample_id", "condition", "layer", "metric", "value"])
    for condition, result in measured.items():
        for sample_id, record in enumerate(result["records"]):
            for metric, value in record["text_metrics"].items():
                writer.writerow([sample_id, condition, "", metric, repr(value)])
            if record["n_response_tokens"] < 2:
                continue
            for metric in spec.metrics:
                for layer, value in zip(result["layers"], record["layer_metrics"][metric]):
                    writer.writerow([sample_id, condition, layer, metric, repr(value)])
    return out.getvalue()


def texts_jsonl(texts: dict[str, list[dict]], measured: dict[str, dict]) -> list[dict]:
    return [
        {"sample_id": sample_id, "condition": condition, **text,
         "n_response_tokens": measured[condition]["records"][sample_id]["n_response_tokens"]}
        for condition, rows in texts.items()
        for sample_id, text in enumerate(rows)
    ]


def token_deltas_jsonl(measured: dict[str, dict]) -> list[dict]:
    return [
        {"sample_id": sample_id, "condition": condition, "layer": int(layer), "tokens": record["tokens"], "norms": norms}
        for condition, result in measured.items()
        for sample_id, record in enumerate(result["records"])
        for layer, norms in record["deltas"].items()
    ]


def git_commit() -> str | None:
    try:
        root = Path(harness.__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {"harness": harness.__version__, "python": platform.python_version()}
    for name in MANIFEST_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def new_run_dir(runs_dir: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = runs_dir / name / stamp, 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_dir / name / f"{stamp}-{suffix}"
    return run_dir


def run_spec(
    spec_path: Path,
    runs_dir: Path = Path("runs"),
    use_cache: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> RunOutcome:
    """Run one spec end to end; returns the criteria results and the run folder."""
    from harness.stages import report

    started = time.perf_counter()
    spec = load_spec(spec_path)
    cache_root = Path(os.environ.get("HARNESS_CACHE_DIR", runs_dir / ".cache"))
    report.find_template(spec, spec_path)  # a missing template fails now, not after the compute
    run = Run(spec_path, spec, StageCache(cache_root, enabled=use_cache), log, Distributed.detect())
    for alias in {spec.capture_model, spec.dataset_tokenizer, *(
        alias for condition in spec.conditions.values() for alias in condition.models(spec)
    )}:
        run.identity(alias)  # fails fast on a missing package, file or path
        check_device(spec.models[alias], run.where(alias))
    if spec.capture.layers != "all":  # checked before any stage writes to the cache
        try:
            capture.resolve_layers(run.model(spec.capture_model).model, spec.capture.layers)
        except ValueError as exc:
            raise InputError(f"{spec_path}: capture.layers: {exc}") from None
    run.header = f"harness {harness.__version__} · {spec_path} · {spec.dataset.n_samples} samples · {len(spec.conditions)} conditions"

    run.load_samples()
    texts = run.condition_texts()
    limits = run.response_limits(texts)
    measured = {name: run.measured(name, rows, limits[name]) for name, rows in texts.items()}
    if run.dist.rank != 0:
        return RunOutcome(None, [], time.perf_counter() - started)

    final_dir = new_run_dir(runs_dir, spec.name)
    staging = final_dir.parent / f".{final_dir.name}.partial"
    try:
        with run.stage("write"):
            write_text(staging / "spec.yaml", dump_spec(spec))
            write_jsonl(staging / "texts.jsonl", texts_jsonl(texts, measured))
            write_text(staging / "per_sample.csv", per_sample_csv(spec, measured))
            write_jsonl(staging / "token_deltas.jsonl", token_deltas_jsonl(measured))
            if spec.capture.save_activations:
                _collect_activations(run.cache, measured, staging / "activations")
        statistics = run.statistics(staging / "per_sample.csv")
        write_json(staging / "stats.json", statistics)
        results = evaluate_criteria(spec.criteria, statistics)
        write_json(staging / "criteria.json", to_json(results))
        manifest = {
            "harness_version": harness.__version__,
            "spec_name": spec.name,
            "spec_file": str(spec_path),
            "spec_hash": content_hash(spec.model_dump(mode="json")),
            "run_id": final_dir.name,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "packages": package_versions(),
            "models": {alias: loaded.source for alias, loaded in run._models.items()},
            "model_identities": dict(run._identities),
            "device": {alias: str(loaded.input_device) for alias, loaded in run._models.items()},
            "processes": run.dist.world,
            "seeds": {
                "generation": {n: c.generation.seed for n, c in spec.conditions.items() if isinstance(c, GeneratedCondition)},
                "shuffle": {n: c.seed for n, c in spec.conditions.items() if isinstance(c, ShuffledCondition)},
                "bootstrap": spec.stats.seed,
            },
            "cache_keys": {name: result["key"] for name, result in measured.items()},
            "timings": run.timings,
            "cache": run.reuse,
        }
        write_json(staging / "manifest.json", manifest)
        with run.stage("report"):
            report.render_report(staging)
        run.note("report", False, "RESULTS.md")
        manifest["timings"] = run.timings
        write_json(staging / "manifest.json", manifest)
        os.replace(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RunOutcome(final_dir, results, time.perf_counter() - started)


def _collect_activations(cache: StageCache, measured: dict[str, dict], folder: Path) -> None:
    """One safetensors file per condition: key = sample id, value = [layers, response tokens, d]."""
    from safetensors.torch import load_file, save_file

    for condition, result in measured.items():
        tensors = {}
        for unit_file in sorted((cache.folder("capture", result["key"]) / "activations").glob("unit-*.safetensors")):
            tensors.update(load_file(str(unit_file)))
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / f"{condition}.safetensors"))
