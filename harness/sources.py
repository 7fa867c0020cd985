"""Condition sources: the registry of what a spec's `conditions:` may name, the built-in
sources and their spec models (data only: nothing here imports a stage or torch, so the spec
schema is built from this registry without them).

A condition *source* is one registered function plus its pydantic spec model (the model's
``source`` literal is the name a spec uses):

    class ReversedCondition(ConditionSpec):
        source: Literal["reverse"]
        of: str

        def derived_from(self) -> list[str]:
            return [self.of]

    @condition_source(ReversedCondition)
    def reverse(name, condition, context) -> list[Text]:
        return [text(t["prompt"], " ".join(t["response"].split()[::-1])) for t in context.texts[condition.of]]

The spec schema's ``conditions`` union is built from this registry, so a new source needs
no edit elsewhere (from another package: a `harness.plugins` entry point, `harness.registry`).
Sources run in dependency order (``derived_from``); a source that needs a model says so in
``models`` so the run loads and checks it before anything is computed, and a check that needs
the loaded model (`condition_source(..., check=fn)`) runs when the run is collected.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from harness.base import FieldError, StrictModel
from harness.data_sources import HUMAN
from harness.errors import InputError
from harness.interventions import At, Do, During
from harness.registry import Registry
from harness.sites import SITES

if TYPE_CHECKING:
    from harness.executor import Executor
    from harness.pool import ModelPool
    from harness.schema import Spec

Text = dict[str, Any]
"""One condition's text for one sample: prompt, response, stopped_early, generator."""


def text(prompt: str, response: str, stopped_early: bool | None = None, generator: str | None = None) -> Text:
    return {"prompt": prompt, "response": response, "stopped_early": stopped_early, "generator": generator}


class ConditionSpec(StrictModel):
    """Base of every condition source's spec model."""

    source: str

    def derived_from(self) -> list[str]:
        """Conditions whose texts this one is built from (computed first)."""
        return []

    def models(self, spec: "Spec") -> list[str]:
        """Model aliases this source loads or tokenizes with."""
        return []

    def responses(self) -> list[str]:
        """The dataset's response columns it reads (the spec checks the dataset has them)."""
        return []

    def random_seed(self) -> int | None:
        """The seed of its randomness, for the run manifest (None: deterministic)."""
        return getattr(self, "seed", None)

    def validate_in(self, name: str, spec: "Spec") -> None:
        """Checks against the rest of the spec (run by its validation): raise FieldError naming the field."""


@dataclass
class SourceContext:
    """What a source may use while it computes its texts."""

    spec: "Spec"
    samples: list[dict]
    """The data stage's samples: sample_id, row, id, prompt, responses (by name), covariates, length."""
    executor: "Executor"
    """Runs (and caches) a stage: `context.executor.run(stage)`."""
    pool: "ModelPool"
    """The run's models, loaded on first use."""
    generate: Callable[..., list[dict]]
    """`generate(stage_name, model_alias, prompts, settings, intervention=None, measure_as=None)`:
    the generation stage's continuations (response, n_new_tokens, stopped_early per prompt),
    cached like any stage; `intervention`: the `intervene` condition whose hooks are on while it
    generates; `measure_as`: the condition whose texts these continuations are, unchanged, which
    the capture stage may then measure while decoding them (`harness.stages.decode_capture`)."""
    texts: dict[str, list[Text]] = field(default_factory=dict)
    """Texts of the conditions computed so far (every condition in `derived_from` is there)."""


Check = Callable[[str, Any, "Spec", "ModelPool"], None]
"""`check(name, condition, spec, pool)`: a check that needs the models, run when the run is
collected (before any stage); raises InputError naming the field."""


@dataclass(frozen=True)
class ConditionSource:
    spec_model: type[ConditionSpec]
    texts: Callable[[str, Any, SourceContext], list[Text]]
    check: Check | None = None


SOURCES: Registry[ConditionSource] = Registry("condition source")
"""Registered condition sources by the name a spec's `source:` uses."""


