"""The run folder, ``runs/<spec name>/<run id>/``: every file a run writes and how to read it back.

A run is assembled in a hidden staging folder, ``.<run id>.partial``, created with an
exclusive ``mkdir`` (so its name also reserves the run id, even for two runs started in the
same second) and renamed into place when the run finished: a run folder that exists is
complete. A staging folder whose process is gone (SIGKILL, power cut) is removed by the next
run of a spec with that name.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

import harness
from harness.artifacts import number, read_jsonl, write_json, write_jsonl, write_text
from harness.base import StrictModel
from harness.errors import InputError, quoted
from harness.inputs import read_json, read_text
from harness.schema import Spec
from harness.spec import dump_spec
from harness.stages.stats import load_table

FORMAT_VERSION = 1
"""Version of the run-folder format (the manifest's `format_version`)."""

STALE_STAGING_SECONDS = 60
"""A staging folder without an owner file is only removed once it is this old (its owner may
be between `mkdir` and writing the file)."""

OWNER_FILE = ".owner-pid"

MANIFEST_PACKAGES = ("torch", "transformers", "accelerate", "numpy", "scipy", "statsmodels", "pandas", "pydantic")


class ModelRecord(StrictModel):
    """One model the run used."""

    identity: str
    """Names the weights in cache keys: file hashes or the hub commit."""
    source: dict[str, Any]
    """Where the weights came from (hub id and commit, local path and hash, or GGUF package and file)."""
    device: str | None
    """Where its inputs went, or None when the run reused every stage of this model."""


class Manifest(StrictModel):
    """manifest.json: what ran, on what, and how long each stage took."""

    format_version: int = FORMAT_VERSION
    harness_version: str
    spec_name: str
    spec_file: str
    """The spec's absolute path."""
    spec_file_in_repo: str | None
    """The spec's path relative to the working directory, when it lies below it."""
    spec_hash: str
    """Hash of the resolved spec."""
    run_id: str
    started: str
    """UTC, ISO 8601."""
    git_commit: str | None
    packages: dict[str, str | None]
    models: dict[str, ModelRecord]
    processes: int
    """Processes that shared the work (`accelerate launch`)."""
    threads: int | None = None
    """CPU threads torch computed with in each process (`runtime.threads`)."""
    seeds: dict[str, Any]
    cache_keys: dict[str, str]
    """Per stage, the key of its entry in the stage cache."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per stage."""
    cache: dict[str, str] = Field(default_factory=dict)
    """Per stage: computed or reused."""
    directions: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per direction set: its file, tensor key, sha256, shape and the file's metadata (for a
    file written by `harness directions`: the run, conditions and samples that built it)."""
    overrides: list[str] = Field(default_factory=list)
    """Settings from the command line (`--set`, `--limit`, `--device`) and a matrix point's
    values, as written, in the order they were applied."""
    point: str | None = None
    """The matrix point this run is (`name[key=value,...]`), or None."""
    interventions: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per `intervene` condition: its site, layers, positions, what it does (`do`), when
    (`during`) and its direction set's file and sha256."""


# --- writing ---------------------------------------------------------------------------------


