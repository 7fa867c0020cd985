"""The spec schema: what a spec file may say, as pydantic models (loading lives in harness.spec).

Importing this module imports no torch: `harness validate` checks specs without it. Every
cross-field check raises `FieldError(path, message)`, which the loader turns into one line
naming the file and field.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.base import IDENTIFIER, FieldError, StrictModel
from harness.data_sources import DATA_SOURCES, WikiTextDataset, with_default_source
from harness.model_spec import ModelSpec
from harness.errors import quoted
from harness.grid import Column, Grid, is_axis_word
from harness.metrics import LAYER_METRICS, METRIC_OPTIONS, PROJECTION_METRICS
from harness.overrides import KEY_PATH
from harness.registry import load_plugins
from harness.sites import DEFAULT_SITE, SITES
from harness.sources import SOURCES
from harness.statnames import (
    INTERVENED_TEXT_METRIC_NAMES,
    LAYER_SCOPE,
    OVERALL_RULES,
    STAT_KEYWORDS,
    SWEEP_KEYWORDS,
    SWEEP_TREND,
    TEXT_METRIC_NAMES,
    depth_band_rule,
    words,
)

logger = logging.getLogger(__name__)

CRITERION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
"""A criterion's name: printed on its one result line, in RESULTS.md and as a pytest test id."""

DATASET_TOKENIZER = "dataset.tokenizer"
"""The model pool's name for a tokenizer that `dataset.tokenizer` gives as a model spec."""

MAX_POINTS = 256
"""Points of a matrix at most: each is a run; a mistyped list should not start thousands."""


ResponseTokenization = Literal["joint", "separate"]
"""See `CaptureSpec.response_tokenization`."""


def _check_windows(value: list[tuple[int, int]]) -> list[tuple[int, int]]:
    for start, end in value:
        if end <= start:
            raise ValueError(f"window [{start}, {end}] must end after it starts")
    if len(set(value)) != len(value):
        raise ValueError("lists a window twice")
    return value


Windows = Annotated[
    list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]]], AfterValidator(_check_windows)
]
"""See `CaptureSpec.windows`."""


Dataset = Annotated[
    Union[tuple(source.spec_model for source in DATA_SOURCES.values())],
    Field(discriminator="source"),
    BeforeValidator(with_default_source),
]
"""Any registered data source's spec model, chosen by `dataset.source` (default: `wikitext`)."""


load_plugins()  # before the schema is built from the registries: a plugin's condition source is in the union

Condition = Annotated[
    Union[tuple(source.spec_model for source in SOURCES.values())], Field(discriminator="source")
]
"""Any registered condition source's spec model, chosen by its `source:` literal."""


