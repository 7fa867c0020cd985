"""Conditions stage: the texts each condition gives for every sample, from its registered
source (`harness.sources`), in dependency order; a source's generation runs as the
generation stage (`harness.stages.generate`), which measures the texts while decoding them
where it can (`harness.stages.decode_capture`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.intervening import Applied
from harness.sources import SOURCES, ConditionSpec, GenerationSpec, SourceContext, Text
from harness.stages.decode_capture import blocker
from harness.stages.generate import GenerateStage, compiled_decoding, planned_device_type

if TYPE_CHECKING:
    from harness.directions import DirectionSet
    from harness.executor import Executor
    from harness.pool import ModelPool
    from harness.schema import Spec
    from harness.stages.capture import CaptureSettings


def condition_texts(
    spec: "Spec", samples: list[dict], executor: "Executor", pool: "ModelPool",
    directions: dict[str, "DirectionSet"] | None = None, capture: "CaptureSettings | None" = None,
    decoded: dict[str, list[dict | None]] | None = None,
) -> dict[str, list[Text]]:
    """Every condition's texts, in the spec's order (computed in dependency order). With
    `capture` (the capture stage's settings), a generation that may be measured while decoding
    is, and its condition's capture records (None: left to the forward) go into `decoded`."""

    def generate(stage_name: str, alias: str, prompts: list[str], settings: GenerationSpec,
                 intervention: str | None = None, measure_as: str | None = None) -> list[dict]:
        runtime = spec.runtime
        # a chat model continues its template's formatting of the prompt (one BOS: harness.chat)
        chat = spec.model_spec(alias).chat
        model_prompts = [pool.model_prompt(alias, prompt) for prompt in prompts] if chat else prompts
        steering = Applied.of(intervention, spec, directions or {}) if intervention is not None else None
        batch_size = runtime.generation_batch_size
        if steering is not None:  # `runtime.compile: true` beside an intervention is refused at collection
            compiled, decoding = False, "eager (an intervention's hooks run eagerly)"
        else:
            rows = len(prompts) if batch_size == "auto" else min(batch_size, len(prompts))
            compiled, decoding = compiled_decoding(runtime.compile, planned_device_type(pool.placement(alias)), rows)
        measure = (capture if capture is not None and decoded is not None and measure_as is not None
                   and steering is None and blocker(spec, alias, compiled) is None else None)
        output = executor.run(GenerateStage(
            stage_name, model_prompts, alias, settings, batch_size, compiled, pool,
            steering, special_tokens=not chat, capture=measure, decoding=decoding,
        ))
        if measure is not None:
            decoded[measure_as] = [out["capture"] for out in output]
        return output

    context = SourceContext(spec, samples, executor, pool, generate)
    for name in execution_order(spec.conditions):
        condition = spec.conditions[name]
        context.texts[name] = SOURCES[condition.source].texts(name, condition, context)
    return {name: context.texts[name] for name in spec.conditions}


def execution_order(conditions: dict[str, ConditionSpec]) -> list[str]:
    """Condition names with every condition after those it is derived from (stable otherwise)."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for parent in conditions[name].derived_from():
                visit(parent)
            ordered.append(name)

    for name in conditions:
        visit(name)
    return ordered
