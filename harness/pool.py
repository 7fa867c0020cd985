"""The models a run uses, each loaded on first use (a fully cached run loads none)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.chat import ChatFormat
from harness.executor import Executor
from harness.model_spec import ModelSpec
from harness.models import (
    check_context, check_device, check_tokenizer, load_model, load_tokenizer, model_context, model_identity, model_source,
    use_threads,
)
from harness.schema import DATASET_TOKENIZER, Spec


def model_cache_dir() -> Path:
    """Converted model weights are per machine, not per run folder."""
    return Path(os.environ.get("HARNESS_MODEL_CACHE", Path.home() / ".cache" / "harness"))


@dataclass
class ModelPool:
    spec: Spec
    spec_path: Path
    executor: Executor
    _models: dict[str, Any] = field(default_factory=dict)
    _tokenizers: dict[str, Any] = field(default_factory=dict)
    _identities: dict[str, str] = field(default_factory=dict)
    _chat_formats: dict[str, Any] = field(default_factory=dict)

    def where(self, alias: str) -> str:
        return f"{self.spec_path}: {alias if alias == DATASET_TOKENIZER else 'models.' + alias}"

    def _model_spec(self, alias: str) -> ModelSpec:
        model_spec = self.spec.model_spec(alias)
        shard = self.executor.shard
        if shard.world > 1 and model_spec.device_map == "auto":  # one model copy per process
            return model_spec.model_copy(update={"device_map": shard.device})
        return model_spec

    def placement(self, alias: str) -> str:
        """The `device_map` the model is (to be) loaded with."""
        return self._model_spec(alias).device_map

    def check(self, alias: str) -> None:
        """Fail fast, before any stage runs: a missing package, file, path or device."""

        self.identity(alias)
        check_device(self.spec.model_spec(alias), self.where(alias))
        if self.spec.model_spec(alias).chat:
            self.model_prompt(alias, "A prompt.")  # no chat template, or one that fails: one line now

    def check_tokenizer(self, alias: str) -> None:
        """Fail when the tokenizer does not load; reads no weights."""
        if alias not in self._tokenizers:
            check_tokenizer(self.spec.models[alias], model_cache_dir(), self.where(alias))

    def check_fits_context(self, alias: str, new_tokens: int, prompt_tokens: int, field: str) -> None:
        """Fail before any stage runs when a prompt plus `new_tokens` exceed the model's context."""
        limit, source = model_context(self.spec.models[alias], model_cache_dir(), self.where(alias))
        check_context(limit, source, new_tokens, prompt_tokens, f"{self.spec_path}: {field}")

    def identity(self, alias: str) -> str:
        if alias not in self._identities:
            self._identities[alias] = model_identity(self.spec.model_spec(alias), model_cache_dir(), self.where(alias))
        return self._identities[alias]

    def key(self, alias: str) -> dict:
        """What about a model changes its numbers: weights and dtype."""
        return {"identity": self.identity(alias), "dtype": self.spec.model_spec(alias).dtype}

    @property
    def threads(self) -> int:
        """CPU threads the models compute with: `runtime.threads`, else the cores this process may run on."""
        if self.spec.runtime.threads is not None:
            return self.spec.runtime.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # macOS and Windows have no affinity masks
            return os.cpu_count() or 1

    def model(self, alias: str):
        """The loaded model (`harness.models.LoadedModel`)."""

        if alias not in self._models:
            use_threads(self.threads)
            with self.executor.timed(f"load[{alias}]"), self.executor.progress.task(f"load[{alias}]"):
                self._models[alias] = load_model(self._model_spec(alias), model_cache_dir(), self.where(alias))
        return self._models[alias]

    def tokenizer(self, alias: str):

        if alias in self._models:
            return self._models[alias].tokenizer
        if alias not in self._tokenizers:
            self._tokenizers[alias] = load_tokenizer(self.spec.model_spec(alias), model_cache_dir(), self.where(alias))
        return self._tokenizers[alias]

    def model_prompt(self, alias: str, prompt: str) -> str | None:
        """`prompt` as a chat model reads it (`models.<alias>.chat`: its chat template, one BOS),
        or None for a model prompted with the bare text."""
        spec = self.spec.model_spec(alias)
        if not spec.chat:
            return None
        if alias not in self._chat_formats:
            self._chat_formats[alias] = ChatFormat.of(self.tokenizer(alias), spec, f"{self.where(alias)}")
        return self._chat_formats[alias].prompt(prompt)

    def with_model_prompts(self, alias: str, texts: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Each text with `model_prompt`, its prompt as `alias` reads it, where that is a chat
        model (capture reads those ids; texts.jsonl records it); the texts unchanged otherwise."""
        if not self.spec.model_spec(alias).chat:
            return texts
        return {name: [{**row, "model_prompt": self.model_prompt(alias, row["prompt"])} for row in rows]
                for name, rows in texts.items()}

    def provenance(self) -> dict[str, dict]:
        """Per model the run used: identity, where the weights came from, where it ran.

        A fully cached run loads no model; its record still names the weights (and the device
        stays None: nothing ran)."""

        records = {}
        for alias, identity in self._identities.items():
            loaded = self._models.get(alias)
            records[alias] = {
                "identity": identity,
                "source": loaded.source if loaded else model_source(self.spec.model_spec(alias), model_cache_dir(), self.where(alias)),
                "device": str(loaded.input_device) if loaded else None,
            }
        return records
