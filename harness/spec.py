"""Experiment specs: YAML files loaded into pydantic models.

A spec may start with ``extends: other.yaml``: the other file (resolved relative to this
one) is loaded first and this file's keys are merged over it — mappings merge key by key,
everything else replaces, and ``null`` deletes a key. Every error names the file and the
field it is about.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import InputError

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""Names that appear inside criteria (conditions, comparisons, models) must be identifiers."""


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a spec must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GGUFSource(StrictModel):
    """A GGUF file shipped inside an installed Python package."""

    package: str
    """Import name of the package (located with importlib, not imported, unless `assemble`)."""
    file: str = "*.gguf"
    """Glob for the file inside the package directory (ignored with `assemble`)."""
    assemble: bool = False
    """The package ships the file in chunks: call its `assemble(path)` to write it."""


class ModelSpec(StrictModel):
    """Where a model comes from and how it is placed."""

    id: str | None = None
    """Hub id (`google/gemma-2-2b`), local model directory, or local `.gguf` file; a display
    name only when `gguf` is given."""
    gguf: GGUFSource | None = None
    """Load from a GGUF file inside an installed package instead of the hub."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype."""
    device_map: str = "auto"
    """accelerate placement: `auto`, `cpu`, `cuda`, `cuda:0`, ..."""
    trust_remote_code: bool = False
    """Run model code from the hub. Off unless the spec says so."""

    @model_validator(mode="after")
    def _has_source(self) -> "ModelSpec":
        if self.id is None and self.gguf is None:
            raise ValueError("give `id` (hub id or local path) or `gguf`")
        return self


class DatasetSpec(StrictModel):
    """WikiText-2 paragraphs split at their first sentence."""

    local_path: str | None = "../shared/data/wikitext-2-raw/wiki.test.raw"
    """Raw text file, one row per line; used when it exists (relative to the working dir)."""
    hub_name: str = "wikitext"
    """Fallback: `datasets.load_dataset(hub_name, hub_config, split=split)`."""
    hub_config: str = "wikitext-2-raw-v1"
    split: str = "test"
    n_samples: int = Field(50, ge=3)
    """How many paragraphs to keep (the first that match, in order); paired statistics need 3."""
    min_tokens: int = Field(80, ge=1)
    max_tokens: int = Field(120, ge=1)
    tokenizer: str | None = None
    """Model alias whose tokenizer counts tokens; default: the capture model."""
    detokenize: bool = False
    """Undo WikiText's tokenization (` @-@ `, ` , `) on the human text before splitting."""

    @model_validator(mode="after")
    def _token_range(self) -> "DatasetSpec":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens})")
        return self


class GenerationSpec(StrictModel):
    """How a model continues the prompt."""

    max_new_tokens: int = Field(90, gt=0)
    temperature: float = Field(0.0, ge=0)
    """0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float = Field(1.0, gt=0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    seed: int = 0


class HumanCondition(StrictModel):
    """The human-written rest of the paragraph."""

    source: Literal["human"]


class GeneratedCondition(StrictModel):
    """A model's continuation of the prompt."""

    source: Literal["generate"]
    generator: str | None = None
    """Model alias that writes the text; default: the capture model."""
    generation: GenerationSpec = GenerationSpec()


class ShuffledCondition(StrictModel):
    """Another condition's response with its words (or tokens) shuffled: a control."""

    source: Literal["shuffle"]
    of: str
    """Condition whose response is shuffled."""
    unit: Literal["words", "tokens"] = "words"
    """Shuffle whitespace-separated words, or the capture tokenizer's tokens."""
    seed: int = 0


Condition = Annotated[Union[HumanCondition, GeneratedCondition, ShuffledCondition], Field(discriminator="source")]


class CaptureSpec(StrictModel):
    """Which model is measured, where, and over which tokens."""

    model: str | None = None
    """Model alias whose residual stream and CE are measured; default: the only/first model."""
    layers: Literal["all"] | list[Annotated[int, Field(ge=0)]] = "all"
    """Decoder blocks whose outputs are captured (layer l = output of block l)."""
    tokens: Literal["response"] = "response"
    """Trajectory metrics run over the response tokens."""
    length_matching: bool = False
    """Truncate both responses of a pair to the shorter one's token count."""
    save_activations: bool = False
    """Also write the captured activations (safetensors); large."""