class RunFolder:
    """A run folder being assembled: `path` to write into, then `commit` or `discard`."""

    def __init__(self, runs_dir: Path, spec_name: str, label: str | None = None):
        self.parent = Path(runs_dir) / spec_name
        self.made_parent = not self.parent.exists()
        self.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.parent)
        stamp, suffix = datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else ""), 1
        while True:
            self.run_id = stamp if suffix == 1 else f"{stamp}-{suffix}"
            self.path = self.parent / f".{self.run_id}.partial"
            try:
                self.path.mkdir()
            except FileExistsError:
                suffix += 1
                continue
            if not (self.parent / self.run_id).exists():  # checked after mkdir: see the module doc
                break
            self.path.rmdir()
            suffix += 1
        (self.path / OWNER_FILE).write_text(str(os.getpid()))

    def commit(self) -> Path:
        (self.path / OWNER_FILE).unlink()
        final = self.parent / self.run_id
        os.rename(self.path, final)
        return final

    def discard(self) -> None:
        """Remove the staging folder, and `runs/<name>/` when this run made it and it is empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.made_parent:
            with contextlib.suppress(OSError):  # another run's folder is in it now
                self.parent.rmdir()


def remove_stale_staging(parent: Path) -> None:
    """Remove staging folders whose process no longer runs."""
    for folder in parent.glob(".*.partial"):
        owner = folder / OWNER_FILE
        try:
            pid = int(owner.read_text())
            alive = _process_alive(pid)
        except (OSError, ValueError):
            alive = time.time() - folder.stat().st_mtime < STALE_STAGING_SECONDS
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def per_sample_csv(metrics: list[str], measured: dict[str, dict], left_out: dict[str, set[int]] | None = None,
                   covariates: list[dict[str, Any]] | None = None) -> str:
    """Tidy long form: sample_id,condition,layer,metric,value (layer empty for per-text metrics).

    Metrics undefined for a text (NaN: fewer than two response tokens, say) are left out, and
    so are the samples `left_out` names per metric (those that built a held-out direction).
    `covariates` (per sample, the dataset's `covariates:` columns) add a column each, repeated
    on every row of the sample.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = list(covariates[0]) if covariates else []
    writer.writerow(["sample_id", "condition", "layer", "metric", "value", *names])

    def row(sample_id: int, condition: str, layer: int | str, metric: str, value: Any) -> None:
        value = number(value)
        if value is not None and not math.isnan(value):
            extra = [covariates[sample_id].get(name) for name in names] if names else []
            writer.writerow([sample_id, condition, layer, metric, repr(value), *extra])

    for condition, result in measured.items():
        for sample_id, record in enumerate(result["records"]):
            for metric, value in record["text_metrics"].items():
                row(sample_id, condition, "", metric, value)
            if record["n_response_tokens"] < 2:
                continue
            for metric in metrics:
                if sample_id in (left_out or {}).get(metric, ()):
                    continue
                for layer, value in zip(result["layers"], record["layer_metrics"][metric]):
                    row(sample_id, condition, layer, metric, value)
    return out.getvalue()


def write_per_sample(folder: Path, table_csv: str) -> None:
    write_text(folder / "per_sample.csv", table_csv)


SAMPLES_FILE = "samples.jsonl"


def write_samples(folder: Path, samples: list[dict]) -> None:
    """samples.jsonl: which samples the run used (the dataset's id and row, the prompt, the
    counted length, the covariates): what a sweep compares to say whether its points share them."""
    write_jsonl(folder / SAMPLES_FILE, [
        {key: sample[key] for key in ("sample_id", "id", "row", "prompt", "length", "covariates")} for sample in samples
    ])


def write_texts(folder: Path, texts: dict[str, list[dict]], measured: dict[str, dict]) -> None:
    """texts.jsonl (every condition's texts, with the response tokens measured) and
    token_deltas.jsonl (per-token delta norms)."""
    write_jsonl(folder / "texts.jsonl", [
        {"sample_id": sample_id, "condition": condition, **text,
         "n_response_tokens": measured[condition]["records"][sample_id]["n_response_tokens"],
         "tokens": measured[condition]["records"][sample_id]["tokens"],
         "measured_by": measured[condition]["records"][sample_id]["measured_by"]}
        for condition, rows in texts.items()
        for sample_id, text in enumerate(rows)
    ])
    write_jsonl(folder / "token_deltas.jsonl", [
        {"sample_id": sample_id, "condition": condition, "layer": int(layer), "tokens": record["tokens"], "norms": norms}
        for condition, result in measured.items()
        for sample_id, record in enumerate(result["records"])
        for layer, norms in record["deltas"].items()
    ])


def write_spec(folder: Path, spec: Spec) -> None:
    write_text(folder / "spec.yaml", dump_spec(spec))


def collect_activations(activation_folders: dict[str, Path], folder: Path) -> None:
    """activations/<condition>.safetensors: key = sample id, value = [layers, response tokens, d]."""
    from safetensors.torch import load_file, save_file

    for condition, source in activation_folders.items():
        tensors = {}
        for unit_file in sorted(source.glob("unit-*.safetensors")):
            tensors.update(load_file(str(unit_file)))
        (folder / "activations").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "activations" / f"{condition}.safetensors"))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json(folder / "manifest.json", manifest.model_dump(mode="json"))


def write_stats(folder: Path, statistics: dict[str, float]) -> None:
    write_json(folder / "stats.json", statistics)