class CaptureSpec(StrictModel):
    """Which model is measured, where, and over which tokens."""

    model: str | None = None
    """Model alias whose residual stream and CE are measured; default: the only/first model."""
    layers: Literal["all"] | list[Annotated[int, Field(ge=0)]] = "all"
    """Decoder blocks whose outputs are captured (layer l = output of block l)."""
    sites: list[str] = [DEFAULT_SITE]
    """Where in each block the stream is read (registered in harness/sites.py):
    `resid_post` (the block's output), `resid_pre` (its input), `attn_out`, `mlp_out` (what the
    attention / MLP sublayer adds to the residual stream; found by role in Llama, Mistral,
    Qwen 2/3, Gemma 1-3, Phi-3, OLMo 2 and GPT-NeoX blocks: harness/structure.py). Metrics of a site other than `resid_post` are named
    `<metric>_<site>`; token deltas and saved activations are the first site's."""
    tokens: Literal["response"] = "response"
    """Trajectory metrics run over the response tokens."""
    windows: Windows = []
    """Windows `[start, end]` of response tokens (`start <= i < end`, e.g. `[[0, 5], [50, 100]]`):
    every trajectory and projection metric is also computed on each window's tokens alone
    (smoothness: the steps between two tokens of the window), in the same forward, and
    tested per window and layer (`smoothness.window0_5.overall.d`; Holm/BH across the
    windows x layers of a metric). A response that does not reach a window has no value there.
    (Formerly `stats.positions`, still accepted with a note.)"""
    response_tokenization: ResponseTokenization = "joint"
    """`joint`: prompt + " " + response tokenized as one text, as the model would read it;
    `separate` (the reference's): the prompt (with BOS) and the response (no special tokens, no
    leading space) tokenized apart and concatenated. CE comes from the same ids (the reference
    computed CE on the joint tokenization)."""
    length_matching: bool = False
    """Truncate both responses of a pair to the shorter one's token count."""
    save_activations: bool = False
    """Also write the captured activations (safetensors); large."""
    activation_dtype: Literal["float16", "float32"] = "float16"
    """dtype of saved activations: `float32` keeps exactly the values the metrics saw, at twice the size."""
    from_generation: Literal["auto", False] = "auto"
    """`auto`: a generated condition whose generator is the capture model is measured while it
    is decoded (the hooks run inside `generate`; no second forward), unless length matching,
    `response_tokenization: separate`, saved activations or compiled decoding stand between; a
    text whose re-tokenization gives other ids is measured by the forward (texts.jsonl's
    `measured_by` says which). `false`: always the forward."""

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, value: list[str]) -> list[str]:
        unknown = [site for site in value if site not in SITES]
        if unknown:
            raise ValueError(f"unknown capture site {unknown[0]!r} (known: {', '.join(sorted(SITES))})")
        if not value:
            raise ValueError("must name at least one site")
        if len(set(value)) != len(value):
            raise ValueError("lists a site twice")
        return value


class Comparison(StrictModel):
    """A paired comparison: statistics are computed on `a - b` per sample."""

    a: str
    b: str


class DepthBand(StrictModel):
    """An overall rule: the mean over the captured layers whose relative depth (position among
    the captured layers, 0 = first, 1 = last) lies in `layers`, inclusive."""

    layers: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]]
    """Relative depths [from, to], e.g. [0.25, 0.75]."""

    @model_validator(mode="after")
    def _ordered(self) -> "DepthBand":
        if self.layers[0] > self.layers[1]:
            raise ValueError(f"layers: {list(self.layers)} must be [from, to] with from <= to")
        return self

    @property
    def name(self) -> str:
        return depth_band_rule(*self.layers)


OverallRule = Union[Literal[OVERALL_RULES], DepthBand]
"""How a trajectory metric's layers make one value per sample (`StatsSpec.overall`)."""


def rule_label(rule: OverallRule) -> str:
    """The rule's name in statistic names: `mean`, `standardized`, `median_layer`, `layers25_75`."""
    return rule if isinstance(rule, str) else rule.name


