"""Data sources: where a run's samples come from (`dataset.source`), as condition sources are:
one registered reader plus its pydantic spec model (its `source` literal is the name a spec uses).

    class TsvDataset(TableDataset):
        source: Literal["tsv"]
        path: str

    @data_source(TsvDataset)
    def tsv(dataset, where) -> Table: ...

Every source gives `Record`s: an id, the prompt, response texts under the harness's names (the
`responses:` map) and covariates. The spec schema's `dataset` union is built from this
registry. A local file is read once, at collection (`harness.inputs`: regular files only, within
its limits, streamed), so a bad file is one line before any stage runs, and the data stage's
cache key holds the sha256 of exactly the bytes read. WikiText and hub datasets are read by the
data stage itself (`Table` None at collection): the packaged copy checks its own sha256.
Imports no torch.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Literal

from pydantic import Field, field_validator, model_validator

from harness.base import IDENTIFIER, StrictModel
from harness.errors import InputError, quoted
from harness.inputs import LIMITS, open_input, read_bytes, size_words
from harness.model_spec import ModelSpec
from harness.registry import Registry

LengthUnit = Literal["tokens", "words", "characters"]
"""See `DatasetSpec.length_unit`."""
FirstSentenceRule = Literal["next", "skip"]
"""See `WikiTextDataset.first_sentence`."""
HUMAN = "human"
"""The WikiText source's response column (the rest of the paragraph): `source: human` reads it."""
COVARIATE_TYPES = (str, int, float, bool, type(None))
"""What a covariate cell may hold: it becomes a column of per_sample.csv."""


@dataclass(frozen=True)
class Record:
    """One sample as its source gives it."""

    row: int
    """0-based data row of the file or split (a JSONL line, a CSV row after the header)."""
    id: str
    """The `columns.id` cell, else the row number."""
    prompt: str
    responses: dict[str, str] = field(default_factory=dict)
    """Response texts by the harness's names (`responses:`; WikiText: `human`)."""
    covariates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """A local file's records, read at collection; `sha256` is of the bytes they came from."""

    records: list[Record]
    sha256: str


class DatasetSpec(StrictModel):
    """Base of every data source's spec model: how many samples, and the length filter."""

    source: str
    n_samples: int | None = Field(None, ge=3, le=10_000)
    """How many samples to keep (the first that pass the length filter, in order); none: every
    row. Paired statistics need 3, and 10,000 catches a mistyped count before any work."""
    min_tokens: int | None = Field(None, ge=1)
    """Shortest sample kept, counted in `length_unit` over the prompt, a space and the first
    response (WikiText: the whole paragraph); none: no lower bound."""
    max_tokens: int | None = Field(None, ge=1)
    """Longest sample kept (as `min_tokens`); none: no upper bound."""
    length_unit: LengthUnit = "tokens"
    """What `min_tokens`/`max_tokens` count: tokens of `tokenizer`, whitespace-separated words,
    or characters (the last two need no tokenizer, and are the same for every model)."""
    tokenizer: str | ModelSpec | None = None
    """Whose tokens count: a model alias of the run, or a model spec of its own (`{id: ...,
    gguf: ...}`; only its tokenizer is loaded), so every point of a sweep over models keeps
    the same samples. Default: the capture model."""

    @model_validator(mode="after")
    def _length_range(self) -> "DatasetSpec":
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens})")
        return self

    @property
    def filters_length(self) -> bool:
        return self.min_tokens is not None or self.max_tokens is not None

    def response_names(self) -> list[str]:
        """The response columns a `source: column` condition may name."""
        return []

    def covariate_names(self) -> list[str]:
        return []

    @property
    def read_at_collection(self) -> bool:
        """A local file is read (and checked) before any stage; the hub and the packaged copy
        are read by the data stage, and so not at all by a cached run."""
        return False

    @property
    def reads_hub(self) -> bool:
        """Whether reading it needs the Hugging Face hub."""
        return False


