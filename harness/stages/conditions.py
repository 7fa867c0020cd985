"""Conditions stage: the texts each condition gives for every sample, from its registered
source (`harness.sources`), in dependency order; a source's generation runs as the
generation stage (`harness.stages.generate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.intervening import Applied
from harness.sources import SOURCES, ConditionSpec, GenerationSpec, SourceContext, Text
from harness.stages.generate import GenerateStage

if TYPE_CHECKING:
    from harness.directions import DirectionSet
    from harness.executor import Executor
    from harness.pool import ModelPool
    from harness.schema import Spec


def condition_texts(spec: "Spec", samples: list[dict], executor: "Executor", pool: "ModelPool",
                    directions: dict[str, "DirectionSet"] | None = None) -> dict[str, list[Text]]:
    """Every condition's texts, in the spec's order (computed in dependency order)."""

    def generate(stage_name: str, alias: str, prompts: list[str], settings: GenerationSpec,
                 intervention: str | None = None) -> list[dict]:
        runtime = spec.runtime
        # a chat model continues its template's formatting of the prompt (one BOS: harness.chat)
        chat = spec.model_spec(alias).chat
        model_prompts = [pool.model_prompt(alias, prompt) for prompt in prompts] if chat else prompts
        steering = Applied.of(intervention, spec, directions or {}) if intervention is not None else None
        return executor.run(GenerateStage(
            stage_name, model_prompts, alias, settings, runtime.generation_batch_size, runtime.compile, pool,
            steering, special_tokens=not chat,
        ))

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