class StatsSpec(StrictModel):
    """Statistical tests run on per-sample metrics."""

    comparisons: dict[str, Comparison] | None = None
    """Named paired comparisons; the first is the primary one (names without a prefix).
    Default: the first two conditions, named `<a>_vs_<b>`."""
    bootstrap_resamples: int = Field(2000, ge=0, le=100_000)
    """Resamples per bootstrap interval; each takes memory for a copy of the samples, so a
    mistyped 10**9 would exhaust the machine."""
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    ddof: Literal[0, 1] = 1
    """Cohen's d_z denominator; the seed used 0 (population SD)."""
    correlate: tuple[str, str] = ("ce_loss", "smoothness")
    """Text metric and trajectory metric whose relation is tested."""
    mixed_model: bool = True
    """Fit `y ~ x + condition` with a random intercept per sample (statsmodels MixedLM)."""
    overall: OverallRule | list[OverallRule] = "mean"
    """How a trajectory metric's layers make its overall value per sample: `mean` (over layers,
    raw: layers with larger norms weigh more), `standardized` (each layer's values divided by
    their SD, ddof 1, over every condition's texts at that layer, then the mean: every layer
    weighs the same), `median_layer` (the median over layers), or a depth band
    (`layers: [0.25, 0.75]`: the mean over the layers at those relative depths). A list asks for
    several: the first names `<metric>.overall.*` (and the correlations and mixed model use
    it), each further one `<metric>.overall_<rule>.*` (`overall_standardized`, `overall_layers25_75`)."""

    @property
    def overall_rules(self) -> list[OverallRule]:
        """`overall` as a list, the first rule first."""
        return self.overall if isinstance(self.overall, list) else [self.overall]

    @property
    def overall_rule_names(self) -> list[str]:
        """The rules' names (`rule_label`), the first rule first."""
        return [rule_label(rule) for rule in self.overall_rules]

    @field_validator("overall")
    @classmethod
    def _distinct_rules(cls, value: OverallRule | list[OverallRule]) -> OverallRule | list[OverallRule]:
        names = [rule_label(rule) for rule in (value if isinstance(value, list) else [value])]
        if not names:
            raise ValueError("must name at least one rule")
        if len(set(names)) != len(names):
            raise ValueError(f"names the rule {next(n for n in names if names.count(n) > 1)!r} twice")
        return value


class VerdictSpec(StrictModel):
    """A 2×2 verdict grid: the outcomes of two criteria pick one of four sentences."""

    rows: str
    """Criterion whose outcome picks the row (first row: passed)."""
    columns: str
    """Criterion whose outcome picks the column (first column: passed)."""
    cells: tuple[tuple[str, str], tuple[str, str]]
    """What each outcome means: [[both passed, only `rows` passed], [only `columns` passed, neither]]."""


class ThreatsSpec(StrictModel):
    """Thresholds above which a text diagnostic is flagged as a threat to validity."""

    repetition_mean: float = Field(0.10, ge=0, le=1)
    """Mean share of repeated token n-grams (`diagnostics.NGRAM_SIZE`) in a condition's responses (loops)."""
    repetition_max: float = Field(0.30, ge=0, le=1)
    """Share of repeated token n-grams in the worst single response."""
    early_stop: float = Field(0.20, ge=0, le=1)
    """Share of generated responses ended by the end-of-sequence token."""
    length_difference: float = Field(0.10, ge=0)
    """Relative difference of the primary comparison's mean response lengths."""
    scale_free_metric: str | None = None
    """A scale-free variant of the studied metric, reported beside it (it must be in `metrics`)."""
    control_must_not_be: Literal["lowest", "highest"] | None = None
    """Warn when a control condition (one derived from another, e.g. shuffled) has the lowest
    or highest mean of the studied metric: the end the hypothesis reserves for real text."""
    layer_dominance: float = Field(0.5, gt=0, le=1)
    """Warn when a quarter of the layers (those with the largest shares) carry more than this
    share of the studied metric's mean over layers: its overall value then mostly says what
    those layers do."""
    influence: float = Field(0.25, ge=0)
    """Warn when leaving one sample out changes the primary comparison's d of the studied
    metric by more than this (`<metric>.overall.d_loo_max_change`), and name the sample."""


class ReportSpec(StrictModel):
    """What RESULTS.md says, and with which template."""

    template: str = "results.md.j2"
    """A file in reports/templates/, or one in the spec file's folder (after symlinks; never a
    spec file); rendered in jinja2's sandbox (harness.templates)."""
    plots: bool = True
    hypothesis: str = ""
    """The question the run answers, in words (shown at the top of the report)."""
    verdict: VerdictSpec | None = None
    """The verdict grid; none: the report lists the criteria only."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """Significance level of the per-layer Holm marks and the report's notes."""
    threats: ThreatsSpec = ThreatsSpec()


