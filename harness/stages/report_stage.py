"""The report as a cached stage.

Its costly part, the figures, diagnostics.json and the template's context (`report.report_parts`),
follows from the run's data alone, so `ReportStage` caches it, keyed by the run folder's data
files and the report's code. RESULTS.md is rendered from that context through the template on
every run (`write_results`): it shows the run's own id and manifest, and a changed template
takes effect at once. A rerun whose data did not change draws nothing (and imports no plotting
library).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from harness.executor import Executor, Stage
from harness.inputs import read_json, read_text
from harness.rundir import write_report
from harness.schema import Spec
from harness.templates import explicit_template, find_template, render_template

STAGE_VERSION = 2  # 2: contexts cached with their NaN numbers as floats (1 spelled them "nan")
RUN_FILES = ("spec.yaml", "per_sample.csv", "stats.json", "criteria.json", "texts.jsonl", "token_deltas.jsonl")
"""What the report reads from the run folder (all but the manifest)."""
HARNESS = Path(__file__).resolve().parent.parent
REPORT_CODE = ("stages/report.py", "plots.py", "diagnostics.py", "statnames.py")
"""The modules that draw and describe the report: their source is part of the key, so an edited
report never comes from the cache (the other stages bump a version instead; the report changes
more often, and wrongly reused it would say something its code no longer does)."""


def _file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@dataclass
class ReportStage(Stage):
    """Figures, diagnostics and the template's context of a run folder's data."""

    run_dir: Path
    build: Callable[[Path, Path], dict]
    """`report.report_parts`: (run folder, folder to draw the figures in) -> the parts."""
    name = "report"
    kind = "report"
    version = STAGE_VERSION

    def inputs(self) -> dict:
        return {
            "run": {name: _file_hash(self.run_dir / name) for name in RUN_FILES},
            "code": {name: _file_hash(HARNESS / name) for name in REPORT_CODE},
        }

    def compute(self, unit: None, folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        return self.build(self.run_dir, folder)

    def describe(self, output: dict) -> str:
        figures = len(output["context"]["figures"])
        return f"RESULTS.md, {figures} figures" if figures else "RESULTS.md"

    def placeholder(self, key: str) -> dict:
        return {"diagnostics": {}, "context": {"figures": [], "key": key}}


def publish_report(executor: Executor, run_dir: Path, build: Callable[[Path, Path], dict], template: Path | None) -> Path:
    """The report stage (computed, or reused from the cache) into `run_dir`: its figures, then
    diagnostics.json and RESULTS.md."""
    parts = executor.run(ReportStage(run_dir, build))
    drawn = executor.cache.folder(ReportStage.kind, executor.keys[ReportStage.name])
    for figure in parts["context"]["figures"]:
        shutil.copyfile(drawn / figure["file"], run_dir / figure["file"])
    return write_results(run_dir, parts, template)


def write_results(run_dir: Path, parts: dict, template: Path | None = None) -> Path:
    """RESULTS.md from the report's `parts` (`report.report_parts`) and the run folder's manifest,
    through the template (`template`, else the spec's), and diagnostics.json."""
    spec = Spec.model_validate(yaml.safe_load(read_text(run_dir / "spec.yaml", "spec")))
    manifest = read_json(run_dir / "manifest.json", expect=dict)
    template_path = explicit_template(Path(template)) if template else find_template(spec, manifest["spec_file"])
    context = parts["context"] | {"run_id": manifest.get("run_id"), "manifest": manifest_context(manifest)}
    return write_report(run_dir, parts["diagnostics"], render_template(template_path, context))


def manifest_context(manifest: dict) -> dict:
    """The manifest fields the report shows (a missing one is None), and per stage its time and cache use."""
    keys = ("harness_version", "spec_file", "spec_hash", "run_id", "started", "git_commit", "models", "packages",
            "overrides", "point")
    timings, cache = manifest.get("timings") or {}, manifest.get("cache") or {}
    stages = [{"stage": stage, "seconds": timings.get(stage), "cache": cache.get(stage)} for stage in {**timings, **cache}]
    return {**{key: manifest.get(key) for key in keys}, "stages": stages}