class WikiTextDataset(DatasetSpec):
    """WikiText-2 paragraphs split at their first sentence: the prompt and the `human` response."""

    source: Literal["wikitext"] = "wikitext"
    path: str | None = None
    """Raw text file, one row per line, used instead of the split below. A relative path is
    relative to the folder of the spec file that names it (the loader resolves it)."""
    hub_name: str = "wikitext"
    """Without `path`: `wikitext`/`wikitext-2-raw-v1`/`test` is read from the copy shipped with
    the package; anything else from `datasets.load_dataset(hub_name, hub_config, split=split)`."""
    hub_config: str = "wikitext-2-raw-v1"
    split: str = "test"
    first_sentence: FirstSentenceRule = "next"
    """A paragraph whose first ". " comes before character 11 ("Dr. No is ..."): end the prompt
    at the next ". " (`next`) or skip the paragraph (`skip`, the reference's rule)."""
    detokenize: bool = False
    """Undo WikiText's tokenization (` @-@ `, ` , `) on the human text before splitting."""
    n_samples: int | None = Field(50, ge=3, le=10_000)
    min_tokens: int | None = Field(80, ge=1)
    max_tokens: int | None = Field(120, ge=1)

    def response_names(self) -> list[str]:
        return [HUMAN]

    @property
    def read_at_collection(self) -> bool:
        return self.path is not None

    @property
    def reads_hub(self) -> bool:
        return self.path is None and (self.hub_name, self.hub_config, self.split) != PACKAGED_SPLIT


class ColumnMap(StrictModel):
    """The harness's names -> the file's column names."""

    id: str | None = None
    """Column of unique sample ids (strings or integers); default: the row number."""
    prompt: str = "prompt"
    """Column of the prompts every condition starts from."""


class TableDataset(DatasetSpec):
    """A table of prompts and responses (a file, or a hub dataset)."""

    columns: ColumnMap = ColumnMap()
    responses: dict[str, str] = {}
    """Response name (what `source: column` conditions name) -> the file's column."""
    covariates: list[str] = []
    """Further columns carried into per_sample.csv (one column each, per sample)."""

    @field_validator("responses")
    @classmethod
    def _response_names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name in value:
            if not re.fullmatch(IDENTIFIER, name):
                raise ValueError(f"name {quoted(name)} must be an identifier (letters, digits, _)")
        return value

    @model_validator(mode="after")
    def _distinct_columns(self) -> "TableDataset":
        named = [self.columns.prompt, *self.responses.values(), *self.covariates] + ([self.columns.id] if self.columns.id else [])
        twice = next((column for column in named if named.count(column) > 1), None)
        if twice is not None:
            raise ValueError(f"column {quoted(twice)} is named twice (columns, responses, covariates)")
        return self

    def response_names(self) -> list[str]:
        return list(self.responses)

    def covariate_names(self) -> list[str]:
        return list(self.covariates)


class FileDataset(TableDataset):
    path: str
    """The file; a relative path is relative to the folder of the spec file that names it."""

    @property
    def read_at_collection(self) -> bool:
        return True


class JsonlDataset(FileDataset):
    """One JSON object per line."""

    source: Literal["jsonl"]


class CsvDataset(FileDataset):
    """A CSV file with a header row (RFC 4180 quoting; every cell is text)."""

    source: Literal["csv"]


class ParquetDataset(FileDataset):
    """A Parquet file (read through pyarrow)."""

    source: Literal["parquet"]


class HubRef(StrictModel):
    """A dataset on the Hugging Face hub, loaded through `datasets.load_dataset`."""

    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    """Branch, tag or commit to pin."""


class HubDataset(TableDataset):
    """A hub dataset's split, read by the data stage (and cached by `datasets`)."""

    source: Literal["hub"]
    hub: HubRef

    @property
    def reads_hub(self) -> bool:
        return True


