"""Spec loading: inheritance, resolved values, and one-line errors naming file and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.errors import InputError
from harness.spec import load_spec, spec_json_schema

REPO = Path(__file__).resolve().parent.parent

BASE = """
name: base
models:
  base: {id: some/model}
conditions:
  human: {source: human}
  model: {source: generate, generation: {max_new_tokens: 20}}
criteria:
  smoother: smoothness.overall.d > 0
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", """
        extends: base.yaml
        name: child
        conditions:
          model: {generation: {temperature: 0.7, seed: 3}}
          shuffled: {source: shuffle, of: model}
        metrics: [smoothness]
        criteria:
          smoother: null
          less_surprising: ce_loss.model.mean < ce_loss.human.mean
    """)
    spec = load_spec(child)
    assert spec.name == "child"
    generation = spec.conditions["model"].generation
    assert (generation.temperature, generation.seed, generation.max_new_tokens) == (0.7, 3, 20)
    assert list(spec.conditions) == ["human", "model", "shuffled"]
    assert spec.metrics == ["smoothness"]
    assert spec.criteria == {"less_surprising": "ce_loss.model.mean < ce_loss.human.mean"}
    assert list(spec.comparisons) == ["human_vs_model"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset: {n_samples: 2}", r"base.yaml: dataset.n_samples: Input should be greater than or equal to 3"),
        ("dataset: {min_tokens: 50, max_tokens: 10}", r"dataset: min_tokens \(50\) is larger than max_tokens"),
        (
            "conditions: {model: {generation: {temprature: 1}}}",
            r"conditions.model.generation.temprature: unknown key",
        ),
        ("conditions: {extra: {of: human}}", r"conditions.extra.source: missing: one of human, column, generate, shuffle"),
        ("metrics: [smoothnes]", r"metrics: unknown metric 'smoothnes'"),
        ("criteria: {x: 'smoothness.overall.d > 0 and'}", r"criteria.x: "),
        ("criteria: {x: 'ce_loss.hman.mean > 1'}", r"criteria.x: unknown name 'hman'"),
        ("stats: {comparisons: {c: {a: human, b: robot}}}", r"stats.comparisons.c.b: unknown condition 'robot'"),
    ],
)
def test_errors_name_file_and_field(tmp_path, override, message):
    write(tmp_path, "parent.yaml", BASE)
    path = write(tmp_path, "base.yaml", "extends: parent.yaml\n" + override + "\n")
    with pytest.raises(InputError, match=message) as caught:
        load_spec(path)
    assert "\n" not in str(caught.value)


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(InputError, match="circular"):
        load_spec(tmp_path / "a.yaml")


def test_shipped_specs_validate():
    specs = sorted((REPO / "specs").glob("*.yaml"))
    assert len(specs) >= 3
    for path in specs:
        assert load_spec(path).criteria, path


def test_json_schema_describes_the_spec():
    schema = spec_json_schema()
    assert {"models", "conditions", "criteria", "extends"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