class RuntimeSpec(StrictModel):
    """How the work is batched; never changes what is computed, only how fast."""

    generation_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    """Prompts per generate call, or `auto`: sized from the device's free memory and the KV cache."""
    compile: bool | Literal["auto"] = "auto"
    """`auto`: decoding compiled where that pays, small batches on CUDA, eager elsewhere (large
    batches, every CPU run; the rule is `generate.compiled_decoding`, and the run log states
    it); capture forwards eager. `true` (`torch.compile`): generation with a static KV cache and a
    compiled decoding step, and capture through compiled decoder blocks (lengths padded to a
    multiple of 64); needs `capture.sites: [resid_post]` (hooks inside a compiled block would
    recompile it). `false`: eager."""
    token_budget: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    """Tokens (padded) per forward batch, or `auto`: sized from the device's free memory, and
    on a CPU at most a small batch (`capture.CPU_TOKEN_BUDGET`), where larger ones only add padding."""
    threads: Annotated[int, Field(gt=0)] | None = None
    """CPU threads torch computes with (`torch.set_num_threads`); default: the cores this process
    may run on (`os.sched_getaffinity`). Recorded in the manifest. Like another batching, another
    count may change the last bits of a result (the order of parallel sums)."""

DirectionSplit = Literal["all", "first_half", "second_half", "even", "odd"]
"""Which of a run's samples build a direction (`harness directions --split`), by position in
sample-id order; the others can then test it (`DirectionSpec.evaluate_on: held_out`)."""


class DirectionSpec(StrictModel):
    """A direction set: a unit vector per layer (or one for every layer), read from a file."""

    path: str
    """A safetensors, `.pt` or `.npy` file holding a `[layers, d_model]` tensor (a row per decoder
    block of the capture model) or a `[d_model]` vector (the same for every layer); each row is
    normalised to unit length. A relative path is relative to the folder of the spec file that
    names it. Its sha256 enters the capture stage's cache key and the manifest."""
    key: str | None = None
    """The tensor's name in a safetensors or `.pt` file that holds several; default: its only tensor."""
    evaluate_on: Literal["all", "held_out"] = "all"
    """`held_out`: the direction's projection metrics are kept only for the samples that did not
    build it (a file written by `harness directions` names them), so the statistics test the
    direction on samples it has not seen."""


def _check_matrix(value: dict[str, list[Any]]) -> dict[str, list[Any]]:

    for key, values in value.items():
        if not KEY_PATH.fullmatch(key) or key.split(".")[0] in ("name", "matrix", "sweep_criteria"):
            raise FieldError(f"matrix.{key}", "must be a key path of the spec (not name, matrix or sweep_criteria)")
        if not values:
            raise FieldError(f"matrix.{key}", "needs at least one value")
        for other in value:
            if other != key and other.startswith(key + "."):
                raise FieldError(f"matrix.{other}", f"lies inside matrix key {key!r}: set it in that key's values")
    if math.prod(len(values) for values in value.values()) > MAX_POINTS:
        raise FieldError("matrix", f"more than {MAX_POINTS} points")
    return value


Matrix = Annotated[dict[str, list[Any]], AfterValidator(_check_matrix)]
"""See `Spec.matrix`."""


def dose_axis(matrix: dict[str, list[Any]]) -> str | None:
    """The matrix's key when it is the only one and its values are numbers (a dose-response), else None."""
    if len(matrix) != 1:
        return None
    (key, values), = matrix.items()
    numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
    return key if numeric else None


def _check_criteria(spec: "Spec") -> None:
    """Criteria name the spec's statistics; sweep criteria name sweep statistics: `sweep.` then
    a criterion or a statistic of a point."""
    from harness.stages.criteria import check_criterion

    vocabulary = spec.grid.statistic_vocabulary()
    for name, expr in spec.criteria.items():
        try:
            check_criterion(expr, vocabulary)
        except ValueError as exc:
            raise FieldError(f"criteria.{name}", str(exc)) from None

    if spec.sweep_criteria and not spec.matrix:
        raise FieldError("sweep_criteria", "needs a matrix: a spec without one is a single run")
    sweep_vocabulary = vocabulary | SWEEP_KEYWORDS | {word for name in spec.criteria for word in words(name)}
    for name, expr in spec.sweep_criteria.items():
        if f".{SWEEP_TREND}." in expr and dose_axis(spec.matrix) is None:
            raise FieldError(f"sweep_criteria.{name}", f"a {SWEEP_TREND} needs a matrix of one key with numeric values")
        try:
            check_criterion(expr, sweep_vocabulary)
        except ValueError as exc:
            raise FieldError(f"sweep_criteria.{name}", str(exc)) from None


