"""Data stage: WikiText-2 paragraphs, filtered by token count, split at the first sentence."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from harness.errors import InputError
from harness.executor import Stage
from harness.schema import DatasetSpec, Spec

if TYPE_CHECKING:
    from harness.pool import ModelPool

STAGE_VERSION = 1
"""Part of every cache key of this stage: bump it when a change here alters the samples."""

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


def split_first_sentence(text: str) -> tuple[str, str] | None:
    """Split at the first ". " lying past character 10; None when there is none."""
    cut = text.find(". ", 11)
    if cut < 0:
        return None
    return text[: cut + 1], text[cut + 2 :]


def read_rows(spec: DatasetSpec, where: str) -> list[str]:
    """Rows of the split, from the local raw file when it exists, else from the hub."""
    if spec.local_path and Path(spec.local_path).is_file():
        return Path(spec.local_path).read_text(encoding="utf-8").splitlines()
    try:
        import datasets
        from huggingface_hub import HfApi

        HfApi().resolve_revision(spec.hub_name, repo_type="dataset")  # offline: fails in 1 s, load_dataset retries for 25 s
        return list(datasets.load_dataset(spec.hub_name, spec.hub_config, split=spec.split)["text"])
    except Exception as exc:  # offline, unknown dataset name, ...: all the user's to fix
        local = f"local file {spec.local_path!r} not found and " if spec.local_path else ""
        raise InputError(
            f"{where}: dataset: {local}{spec.hub_name}/{spec.hub_config} could not be loaded "
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
        split = split_first_sentence(text)
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
        return {
            "dataset": self.spec.dataset.model_dump(mode="json", exclude={"tokenizer"}),
            "tokenizer": self.pool.identity(self.alias),
        }

    def compute(self, unit: None, folder: Path) -> list[dict]:
        rows = read_rows(self.spec.dataset, str(self.spec_path))
        samples = select_samples(rows, self.pool.tokenizer(self.alias), self.spec.dataset, str(self.spec_path))
        return [sample.to_dict() for sample in samples]

    def check(self, output: list[dict]) -> str | None:
        if len(output) != self.spec.dataset.n_samples:
            return f"{len(output)} samples, {self.spec.dataset.n_samples} asked for"
        return None

    def describe(self, output: list[dict]) -> str:
        return f"{len(output)} samples"
