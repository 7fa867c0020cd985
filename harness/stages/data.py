"""Data stage: the dataset source's records, filtered by length, the first `n_samples` kept.

Where records come from is the data source's (`harness.data_sources`: WikiText-2, a JSONL,
CSV or Parquet file, a hub dataset). A local file is read at collection and handed to this
stage with the sha256 of the bytes read, which enters the cache key; the packaged WikiText
split and the hub are read here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from harness.data_sources import DatasetSpec, LengthUnit, Record, Table, read_table
from harness.errors import InputError
from harness.executor import Stage
from harness.schema import Spec

if TYPE_CHECKING:
    from harness.pool import ModelPool

STAGE_VERSION = 1
"""Part of every cache key of this stage: bump it when a change here alters the samples."""
MIN_SAMPLES = 3
"""Paired statistics need three samples."""


@dataclass(frozen=True)
class Sample:
    """One sample: the prompt every condition starts from, the dataset's responses, covariates."""

    sample_id: int
    """Position among the kept samples (0-based): what per_sample.csv pairs on."""
    row: int
    """Row of the source file / split it came from."""
    id: str
    """The dataset's id of it (`columns.id`; WikiText: the row)."""
    prompt: str
    responses: dict[str, str]
    """Response texts by the harness's names (WikiText: `human`, the rest of the paragraph)."""
    covariates: dict[str, Any] = field(default_factory=dict)
    length: int | None = None
    """What the length filter counted (`dataset.length_unit`), or None (no filter)."""

    def to_dict(self) -> dict:
        return asdict(self)


def measured_text(record: Record) -> str:
    """What the length filter counts: the prompt, a space and the first response (WikiText:
    the paragraph as it was before the split), or the prompt alone."""
    first = next(iter(record.responses.values()), None)
    return record.prompt if first is None else f"{record.prompt} {first}"


def length(text: str, unit: LengthUnit, tokenizer) -> int:
    if unit == "words":
        return len(text.split())
    if unit == "characters":
        return len(text)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def select_samples(records: Iterable[Record], tokenizer, dataset: DatasetSpec, where: str) -> list[Sample]:
    """The first `n_samples` records (every one without it) whose length lies in [min_tokens, max_tokens]."""
    low, high = dataset.min_tokens or 0, dataset.max_tokens
    samples: list[Sample] = []
    for record in records:
        size = None
        if dataset.filters_length:
            size = length(measured_text(record), dataset.length_unit, tokenizer)
            if size < low or (high is not None and size > high):
                continue
        samples.append(Sample(len(samples), record.row, record.id, record.prompt, record.responses, record.covariates, size))
        if len(samples) == dataset.n_samples:
            return samples
    if dataset.n_samples is None and len(samples) >= MIN_SAMPLES:
        return samples
    what = "paragraphs" if dataset.source == "wikitext" else "rows"
    bounds = f" have {low}-{high if high is not None else '∞'} {dataset.length_unit}" if dataset.filters_length else ""
    bounds += " and a first sentence" if dataset.source == "wikitext" else ""
    asked = dataset.n_samples or f"at least {MIN_SAMPLES} (paired statistics)"
    raise InputError(f"{where}: dataset.n_samples: only {len(samples)} {what}{bounds}, {asked} asked for")


@dataclass
class DataStage(Stage):
    """The samples: the first `n_samples` records of the dataset that pass its length filter."""

    spec: Spec
    spec_path: Path
    pool: ModelPool
    table: Table | None = None
    """A local file's records, read at collection (None: the source reads them here)."""
    name = kind = "data"
    version = STAGE_VERSION

    @property
    def alias(self) -> str | None:
        return self.spec.dataset_tokenizer

    def inputs(self) -> dict:
        # the tokenizer enters by identity, so naming the same model by another alias reuses the stage
        inputs = {"dataset": self.spec.dataset.model_dump(mode="json", exclude={"tokenizer"})}
        if self.alias is not None:
            inputs["tokenizer"] = self.pool.identity(self.alias)
        if self.table is not None:  # the bytes read: a file edited in place must not reuse stale samples
            inputs["file_sha256"] = self.table.sha256
        return inputs

    def compute(self, unit: None, folder: Path) -> list[dict]:
        table = self.table or read_table(self.spec.dataset, str(self.spec_path))
        tokenizer = self.pool.tokenizer(self.alias) if self.alias is not None else None
        samples = select_samples(table.records, tokenizer, self.spec.dataset, str(self.spec_path))
        return [sample.to_dict() for sample in samples]

    def check(self, output: list[dict]) -> str | None:
        wanted = self.spec.dataset.n_samples
        if wanted is not None and len(output) != wanted:
            return f"{len(output)} samples, {wanted} asked for"
        return None

    def describe(self, output: list[dict]) -> str:
        return f"{len(output)} samples"

    def placeholder(self, key: str) -> list[dict]:
        count = self.spec.dataset.n_samples or len(self.table.records if self.table else [])
        names = self.spec.dataset.response_names()
        return [Sample(i, i, str(i), f"{key}:{i}:prompt", {name: f"{key}:{i}:{name}" for name in names}).to_dict()
                for i in range(count)]