@dataclass(frozen=True)
class DataSource:
    spec_model: type[DatasetSpec]
    read: Callable[[Any, str], Table]
    """`read(dataset, where)`: its records (`where`: the spec file, for error lines)."""


DATA_SOURCES: Registry[DataSource] = Registry("data source")
"""Registered data sources by the name a spec's `dataset.source` uses."""


def data_source(spec_model: type[DatasetSpec]):
    """Register `read(dataset, where) -> Table` for `spec_model`'s `source` literal."""
    (name,) = spec_model.model_fields["source"].annotation.__args__

    def register(read: Callable[[Any, str], Table]):
        DATA_SOURCES.add(name, DataSource(spec_model, read), read.__module__)
        return read

    return register


def with_default_source(data: Any) -> Any:
    """A `dataset:` without `source:` is the WikiText source (as every spec before sources was)."""
    if isinstance(data, dict) and "source" not in data:
        return {**data, "source": "wikitext"}
    return data


def read_table(dataset: DatasetSpec, where: str) -> Table:
    """The dataset's records, as its source reads them (`where`: the spec file)."""
    return DATA_SOURCES[dataset.source].read(dataset, where)


def file_where(where: str, path: str) -> str:
    """How an error line names a dataset file: the spec, the field, the file."""
    return f"{where}: dataset.path: {path}"


# --- turning a file's rows into records ------------------------------------------------------


def _cell_name(dataset: TableDataset) -> dict[str, str]:
    """The file's column -> how the spec names it (for error lines)."""
    names = {dataset.columns.prompt: "columns.prompt"}
    if dataset.columns.id:
        names[dataset.columns.id] = "columns.id"
    names |= {column: f"responses.{name}" for name, column in dataset.responses.items()}
    names |= {column: "covariates" for column in dataset.covariates}
    return names


def records_from_rows(rows: Iterable[tuple[str, dict[str, Any]]], dataset: TableDataset, where: str) -> list[Record]:
    """Records of `(place, row)` pairs (`place`: "line 5", "row 3"): every named column present,
    prompts and responses strings, covariates scalars, ids unique; the file empty is an error too."""
    columns = _cell_name(dataset)
    records: list[Record] = []
    seen: dict[str, str] = {}
    for index, (place, row) in enumerate(rows):
        for column, named in columns.items():
            if column not in row:
                known = ", ".join(map(repr, list(row)[:10]))
                raise InputError(f"{where}: {place}: no column {column!r} ({named}; the row has {known})")
            value = row[column]
            if named == "covariates":
                if not isinstance(value, COVARIATE_TYPES) or (isinstance(value, float) and not math.isfinite(value)):
                    raise InputError(f"{where}: {place}: column {column!r} ({named}) holds {_kind(value)}, not a string or finite number")
            elif named == "columns.id":
                if isinstance(value, bool) or not isinstance(value, (str, int)):
                    raise InputError(f"{where}: {place}: column {column!r} ({named}) holds {_kind(value)}, not a string or integer")
            elif not isinstance(value, str):
                raise InputError(f"{where}: {place}: column {column!r} ({named}) holds {_kind(value)}, not a string")
        sample_id = str(row[dataset.columns.id]) if dataset.columns.id else str(index)
        if sample_id in seen:
            raise InputError(f"{where}: {place}: id {quoted(sample_id)} (column {dataset.columns.id!r}) is also on {seen[sample_id]}")
        seen[sample_id] = place
        records.append(Record(
            index, sample_id, row[dataset.columns.prompt],
            {name: row[column] for name, column in dataset.responses.items()},
            {column: row[column] for column in dataset.covariates},
        ))
    if not records:
        raise InputError(f"{where}: holds no rows")
    return records


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null", str: "a string",
            float: "a number" if isinstance(value, float) and math.isfinite(value) else "a non-finite number"}.get(type(value), "a number")