def write_criteria(folder: Path, rows: list[dict]) -> None:
    """criteria.json: per criterion name, expr, passed, values (None: not computed), error."""
    write_json(folder / "criteria.json", rows)


def write_report(folder: Path, diagnostics: dict, markdown: str) -> Path:
    """diagnostics.json and RESULTS.md (the figures are written beside them by the report stage)."""
    write_json(folder / "diagnostics.json", diagnostics)
    write_text(folder / "RESULTS.md", markdown)
    return folder / "RESULTS.md"


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


# --- reading ---------------------------------------------------------------------------------


def read_stats(run_dir: Path) -> dict[str, float | None]:
    """stats.json: name → value (NaN and ±inf read back as floats); a file that is not a mapping
    of numbers is one InputError line naming it (and the statistic)."""
    path = Path(run_dir) / "stats.json"
    return _numbers(read_json(path, expect=dict), f"{path}: ")


def _numbers(values: dict, where: str) -> dict[str, float | None]:
    """name → number(value); a value that is not a number, null, "nan" or "±inf" is an InputError."""
    out = {}
    for name, value in values.items():
        try:
            if isinstance(value, (bool, list, dict)):
                raise TypeError
            out[name] = number(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}{quoted(name)}: {quoted(str(value))} is not a number") from None
    return out


CRITERION_KEYS = ("name", "passed", "values")
"""The keys every criteria.json row has (and `expr`, `error`)."""


def read_criteria(run_dir: Path) -> list[dict]:
    """criteria.json rows: name, expr, passed, values (floats or None), error; a malformed file
    is one InputError line naming it (and the row)."""
    path = Path(run_dir) / "criteria.json"
    rows = read_json(path, expect=list)
    for index, row in enumerate(rows):
        missing = [key for key in CRITERION_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise InputError(f"{path}: row {index}: no {', '.join(missing)}")
        if not isinstance(row["values"], dict) or not isinstance(row["name"], str):
            raise InputError(f"{path}: row {index}: 'name' must be a string and 'values' a mapping")
    return [{**row, "values": _numbers(row["values"], f"{path}: row {index}: values: ")} for index, row in enumerate(rows)]


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "stats.json").is_file() and (Path(path) / "criteria.json").is_file()


def enclosing_run_folder(path: Path) -> Path | None:
    """The run, sweep or staging folder that `path` (symlinks followed) lies in, if any."""
    from harness.sweep import SWEEP_FILE

    markers = ("stats.json", "criteria.json", "manifest.json", SWEEP_FILE, OWNER_FILE)
    resolved = Path(path).resolve()
    return next((folder for folder in resolved.parents if any((folder / marker).exists() for marker in markers)), None)


@dataclass(frozen=True)
class RunRecord:
    """The contents of a finished run folder."""

    spec: Spec
    manifest: dict
    texts: list[dict]
    table: Any
    """per_sample.csv as a pandas DataFrame (see `harness.stages.stats.load_table`)."""
    token_deltas: list[dict]
    stats: dict[str, float | None]
    criteria: list[dict]

    def stat(self, name: str) -> float:
        """A statistic, NaN when absent or null (so templates and comparisons need no special case)."""
        value = self.stats.get(name)
        return float("nan") if value is None else value

    @functools.cached_property
    def layers(self) -> list[int]:
        """Captured layers of the studied trajectory metric, in order."""
        rows = self.table[self.table["metric"] == self.spec.stats.correlate[1]]
        return sorted(int(layer) for layer in rows["layer"].dropna().unique())


def load_run(run_dir: Path) -> RunRecord:

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: not a finished run folder (no stats.json / criteria.json)")
    deltas_file = run_dir / "token_deltas.jsonl"
    return RunRecord(
        spec=Spec.model_validate(yaml.safe_load(read_text(run_dir / "spec.yaml", "spec"))),
        manifest=read_json(run_dir / "manifest.json", expect=dict),
        texts=read_jsonl(run_dir / "texts.jsonl"),
        table=load_table(run_dir / "per_sample.csv"),
        token_deltas=read_jsonl(deltas_file) if deltas_file.is_file() else [],
        stats=read_stats(run_dir),
        criteria=read_criteria(run_dir),
    )