class Spec(StrictModel):
    """One experiment."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    """Run folder name: runs/<name>/<run id>/ (a file name: at most 100 characters)."""
    description: str = ""
    models: dict[str, ModelSpec]
    """Model aliases used by the capture and generated conditions."""
    dataset: Dataset = WikiTextDataset()
    """Where the samples come from (`harness.data_sources`): WikiText-2, a file, the hub."""
    conditions: dict[str, Condition]
    capture: CaptureSpec = CaptureSpec()
    metrics: list[str] = ["smoothness", "magnitude", "variance"]
    """Trajectory metrics (registered in metrics/), computed per layer; projection metrics
    (`projection_variance`, ...) are computed per layer and direction set."""
    directions: dict[str, DirectionSpec] = {}
    """Named direction sets for the projection metrics, e.g. `{refusal: {path: refusal.safetensors}}`:
    their statistics are named `<metric>.<direction>.<scope>.<stat>`
    (`projection_variance.refusal.layer11.d`)."""
    metric_options: dict[str, dict[str, Any]] = {}
    """Options of listed metrics, e.g. `{variance: {ddof: 1}}` (what each takes: its options
    model in metrics/); outputs keep the metric's name."""
    stats: StatsSpec = StatsSpec()
    criteria: dict[str, str] = {}
    """Name -> expression over statistic names, e.g. `smoothness.overall.d > 0`. Names are
    1-100 letters, digits, `_`, `-` or `.`: each prints on one result line and in RESULTS.md."""
    report: ReportSpec = ReportSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    matrix: Matrix = {}
    """pytest's `parametrize`: key path (as `--set` takes it) -> values; a run per point, one report."""
    sweep_criteria: dict[str, str] = {}
    """Criteria over the points: `sweep.<criterion>.passed_count`, `sweep.<stat>.median`, `sweep.<p>.p_bh.max`..."""

    @model_validator(mode="wrap")
    @classmethod
    def _positions_alias(cls, data: Any, handler: ModelWrapValidatorHandler["Spec"]) -> "Spec":
        """`stats.positions`, the old name of `capture.windows`, is accepted, with a note once
        the spec is valid (a bad spec gets its one error line only)."""
        data, renamed = _windows_from_positions(data)
        spec = handler(data)
        if renamed:
            _note_renamed("stats.positions", "capture.windows")
        return spec

    @field_validator("models", "conditions")
    @classmethod
    def _identifiers(cls, value: dict) -> dict:
        for key in value:
            if not re.fullmatch(IDENTIFIER, key):
                raise ValueError(f"name {quoted(key)} must be an identifier (letters, digits, _)")
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("criteria", "sweep_criteria")
    @classmethod
    def _criterion_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not CRITERION_NAME.fullmatch(name):
                raise ValueError(f"name {quoted(name)} must be 1 to 100 letters, digits, '_', '-' or '.'")
        return value

    @property
    def grid(self) -> Grid:
        """What the run measures: metric x site x direction set x window (`harness.grid`)."""
        return Grid.from_spec(self)

    @field_validator("metric_options")
    @classmethod
    def _known_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return _validated_options(value)

    @property
    def capture_model(self) -> str:
        return self.capture.model or next(iter(self.models))

    @property
    def dataset_tokenizer(self) -> str | None:
        """Who counts the dataset's tokens: a model alias, DATASET_TOKENIZER (one of its own), None (nobody)."""
        dataset = self.dataset
        if dataset.length_unit != "tokens" or not dataset.filters_length:
            return None
        if isinstance(dataset.tokenizer, ModelSpec):
            return DATASET_TOKENIZER
        return dataset.tokenizer or self.capture_model

    def model_spec(self, alias: str) -> ModelSpec:  # DATASET_TOKENIZER: the tokenizer `dataset.tokenizer` names
        return self.dataset.tokenizer if alias == DATASET_TOKENIZER else self.models[alias]

    @property
    def comparisons(self) -> dict[str, Comparison]:
        if self.stats.comparisons:
            return self.stats.comparisons
        a, b = list(self.conditions)[:2]
        return {f"{a}_vs_{b}": Comparison(a=a, b=b)}

    @model_validator(mode="after")
    def _references(self) -> "Spec":

        def need(kind: str, where: str, name: str, known) -> None:
            if name not in known:
                raise FieldError(where, f"unknown {kind} {quoted(name)} (known: {', '.join(sorted(known))})")

        _check_names(self)
        if len(self.conditions) < 2:
            raise FieldError("conditions", "needs at least two conditions to compare")
        need("model", "capture.model", self.capture_model, self.models)
        _check_dataset(self)
        for name, cond in self.conditions.items():
            for alias in cond.models(self):
                need("model", f"conditions.{name}.generator", alias, self.models)
            for parent in cond.derived_from():
                need("condition", f"conditions.{name}.of", parent, self.conditions)
                if self.conditions[parent].derived_from():
                    raise FieldError(f"conditions.{name}.of", f"{parent!r} is itself derived from another condition")
            cond.validate_in(name, self)
        for metric in self.metrics:
            need("metric", "metrics", metric, LAYER_METRICS.keys() | PROJECTION_METRICS.keys())
            if metric in PROJECTION_METRICS and not self.directions:
                raise FieldError("metrics", f"{metric!r} projects onto direction sets: name them under `directions:`")
        if len(set(self.metrics)) != len(self.metrics):
            raise FieldError("metrics", "lists a metric twice")
        for name in self.metric_options:
            if name not in self.metrics:
                raise FieldError(f"metric_options.{name}", f"{name!r} is not in metrics")
        for cmp_name, cmp in self.comparisons.items():
            if not re.fullmatch(IDENTIFIER, cmp_name):
                raise FieldError(f"stats.comparisons.{cmp_name}", "name must be an identifier")
            need("condition", f"stats.comparisons.{cmp_name}.a", cmp.a, self.conditions)
            need("condition", f"stats.comparisons.{cmp_name}.b", cmp.b, self.conditions)
            if cmp.a == cmp.b:
                raise FieldError(f"stats.comparisons.{cmp_name}", "compares a condition with itself")
        grid = self.grid
        for column in grid.whole_columns():
            if Column.parse(column.name) != column:
                raise FieldError("metrics", f"{column.metric!r} at site {column.site!r} is named {column.name!r}, "
                                            "which reads as another metric at another site: rename the metric")
        whole_columns = [column.name for column in grid.whole_columns()]
        x, y = self.stats.correlate
        need("text metric", "stats.correlate", x, TEXT_METRIC_NAMES)
        need("metric", "stats.correlate", y, whole_columns)
        if self.runtime.compile is True and self.capture.sites != [DEFAULT_SITE]:
            raise FieldError("runtime.compile", f"needs capture.sites: [{DEFAULT_SITE}] (sublayer hooks inside a compiled block)")
        if self.report.verdict:
            need("criterion", "report.verdict.rows", self.report.verdict.rows, self.criteria)
            need("criterion", "report.verdict.columns", self.report.verdict.columns, self.criteria)
        if self.report.threats.scale_free_metric:
            need("metric", "report.threats.scale_free_metric", self.report.threats.scale_free_metric, whole_columns)
        _check_criteria(self)
        return self