def _jsonl_rows(lines: Iterator[tuple[int, str]], where: str) -> Iterator[tuple[str, dict]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_not_json)
        except (json.JSONDecodeError, ValueError) as exc:
            message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise InputError(f"{where}: line {number}: not valid JSON ({message})") from None
        except RecursionError:
            raise InputError(f"{where}: line {number}: nested too deeply to be read") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: line {number}: holds {_kind(row)}, expected a JSON object")
        yield f"line {number}", row


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _csv_rows(lines: Iterator[tuple[int, str]], where: str) -> Iterator[tuple[str, dict]]:
    # the reader gets each line back with its newline, so a quoted cell may span lines
    reader = csv.reader(line + "\n" for _, line in lines)
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header):
            twice = next(name for name in header if header.count(name) > 1)
            raise InputError(f"{where}: line 1: the header names column {twice!r} twice")
        for cells in reader:
            if not cells:
                continue
            place = f"line {reader.line_num}"
            if len(cells) != len(header):
                raise InputError(f"{where}: {place}: {len(cells)} cells, the header has {len(header)}")
            yield place, dict(zip(header, cells))
    except csv.Error as exc:
        raise InputError(f"{where}: line {reader.line_num}: not valid CSV ({exc})") from None


def _parquet_rows(data: bytes, where: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as parquet

    limits = LIMITS["dataset"]
    try:
        table = parquet.read_table(io.BytesIO(data), use_threads=False)  # no thread pool left running at exit
    except Exception as exc:  # a damaged or foreign file fails in pyarrow's own way: one line
        raise InputError(f"{where}: not a readable Parquet file ({first_line(exc)})") from None
    if limits.max_lines is not None and table.num_rows > limits.max_lines:
        raise InputError(f"{where}: has {table.num_rows:,} rows, more than the {limits.max_lines:,} a dataset file may have")
    for index, row in enumerate(table.to_pylist()):
        place = f"row {index + 1}"
        size = sum(len(value.encode("utf-8")) for value in row.values() if isinstance(value, str))
        if limits.max_line_bytes is not None and size > limits.max_line_bytes:
            raise InputError(f"{where}: {place}: longer than the {size_words(limits.max_line_bytes)} a row of a dataset file may have")
        yield place, row


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _line_reader(parse: Callable[[Iterator[tuple[int, str]], str], Iterator[tuple[str, dict]]]):
    """A reader of a text table: bounded lines (`harness.inputs`), parsed into rows by `parse`."""

    def read(dataset: FileDataset, where: str) -> Table:
        where = file_where(where, dataset.path)
        with open_input(dataset.path, "dataset", where) as file:
            records = records_from_rows(parse(file.lines(), where), dataset, where)
            return Table(records, file.sha256)

    return read


data_source(JsonlDataset)(_line_reader(_jsonl_rows))
data_source(CsvDataset)(_line_reader(_csv_rows))


@data_source(ParquetDataset)
def _parquet(dataset: ParquetDataset, where: str) -> Table:
    where = file_where(where, dataset.path)
    data, sha256 = read_bytes(dataset.path, "dataset", where)
    return Table(records_from_rows(_parquet_rows(data, where), dataset, where), sha256)


@data_source(HubDataset)
def _hub(dataset: HubDataset, where: str) -> Table:
    ref = dataset.hub
    where = f"{where}: dataset.hub"
    rows = load_hub_split(ref.name, ref.config, ref.split, ref.revision, where)
    return Table(records_from_rows(((f"row {i + 1}", dict(row)) for i, row in enumerate(rows)), dataset, where), "")


def load_hub_split(name: str, config: str | None, split: str, revision: str | None, where: str):
    """A split from the Hugging Face hub (fails fast offline), as `datasets` rows."""
    try:
        import datasets
        from huggingface_hub import HfApi

        HfApi().resolve_revision(name, repo_type="dataset")  # offline: fails in 1 s, load_dataset retries for 25 s
        return datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as exc:  # offline, unknown dataset name, ...: all the user's to fix
        raise InputError(f"{where}: {name}/{config}/{split} could not be loaded ({type(exc).__name__}: {first_line(exc)})") from None


# --- WikiText: paragraphs split at their first sentence --------------------------------------

PACKAGED_SPLIT = ("wikitext", "wikitext-2-raw-v1", "test")
"""(hub_name, hub_config, split) of the copy shipped with the package."""
PACKAGED_FILE = "wikitext-2-raw-v1-test.txt.gz"
"""In harness/datasets/: the split's non-empty rows in order, CRLF-separated, gzipped."""
PACKAGED_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
"""sha256 of the uncompressed rows: a damaged or altered copy is refused, never used."""
PROMPT_MIN_CHARS = 11
"""The first sentence's ". " must lie at this character or later (a prompt worth continuing)."""

# WikiText tokenizes numbers and punctuation: "1 @,@ 000", "well @-@ known", "word , word".
_DETOKENIZE = [
    (re.compile(r" @([-,.])@ "), r"\1"),
    (re.compile(r" ([.,;:!?)\]}%])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
    (re.compile(r'" (.*?) "'), r'"\1"'),
]


def detokenize(text: str) -> str:
    """Undo WikiText's tokenization artifacts so formatting does not separate the conditions."""
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text


def split_first_sentence(text: str, rule: FirstSentenceRule = "next") -> tuple[str, str] | None:
    """Split after the first ". " at character PROMPT_MIN_CHARS or later; None when there is none.

    An earlier ". " (an abbreviation: "Dr. No is ...") is passed over with rule `next`; with
    `skip` (the reference's rule) it makes the paragraph unusable.
    """
    cut = text.find(". ")
    if 0 <= cut < PROMPT_MIN_CHARS and rule == "next":
        cut = text.find(". ", PROMPT_MIN_CHARS)
    if cut < PROMPT_MIN_CHARS:
        return None
    return text[: cut + 1], text[cut + 2 :]


def paragraphs(rows: Iterable[str], dataset: WikiTextDataset) -> list[Record]:
    """The rows that are paragraphs with a first sentence, split there (headings and blank rows
    left out); `row` is the row's index, and its id."""
    records = []
    for index, row in enumerate(rows):
        text = row.strip()
        if not text or text.startswith("="):
            continue
        if dataset.detokenize:
            text = detokenize(text)
        split = split_first_sentence(text, dataset.first_sentence)
        if split is not None:
            records.append(Record(index, str(index), split[0], {HUMAN: split[1]}))
    return records


def packaged_rows(where: str) -> list[str]:
    """Rows of the WikiText-2 raw test split shipped with the package, checked against PACKAGED_SHA256."""
    file = resources.files("harness") / "datasets" / PACKAGED_FILE
    raw = gzip.decompress(file.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PACKAGED_SHA256:
        raise InputError(
            f"{where}: dataset: packaged copy {str(file)!r} has sha256 {digest[:12]}…, expected "
            f"{PACKAGED_SHA256[:12]}… (a damaged install: reinstall harness)"
        )
    return raw.decode("utf-8").splitlines()


@data_source(WikiTextDataset)
def _wikitext(dataset: WikiTextDataset, where: str) -> Table:
    """`path`: its lines, read at collection; else the packaged split (its sha256 checked) or the hub's."""
    if dataset.path is not None:
        with open_input(dataset.path, "dataset", file_where(where, dataset.path)) as file:
            rows = [line for _, line in file.lines()]
            return Table(paragraphs(rows, dataset), file.sha256)
    if (dataset.hub_name, dataset.hub_config, dataset.split) == PACKAGED_SPLIT:
        return Table(paragraphs(packaged_rows(where), dataset), PACKAGED_SHA256)
    rows = load_hub_split(dataset.hub_name, dataset.hub_config, dataset.split, None, f"{where}: dataset")["text"]
    return Table(paragraphs(rows, dataset), "")
