"""Data stage: WikiText-2 paragraphs, filtered by token count, split at the first sentence.

Rows come from, in this order: the file the spec names (`dataset.path`); the WikiText-2 raw
test split shipped inside this package (`harness/datasets/`, checked against its sha256);
the Hugging Face hub for any other dataset, configuration or split.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from harness.errors import InputError
from harness.executor import Stage
from harness.inputs import open_input
from harness.schema import DatasetSpec, FirstSentenceRule, Spec

if TYPE_CHECKING:
    from harness.pool import ModelPool

STAGE_VERSION = 1
"""Part of every cache key of this stage: bump it when a change here alters the samples."""

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


@dataclass(frozen=True)
class Sample:
    """One paragraph split into the prompt (its first sentence) and the human continuation."""

    sample_id: int
    """Position among the kept paragraphs (0-based)."""
    row: int
    """Row of the source file / split it came from."""
    prompt: str
    """Text up to and including the first sentence's period."""
    human_response: str
    """The rest of the paragraph."""
    n_tokens: int
    """Token count of the whole paragraph (dataset tokenizer, no special tokens)."""

    def to_dict(self) -> dict:
        return asdict(self)


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


@dataclass(frozen=True)
class Rows:
    """A split's rows, and for a file the sha256 of the very bytes they were read from."""

    rows: list[str]
    file_sha256: str | None = None


def read_rows(spec: DatasetSpec, where: str) -> Rows:
    """Rows of the split: the spec's file, else the packaged copy, else the hub."""
    if spec.path is not None:
        return file_rows(Path(spec.path), f"{where}: dataset.path: {spec.path}")
    if (spec.hub_name, spec.hub_config, spec.split) == PACKAGED_SPLIT:
        return Rows(packaged_rows(where))
    return Rows(hub_rows(spec, where))


def file_rows(path: Path, where: str) -> Rows:
    """A text file's lines, read once within the dataset limits (`harness.inputs`) and hashed as read."""
    with open_input(path, "dataset", where) as file:
        rows = [row for _, line in file.lines() for row in line.splitlines() or [""]]
        return Rows(rows, file.sha256)


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


def hub_rows(spec: DatasetSpec, where: str) -> list[str]:
    """Rows of `hub_name`/`hub_config`/`split` from the Hugging Face hub (fails fast offline)."""
    try:
        import datasets
        from huggingface_hub import HfApi

        HfApi().resolve_revision(spec.hub_name, repo_type="dataset")  # offline: fails in 1 s, load_dataset retries for 25 s
        return list(datasets.load_dataset(spec.hub_name, spec.hub_config, split=spec.split)["text"])
    except Exception as exc:  # offline, unknown dataset name, ...: all the user's to fix
        raise InputError(
            f"{where}: dataset: {spec.hub_name}/{spec.hub_config}/{spec.split} could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def select_samples(rows: Iterable[str], tokenizer, spec: DatasetSpec, where: str) -> list[Sample]:
    """The first `n_samples` paragraphs whose token count lies in [min_tokens, max_tokens]."""
    samples: list[Sample] = []
    for row_index, row in enumerate(rows):
        text = row.strip()
        if not text or text.startswith("="):
            continue
        if spec.detokenize:
            text = detokenize(text)
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not spec.min_tokens <= n_tokens <= spec.max_tokens:
            continue
        split = split_first_sentence(text, spec.first_sentence)
        if split is None:
            continue
        samples.append(Sample(len(samples), row_index, split[0], split[1], n_tokens))
        if len(samples) == spec.n_samples:
            return samples
    raise InputError(
        f"{where}: dataset.n_samples: only {len(samples)} paragraphs have {spec.min_tokens}-"
        f"{spec.max_tokens} tokens and a first sentence, {spec.n_samples} asked for"
    )


@dataclass
class DataStage(Stage):
    """The samples: the first `n_samples` qualifying paragraphs, split at their first sentence."""

    spec: Spec
    spec_path: Path
    pool: ModelPool
    name = kind = "data"
    version = STAGE_VERSION

    @property
    def alias(self) -> str:
        return self.spec.dataset_tokenizer

    def inputs(self) -> dict:
        # the tokenizer enters by identity, so naming the same model by another alias reuses the stage
        inputs = {
            "dataset": self.spec.dataset.model_dump(mode="json", exclude={"tokenizer"}),
            "tokenizer": self.pool.identity(self.alias),
        }
        if self.rows.file_sha256 is not None:  # a file edited in place must not reuse stale samples
            inputs["file_sha256"] = self.rows.file_sha256
        return inputs

    @cached_property
    def rows(self) -> Rows:
        """Read once: the key hashes the bytes that `compute` selects samples from."""
        return read_rows(self.spec.dataset, str(self.spec_path))

    def compute(self, unit: None, folder: Path) -> list[dict]:
        samples = select_samples(self.rows.rows, self.pool.tokenizer(self.alias), self.spec.dataset, str(self.spec_path))
        return [sample.to_dict() for sample in samples]

    def check(self, output: list[dict]) -> str | None:
        if len(output) != self.spec.dataset.n_samples:
            return f"{len(output)} samples, {self.spec.dataset.n_samples} asked for"
        return None

    def describe(self, output: list[dict]) -> str:
        return f"{len(output)} samples"

    def placeholder(self, key: str) -> list[dict]:
        return [Sample(i, i, f"{key}:{i}:prompt", f"{key}:{i}:human", 0).to_dict() for i in range(self.spec.dataset.n_samples)]