def condition_source(spec_model: type[ConditionSpec], check: Check | None = None):
    """Register `fn(name, condition, context) -> list[Text]` for `spec_model`'s `source` literal."""
    (name,) = spec_model.model_fields["source"].annotation.__args__

    def register(fn: Callable[[str, Any, SourceContext], list[Text]]):
        SOURCES.add(name, ConditionSource(spec_model, fn, check), fn.__module__)
        return fn

    return register


# --- the built-in sources ---------------------------------------------------------------


class GenerationSpec(StrictModel):
    """How a model continues the prompt."""

    max_new_tokens: int = Field(90, gt=0)
    min_new_tokens: int = Field(1, ge=0)
    """EOS is suppressed until this many tokens are out (0: no minimum, as the reference)."""
    temperature: float = Field(0.0, ge=0)
    """0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    """Sampling keeps the k likeliest tokens; 0: no cut. 50 is transformers' default, which the
    reference used."""
    repetition_penalty: float = Field(1.0, gt=0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    seed: int = 0


class HumanCondition(ConditionSpec):
    """The human-written rest of the paragraph: the dataset's `human` response (WikiText's)."""

    source: Literal["human"]

    def responses(self) -> list[str]:
        return [HUMAN]


class ColumnCondition(ConditionSpec):
    """A response column of the dataset (`dataset.responses`): `chosen`/`rejected`, `reference`..."""

    source: Literal["column"]
    column: str
    """The response's name in `dataset.responses` (the harness's name, not the file's)."""

    def responses(self) -> list[str]:
        return [self.column]


class GeneratedCondition(ConditionSpec):
    """A model's continuation of the prompt."""

    source: Literal["generate"]
    generator: str | None = None
    """Model alias that writes the text; default: the capture model."""
    generation: GenerationSpec = GenerationSpec()

    def models(self, spec: "Spec") -> list[str]:
        return [self.generator or spec.capture_model]

    def random_seed(self) -> int | None:
        return self.generation.seed


class ShuffledCondition(ConditionSpec):
    """Another condition's response with its words (or tokens) shuffled: a control."""

    source: Literal["shuffle"]
    of: str
    """Condition whose response is shuffled."""
    unit: Literal["words", "tokens"] = "words"
    """Shuffle whitespace-separated words, or the capture tokenizer's tokens."""
    seed: int = 0

    def derived_from(self) -> list[str]:
        return [self.of]

    def models(self, spec: "Spec") -> list[str]:
        return [spec.capture_model] if self.unit == "tokens" else []


@condition_source(ColumnCondition)
@condition_source(HumanCondition)
def column(name: str, condition: HumanCondition | ColumnCondition, context: SourceContext) -> list[Text]:
    (response,) = condition.responses()
    return [text(sample["prompt"], sample["responses"][response]) for sample in context.samples]


def _generation_fits(name: str, condition: GeneratedCondition, spec: "Spec", pool: "ModelPool") -> None:
    # every prompt holds at least one token: more new tokens than the context minus one never fit
    pool.check_fits_context(
        condition.models(spec)[0], condition.generation.max_new_tokens, 1, f"conditions.{name}.generation.max_new_tokens"
    )


@condition_source(GeneratedCondition, check=_generation_fits)
def generate(name: str, condition: GeneratedCondition, context: SourceContext) -> list[Text]:
    return _generated(name, condition, context)


def _generated(name: str, condition: GeneratedCondition, context: SourceContext, intervention: str | None = None) -> list[Text]:
    """`condition`'s generation of every prompt (`intervention`: the `intervene` condition shaping it)."""
    (alias,) = condition.models(context.spec)
    prompts = [sample["prompt"] for sample in context.samples]
    # a plain generation is this condition's text as decoded: it may be measured while decoding
    output = context.generate(f"generate[{name}]", alias, prompts, condition.generation, intervention,
                              measure_as=name if intervention is None else None)
    return [text(prompt, out["response"], out["stopped_early"], alias) for prompt, out in zip(prompts, output)]