def _check_dataset(spec: Spec) -> None:
    """`dataset.tokenizer` names a model alias or a model of its own; every response column a
    condition reads is one the dataset has (a dataset of prompts only has none: its conditions
    must generate)."""
    tokenizer = spec.dataset.tokenizer
    if isinstance(tokenizer, str) and tokenizer not in spec.models:
        raise FieldError("dataset.tokenizer", f"unknown model {quoted(tokenizer)} (known: {', '.join(sorted(spec.models))})")
    responses = spec.dataset.response_names()
    has = f"only {', '.join(map(repr, responses))}" if responses else "no responses (prompts only: conditions must generate)"
    for name, condition in spec.conditions.items():
        for column in condition.responses():
            if column not in responses:
                field = f"conditions.{name}.column" if condition.source == "column" else f"conditions.{name}.source"
                raise FieldError(field, f"reads the dataset's response {column!r}, and the {spec.dataset.source} dataset has {has}")


def _windows_from_positions(data: Any) -> tuple[Any, bool]:
    """A spec's mapping with `stats.positions` moved to `capture.windows`, and whether it had
    windows there; an empty list (the old default, as every run folder's spec.yaml from before
    the rename holds) is dropped."""
    stats = data.get("stats") if isinstance(data, dict) else None
    if not isinstance(stats, dict) or "positions" not in stats:
        return data, False
    positions, capture = stats["positions"], data.get("capture")
    data = {**data, "stats": {key: value for key, value in stats.items() if key != "positions"}}
    if not positions:
        return data, False
    if isinstance(capture, dict) and "windows" in capture:
        raise FieldError("stats.positions", "is the old name of capture.windows; give only capture.windows")
    try:
        windows = TypeAdapter(Windows).validate_python(positions)
    except ValidationError as exc:
        raise FieldError("stats.positions", exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return {**data, "capture": {**(capture if isinstance(capture, dict) else {}), "windows": windows}}, True


@functools.cache
def _note_renamed(old: str, new: str) -> None:
    """One line (once per process) on a field given under its old name."""
    logger.warning(f"note: {old} is deprecated: it is now {new}, same meaning (rename it in the spec)")


def _validated_options(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`metric_options`, each validated by its metric's options model."""

    validated = {}
    for name, options in value.items():
        if name not in METRIC_OPTIONS:
            known = ", ".join(sorted(METRIC_OPTIONS))
            raise FieldError(f"metric_options.{name}", f"takes no options (metrics with options: {known})")
        try:
            validated[name] = METRIC_OPTIONS[name].model_validate(options).model_dump()
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(["metric_options", name, *map(str, error["loc"])])
            raise FieldError(field, "unknown key" if error["type"] == "extra_forbidden" else error["msg"]) from None
    return validated


def _check_names(spec: Spec) -> None:
    """Condition, comparison and direction names are single words of statistic names: none may
    be a word the names already use (a metric, a keyword, `layer<N>`, `window<S>_<E>`), and a
    direction set must not share a name with a condition or comparison."""

    reserved = (set(STAT_KEYWORDS) | set(LAYER_METRICS) | set(PROJECTION_METRICS) | set(TEXT_METRIC_NAMES)
                | set(INTERVENED_TEXT_METRIC_NAMES))
    reserved |= {column.metric_at_site for column in spec.grid.whole_columns()}
    for kind, names in (("conditions", spec.conditions), ("stats.comparisons", spec.stats.comparisons or {}),
                        ("directions", spec.directions)):
        taken = reserved | (set(spec.conditions) | set(spec.stats.comparisons or {}) if kind == "directions" else set())
        for name in names:
            if kind == "directions" and not re.fullmatch(IDENTIFIER, name):
                raise FieldError(f"directions.{name}", f"name {quoted(name)} must be an identifier (letters, digits, _)")
            if name in taken or LAYER_SCOPE.fullmatch(name) or is_axis_word(name):
                raise FieldError(f"{kind}.{name}", f"{name!r} is reserved for statistic names; choose another name")