class Comparison(StrictModel):
    """A paired comparison: statistics are computed on `a - b` per sample."""

    a: str
    b: str


class StatsSpec(StrictModel):
    """Statistical tests run on per-sample metrics."""

    comparisons: dict[str, Comparison] | None = None
    """Named paired comparisons; the first is the primary one (names without a prefix).
    Default: the first two conditions, named `<a>_vs_<b>`."""
    bootstrap_resamples: int = Field(2000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    ddof: Literal[0, 1] = 1
    """Cohen's d_z denominator; the seed used 0 (population SD)."""
    correlate: tuple[str, str] = ("ce_loss", "smoothness")
    """Text metric and trajectory metric whose relation is tested."""
    mixed_model: bool = True
    """Fit `y ~ x + condition` with a random intercept per sample (statsmodels MixedLM)."""


class ReportSpec(StrictModel):
    template: str = "results.md.j2"
    """A file in reports/templates/, or a path relative to the spec file."""
    plots: bool = True


class RuntimeSpec(StrictModel):
    """How the work is batched; never changes what is computed, only how fast."""

    generation_batch_size: int = Field(64, gt=0)
    token_budget: Annotated[int, Field(gt=0)] | Literal["auto"] = 16384
    """Tokens (padded) per forward batch, or `auto`: sized from the device's free memory."""


class Spec(StrictModel):
    """One experiment."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run folder name: runs/<name>/<run id>/."""
    description: str = ""
    models: dict[str, ModelSpec]
    """Model aliases used by the capture and generated conditions."""
    dataset: DatasetSpec = DatasetSpec()
    conditions: dict[str, Condition]
    capture: CaptureSpec = CaptureSpec()
    metrics: list[str] = ["smoothness", "magnitude", "variance"]
    """Trajectory metrics (registered in metrics/), computed per layer."""
    stats: StatsSpec = StatsSpec()
    criteria: dict[str, str] = {}
    """Name -> expression over statistic names, e.g. `smoothness.overall.d > 0`."""
    report: ReportSpec = ReportSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @field_validator("models", "conditions")
    @classmethod
    def _identifiers(cls, value: dict) -> dict:
        for key in value:
            if not re.match(IDENTIFIER, key):
                raise ValueError(f"name {key!r} must be an identifier (letters, digits, _)")
        if not value:
            raise ValueError("must not be empty")
        return value

    @property
    def capture_model(self) -> str:
        return self.capture.model or next(iter(self.models))

    @property
    def dataset_tokenizer(self) -> str:
        return self.dataset.tokenizer or self.capture_model

    @property
    def comparisons(self) -> dict[str, Comparison]:
        if self.stats.comparisons:
            return self.stats.comparisons
        a, b = list(self.conditions)[:2]
        return {f"{a}_vs_{b}": Comparison(a=a, b=b)}

    def generator_of(self, condition: str) -> str:
        cond = self.conditions[condition]
        assert isinstance(cond, GeneratedCondition)
        return cond.generator or self.capture_model

    @model_validator(mode="after")
    def _references(self) -> "Spec":
        from metrics import LAYER_METRICS

        def need(kind: str, where: str, name: str, known) -> None:
            if name not in known:
                raise _FieldError(where, f"unknown {kind} {name!r} (known: {', '.join(sorted(known))})")

        from harness.stats import STAT_KEYWORDS

        reserved = set(STAT_KEYWORDS) | set(LAYER_METRICS) | set(TEXT_METRIC_NAMES)
        for kind, names in (("conditions", self.conditions), ("stats.comparisons", self.stats.comparisons or {})):
            for name in names:
                if name in reserved or re.fullmatch(r"layer\d+", name):
                    raise _FieldError(f"{kind}.{name}", f"{name!r} is reserved for statistic names; choose another name")
        if len(self.conditions) < 2:
            raise _FieldError("conditions", "needs at least two conditions to compare")
        need("model", "capture.model", self.capture_model, self.models)
        need("model", "dataset.tokenizer", self.dataset_tokenizer, self.models)
        for name, cond in self.conditions.items():
            if isinstance(cond, GeneratedCondition):
                need("model", f"conditions.{name}.generator", self.generator_of(name), self.models)
            if isinstance(cond, ShuffledCondition):
                need("condition", f"conditions.{name}.of", cond.of, self.conditions)
                if isinstance(self.conditions[cond.of], ShuffledCondition):
                    raise _FieldError(f"conditions.{name}.of", "cannot shuffle a shuffled condition")
        for metric in self.metrics:
            need("metric", "metrics", metric, LAYER_METRICS)
        if len(set(self.metrics)) != len(self.metrics):
            raise _FieldError("metrics", "lists a metric twice")
        for cmp_name, cmp in self.comparisons.items():
            if not re.match(IDENTIFIER, cmp_name):
                raise _FieldError(f"stats.comparisons.{cmp_name}", "name must be an identifier")
            need("condition", f"stats.comparisons.{cmp_name}.a", cmp.a, self.conditions)
            need("condition", f"stats.comparisons.{cmp_name}.b", cmp.b, self.conditions)
            if cmp.a == cmp.b:
                raise _FieldError(f"stats.comparisons.{cmp_name}", "compares a condition with itself")
        x, y = self.stats.correlate
        need("text metric", "stats.correlate", x, TEXT_METRIC_NAMES)
        need("metric", "stats.correlate", y, self.metrics)
        from harness.criteria import check_criterion

        for crit_name, expr in self.criteria.items():
            try:
                check_criterion(expr, self.statistic_vocabulary())
            except ValueError as exc:
                raise _FieldError(f"criteria.{crit_name}", str(exc)) from None
        return self

    def statistic_vocabulary(self) -> set[str]:
        """Every word that may appear between the dots of a statistic name."""
        from harness.stats import STAT_KEYWORDS

        return (
            set(self.metrics)
            | set(TEXT_METRIC_NAMES)
            | set(self.conditions)
            | set(self.comparisons)
            | set(STAT_KEYWORDS)
        )


TEXT_METRIC_NAMES = ("ce_loss", "ce_loss_response")
"""Per-text metrics every run computes (see metrics/)."""


class _FieldError(ValueError):
    """A cross-field check failing at a known field path."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value)
        return merged
    return over


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """Parse a spec file (following `extends:`) into one resolved mapping."""
    return _read_yaml(Path(path), ())


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.resolve() in seen:
        raise InputError(f"{path}: extends: circular chain {' -> '.join(str(p) for p in seen)}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: {where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        raise InputError(f"{path}: empty spec")
    if not isinstance(data, dict):
        raise InputError(f"{path}: a spec is a mapping of keys, not a {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise InputError(f"{path}: extends: must be a file name")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise InputError(f"{path}: extends: {str(parent_path)!r} not found")
    base = _read_yaml(parent_path, seen + (path.resolve(),))
    return _merge(base, data)


def load_spec(path: str | Path) -> Spec:
    """Load and validate a spec; raise InputError with one line naming file and field."""
    path = Path(path)
    data = read_yaml(path)
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()  # of a union's failed branches, the deepest error says most
        err = max((e for e in errors if e["loc"][:2] == errors[0]["loc"][:2]), key=lambda e: len(e["loc"]))
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            raise InputError(f"{path}: {ctx_error.field}: {ctx_error}") from None
        field = ".".join(str(p) for p in _without_union_tags(err["loc"]) if "[" not in str(p)) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            field += ".source"
            message = "missing: one of human, generate, shuffle" if err["type"] == "union_tag_not_found" else (
                f"must be one of human, generate, shuffle, not {err['input'].get('source')!r}"
            )
        raise InputError(f"{path}: {field}: {message}") from None


def _without_union_tags(loc: tuple) -> tuple:
    """pydantic puts the discriminator value in the path: conditions.x.generate.seed."""
    if len(loc) > 2 and loc[0] == "conditions" and loc[2] in ("human", "generate", "shuffle"):
        return loc[:2] + loc[3:]
    return loc


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML (what `validate` shows and runs/ records)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_json_schema() -> dict:
    """JSON Schema of a spec file, for editors: `extends` added, nothing required (an extending
    file may be partial; `harness validate` checks the resolved spec)."""
    schema = Spec.model_json_schema()
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "Spec file (relative to this one) whose keys this file overrides.",
    }
    return _drop_required(schema)


def _drop_required(node: Any) -> Any:
    """A file that `extends` another may omit anything, so the editor schema requires nothing."""
    if isinstance(node, dict):
        return {key: _drop_required(value) for key, value in node.items() if key != "required"}
    if isinstance(node, list):
        return [_drop_required(item) for item in node]
    return node
