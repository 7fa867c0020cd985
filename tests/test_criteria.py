"""Criteria: the safe evaluator, its error messages, and the pytest-style reporting."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace
from typing import Callable

import pytest

from harness.artifacts import json_text
from harness.numbers import format_number
from harness.stages.criteria import (
    CriterionResult,
    check_criterion,
    evaluate_criteria,
    format_result,
    statistic_names,
    summary_line,
    to_json,
)

VOCABULARY = {
    # what Spec.statistic_vocabulary() holds: metrics, text metrics, conditions, comparisons, keywords
    "smoothness", "magnitude", "ce_loss", "human", "model", "human_vs_model",
    "overall", "d", "p", "p_holm", "mean",
}  # fmt: skip


def namespace(stats: dict[str, float]) -> SimpleNamespace:
    """The flat stats as nested attributes, so Python itself can evaluate the same expression."""
    root = SimpleNamespace()
    for name, value in stats.items():
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, SimpleNamespace())
            node = getattr(node, part)
        setattr(node, leaf, value)
    return root


# Each criterion next to the same expression written as Python: the independent oracle.
ALLOWED: list[tuple[str, Callable[[SimpleNamespace], bool]]] = [
    ("smoothness.overall.d > 0 and smoothness.overall.p < 0.05",
     lambda s: s.smoothness.overall.d > 0 and s.smoothness.overall.p < 0.05),
    ("ce_loss.human.mean > ce_loss.model.mean",
     lambda s: s.ce_loss.human.mean > s.ce_loss.model.mean),
    ("human_vs_model.smoothness.layer3.p_holm < 0.05",
     lambda s: s.human_vs_model.smoothness.layer3.p_holm < 0.05),
    ("not (smoothness.overall.d < -0.2)",
     lambda s: not (s.smoothness.overall.d < -0.2)),
    ("0 < smoothness.overall.d <= 2",
     lambda s: 0 < s.smoothness.overall.d <= 2),
    ("-1 <= smoothness.overall.d < ce_loss.human.mean >= +1",
     lambda s: -1 <= s.smoothness.overall.d < s.ce_loss.human.mean >= +1),
    ("smoothness.overall.p <= 1e-3 or smoothness.overall.d == 2 or not smoothness.overall.p != 0.05",
     lambda s: s.smoothness.overall.p <= 1e-3 or s.smoothness.overall.d == 2 or not s.smoothness.overall.p != 0.05),
    ("(smoothness.overall.d > 1 or ce_loss.human.mean > 2) and not (smoothness.overall.p > 0.01 and -2.5e-1 < 0)",
     lambda s: (s.smoothness.overall.d > 1 or s.ce_loss.human.mean > 2)
     and not (s.smoothness.overall.p > 0.01 and -2.5e-1 < 0)),
]  # fmt: skip

# A grid of statistics on both sides of every threshold used above.
GRID = [
    {
        "smoothness.overall.d": d,
        "smoothness.overall.p": p,
        "ce_loss.human.mean": human,
        "ce_loss.model.mean": 1.45,
        "human_vs_model.smoothness.layer3.p_holm": p,
    }
    for d, p, human in itertools.product([-3, -0.2, 0, 1.49, 2, 5], [1e-4, 1e-3, 0.01, 0.05, 0.5], [0.5, 1.45, 2.99])
]


@pytest.mark.parametrize("expr, oracle", ALLOWED, ids=[expr for expr, _ in ALLOWED])
def test_allowed_expressions_evaluate_like_python(expr: str, oracle: Callable[[SimpleNamespace], bool]) -> None:
    check_criterion(expr, VOCABULARY)
    verdicts = []
    for stats in GRID:
        [result] = evaluate_criteria({"c": expr}, stats)
        assert result.error is None
        assert result.passed is oracle(namespace(stats)), stats
        verdicts.append(result.passed)
    assert set(verdicts) == {True, False}  # the grid exercises both outcomes


def test_criterion_may_span_lines_and_prints_on_one() -> None:
    stats = {"smoothness.overall.d": 1.0, "smoothness.overall.p": 0.01}
    [result] = evaluate_criteria({"c": "smoothness.overall.d > 0\n  and smoothness.overall.p < 0.05\n"}, stats)
    assert result.passed and result.error is None
    assert "\n" not in format_result(result)


def test_statistic_names_in_order_and_unique() -> None:
    expr = "ce_loss.model.mean < ce_loss.human.mean and (0 < smoothness.overall.d or ce_loss.model.mean > 1)"
    assert statistic_names(expr) == ["ce_loss.model.mean", "ce_loss.human.mean", "smoothness.overall.d"]


@pytest.mark.parametrize(
    "expr, construct",
    [
        ("abs(smoothness.overall.d) > 0", "function call"),
        ("__import__('os').system('x')", "function call"),
        ("smoothness.__class__ > 0", "'__class__'"),
        ("_private.d > 0", "'_private'"),
        ("smoothness.overall[0] > 0", "subscript"),
        ("smoothness.overall.d > 'x'", "string"),
        ("smoothness.overall.d > (lambda: 1)", "lambda"),
        ("[x for x in smoothness] > 0", "list comprehension"),
        ("f'{smoothness}' > 0", "f-string"),
        ("(smoothness := 1) > 0", "assignment expression"),
        ("smoothness.overall.d + 1 > 0", "arithmetic"),
        ("smoothness.overall.d > 2 * 3", "arithmetic"),
        ("True", "boolean constant"),
        ("smoothness.overall.d > True", "boolean constant"),
        ("smoothness.overall.d != None", "None"),
        ("smoothness.overall.d > 1j", "complex"),
        ("smoothness.overall.d in 1", "operator 'in'"),
        ("smoothness.overall.d is not 1", "operator 'is not'"),
        ("-smoothness.overall.d > 0", "unary sign"),
        ("~1 < smoothness.overall.d", "~"),
        ("(1).real > 0", "non-name expression"),
        ("smoothness.overall.d > (1 if smoothness.overall.p else 2)", "conditional expression"),
        ("smoothness.overall.d", "not a condition"),
        ("not smoothness.overall.d and smoothness.overall.p < 1", "not a condition"),
        ("(smoothness.overall.d > 0) == (smoothness.overall.p < 1)", "cannot be used as a value"),
        ("smoothness.overall.d >", "does not parse"),
        ("(smoothness.overall.d > 0", "does not parse"),
        ("   ", "empty"),
        ("smoothness.overall.d < 1" + "0" * 400, "too large"),
        ("not " * 5000 + "smoothness.overall.d > 0", "nested too deeply"),
    ],
)
def test_disallowed_constructs_are_named(expr: str, construct: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_criterion(expr, VOCABULARY)
    message = str(caught.value)
    assert construct in message
    assert "\n" not in message


def test_evaluation_never_executes_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("os.system", calls.append)
    [result] = evaluate_criteria({"evil": "__import__('os').system('x')"}, {})
    assert calls == []
    assert result.passed is False and "function call" in result.error
    assert format_result(result).startswith("ERROR evil: ")


def test_unknown_segment_suggests_close_matches() -> None:
    with pytest.raises(ValueError) as caught:
        check_criterion("ce_loss.human.mean > ce_loss.hman.mean", VOCABULARY)
    message = str(caught.value)
    assert message.startswith("unknown name 'hman' in 'ce_loss.hman.mean' (did you mean 'human'")


def test_unknown_segment_without_close_match_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown name 'zzz' in 'smoothness.zzz.d' \(known: ") as caught:
        check_criterion("smoothness.zzz.d > 0", VOCABULARY)
    assert all(word in str(caught.value) for word in VOCABULARY)


@pytest.mark.parametrize("expr", ["smoothness.layer0.d > 0", "human_vs_model.smoothness.layer25.p_holm < 0.05"])
def test_layer_segments_are_accepted(expr: str) -> None:
    check_criterion(expr, VOCABULARY)


@pytest.mark.parametrize("segment", ["layerx", "layer", "layer3a"])
def test_malformed_layer_segments_are_unknown(segment: str) -> None:
    with pytest.raises(ValueError, match=f"unknown name '{segment}'"):
        check_criterion(f"smoothness.{segment}.d > 0", VOCABULARY)


def test_every_name_must_be_computed_even_if_short_circuited() -> None:
    stats = {"smoothness.overall.d": 1.0}
    [result] = evaluate_criteria({"c": "smoothness.overall.d > 0 or smoothness.overall.p < 0.05"}, stats)
    assert result.passed is False
    assert result.error == "statistic smoothness.overall.p not computed"
    assert result.values == {"smoothness.overall.d": 1.0, "smoothness.overall.p": None}


def test_several_missing_names_and_none_values_are_not_computed() -> None:
    [result] = evaluate_criteria({"c": "a.d > 0 and b.d > 0 and c.d > 0"}, {"a.d": None, "c.d": 1.0})
    assert result.passed is False
    assert result.error == "statistics a.d, b.d not computed"


@pytest.mark.parametrize("expr", ["x.d > 0", "x.d != 0", "not (x.d < 0)", "0 < 1 <= x.d", "y.d > 1 or x.d > 0"])
def test_consulted_nan_fails_with_error(expr: str) -> None:
    [result] = evaluate_criteria({"c": expr}, {"x.d": math.nan, "y.d": 0.0})
    assert result.passed is False
    assert result.error == "x.d is NaN"
    assert format_result(result).startswith("ERROR c: ")


@pytest.mark.parametrize(
    "expr, passed", [("y.d > 0 or x.d > 0", True), ("y.d < 0 and x.d > 0", False), ("2 < y.d < x.d", False)]
)
def test_nan_skipped_by_short_circuit_is_no_error(expr: str, passed: bool) -> None:
    [result] = evaluate_criteria({"c": expr}, {"x.d": math.nan, "y.d": 1.0})
    assert result.error is None
    assert result.passed is passed


def test_several_nan_names_are_listed() -> None:
    [result] = evaluate_criteria({"c": "x.d != y.d or y.d > x.d"}, {"x.d": math.nan, "y.d": math.nan})
    assert result.error == "x.d, y.d are NaN"


def test_invalid_expression_becomes_an_error_result_not_an_exception() -> None:
    results = evaluate_criteria({"bad": "a.d >", "good": "a.d > 0"}, {"a.d": 1.0})
    assert [r.name for r in results] == ["bad", "good"]
    assert results[0].passed is False and "does not parse" in results[0].error
    assert results[1].passed is True and results[1].error is None


def test_format_result_lines() -> None:
    stats = {"smoothness.overall.d": 1.5, "smoothness.overall.p": 0.25}
    expr = "smoothness.overall.d > 0 and smoothness.overall.p < 0.05"
    [failed] = evaluate_criteria({"smoother": expr}, stats)
    assert format_result(failed) == f"FAILED smoother: {expr} [smoothness.overall.d=1.5, smoothness.overall.p=0.25]"
    [passed] = evaluate_criteria({"smoother": "smoothness.overall.d > 0"}, stats)
    assert format_result(passed) == "PASSED smoother: smoothness.overall.d > 0 [smoothness.overall.d=1.5]"
    [error] = evaluate_criteria({"smoother": "smoothness.layer3.d > 0"}, stats)
    assert format_result(error) == (
        "ERROR smoother: smoothness.layer3.d > 0 [smoothness.layer3.d=not computed]"
        " - statistic smoothness.layer3.d not computed"
    )


@pytest.mark.parametrize("value", [193.8123, 1.4937, -0.65123, 0.0123456, 12345.678, 0.00031234, 2.5e-9, -4.4e-5])
def test_numbers_show_four_significant_digits(value: float) -> None:
    shown = format_number(value)
    assert float(shown) == pytest.approx(value, rel=5e-4)
    mantissa = shown.split("e")[0].lstrip("-").replace(".", "").lstrip("0")
    assert len(mantissa) <= 4
    assert ("e" in shown) == (abs(value) < 1e-3 or abs(value) >= 1e4)


def test_summary_line_wording() -> None:
    def result(passed: bool, error: str | None = None) -> CriterionResult:
        return CriterionResult("c", "x.d > 0", passed, {}, error)

    assert summary_line([]) == "no criteria"
    assert summary_line([result(True)]) == "1 passed"
    assert summary_line([result(False)]) == "1 failed"
    many = [result(True), result(False, "x.d is NaN"), result(True), result(False)]
    assert summary_line(many) == "2 passed, 2 failed"


def test_criteria_json_is_strict_json_with_nan_spelled_out() -> None:
    results = evaluate_criteria({"a": "x.d > 0 or y.d > 0", "b": "z.d > 0"}, {"x.d": 1.0, "y.d": math.nan})
    rows = json.loads(json_text(to_json(results)))
    assert rows == [
        {"name": "a", "expr": "x.d > 0 or y.d > 0", "passed": True,
         "values": {"x.d": 1.0, "y.d": "nan"}, "error": None},
        {"name": "b", "expr": "z.d > 0", "passed": False,
         "values": {"z.d": None}, "error": "statistic z.d not computed"},
    ]