@condition_source(ShuffledCondition)
def shuffle(name: str, condition: ShuffledCondition, context: SourceContext) -> list[Text]:
    """The source condition's responses with words (or capture-model tokens) shuffled."""
    texts = []
    for sample_id, source in enumerate(context.texts[condition.of]):
        rng = random.Random(f"{condition.seed}:{sample_id}")
        if condition.unit == "words":
            pieces = source["response"].split()
            rng.shuffle(pieces)
            response = " ".join(pieces)
        else:
            tokenizer = context.pool.tokenizer(context.spec.capture_model)
            ids = tokenizer(source["response"], add_special_tokens=False)["input_ids"]
            rng.shuffle(ids)
            response = tokenizer.decode(ids).strip()
        texts.append(text(source["prompt"], response))
    return texts


class InterventionCondition(ConditionSpec):
    """Another condition's forward (or generation) with its activations changed: steer, ablate, patch."""

    source: Literal["intervene"]
    of: str
    """The condition whose texts it reads (`during: capture`) or whose generation it shapes."""
    at: At
    do: Do
    during: During = "capture"
    """`capture`: the measured forward of `of`'s texts; `generate`: `of`'s generation (measured
    unchanged); `both`."""

    def derived_from(self) -> list[str]:
        source = self.do.spec.patched_from()
        return [self.of] + ([source] if source and source != self.of else [])

    def models(self, spec: "Spec") -> list[str]:
        return spec.conditions[self.of].models(spec) if self.during != "capture" else []

    def validate_in(self, name: str, spec: "Spec") -> None:
        where, kind, settings = f"conditions.{name}", self.do.kind, self.do.spec
        if self.at.site not in SITES:
            raise FieldError(f"{where}.at.site", f"unknown capture site {self.at.site!r} (known: {', '.join(sorted(SITES))})")
        for direction in settings.direction_sets():
            if direction not in spec.directions:
                known = ", ".join(sorted(spec.directions)) or "none: name one under `directions:`"
                raise FieldError(f"{where}.do.{kind}.direction", f"unknown direction set {direction!r} (known: {known})")
        if spec.runtime.compile is True:
            raise FieldError("runtime.compile", f"interventions ({where}) run eagerly: set runtime.compile: false")
        of = spec.conditions[self.of]
        if self.during != "capture":
            if not isinstance(of, GeneratedCondition):
                raise FieldError(f"{where}.during", f"{self.during!r} shapes a generation, and {self.of!r} does not "
                                                     f"generate (source: {of.source}): use during: capture")
            if of.models(spec) != [spec.capture_model]:
                raise FieldError(f"{where}.during", f"steering a generation needs the capture model as generator "
                                                     f"(directions are checked against it), not {of.models(spec)[0]!r}")
            if settings.needs_whole_text() or settings.patched_from():
                raise FieldError(f"{where}.do.{kind}", "acts on whole texts: use during: capture")
        source = settings.patched_from()
        if source is not None:
            if source not in spec.conditions:
                raise FieldError(f"{where}.do.patch.from", f"unknown condition {source!r} (known: {', '.join(spec.conditions)})")
            positions = settings.positions(self.at)
            if source != self.of and positions != "prompt" and not spec.capture.length_matching:
                raise FieldError(f"{where}.do.patch.from", f"{self.of!r} and {source!r} have different texts, whose token "
                                 f"counts at positions {positions} cannot match: set capture.length_matching: true, "
                                 "or patch positions: prompt")


def _intervention_fits(name: str, condition: InterventionCondition, spec: "Spec", pool: "ModelPool") -> None:
    """The layers and the site exist in the capture model (its structure: loads the model)."""
    from harness.structure import decoder_blocks, resolve_sites  # imports torch: only once a run is collected

    model = pool.model(spec.capture_model).model
    try:
        condition.at.layer_list(len(decoder_blocks(model)))
    except ValueError as exc:
        raise InputError(f"{pool.spec_path}: conditions.{name}.at.layers: {exc}") from None
    try:
        resolve_sites(model, [condition.at.site])
    except ValueError as exc:
        raise InputError(f"{pool.spec_path}: conditions.{name}.at.site: {exc}") from None


@condition_source(InterventionCondition, check=_intervention_fits)
def intervene(name: str, condition: InterventionCondition, context: SourceContext) -> list[Text]:
    """`of`'s texts (`during: capture`), or its generation with the intervention's hooks on."""
    if condition.during == "capture":
        return [dict(source) for source in context.texts[condition.of]]
    return _generated(name, context.spec.conditions[condition.of], context, name)
