"""Success criteria: declarative boolean expressions over statistic names.

A criterion such as ``smoothness.overall.d > 0 and smoothness.overall.p < 0.05`` is parsed
with :mod:`ast` and walked by a small evaluator; it is never compiled or ``eval``-ed. The
grammar is deliberately tiny:

- conditions: comparisons (``<  <=  >  >=  ==  !=``, chains like ``0 < x <= 2``),
  combined with ``and`` / ``or`` / ``not`` and parentheses;
- values (the operands of a comparison): statistic names, which are dotted identifiers
  (``human_vs_model.smoothness.layer3.p_holm``) looked up in a FLAT stats dict, and numbers
  (``2``, ``-0.2``, ``1e-3``), optionally with a unary sign.

Everything else is rejected with a message naming the construct: calls, subscripts,
strings, ``True``/``None``, lambdas, comprehensions, f-strings, ``:=``, arithmetic
(criteria compare statistics; they do not compute new ones), ``in``/``is``, attribute
access on anything but a name, and any name segment starting with ``_``. A bare value is
not a condition (``x.overall.d and ...`` is an error: say ``x.overall.d != 0``), and a
comparison is not a value (``(a < b) == (c < d)`` is an error).

Evaluation follows Python: ``and``/``or`` short-circuit, chains compare pairwise. Decisions:

- every statistic a criterion names must be in the stats (even one a short-circuit would
  skip); otherwise the criterion fails with ``error="statistic X not computed"`` and is not
  evaluated. A ``None`` value counts as not computed;
- a comparison involving NaN is False (``!=`` included), and a criterion that consulted a
  NaN fails with ``error="X is NaN"`` whatever its boolean outcome: a verdict resting on a
  NaN is not trustworthy (``not (x < 0)`` must not pass because ``x`` is NaN);
- so ``passed`` is always a bool, and ``passed`` is False whenever ``error`` is set;
  ``format_result`` shows such results as ERROR, ``summary_line`` counts them as failed;
- an expression that does not parse or uses a disallowed construct becomes an ERROR
  result too, so one bad criterion does not hide the verdicts of the others;
- whitespace (newlines included) is collapsed first: a criterion may span lines in YAML.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass

from harness.errors import quoted
from harness.numbers import format_number
from harness.statnames import LAYER_SCOPE, words


ALLOWED = "criteria use only comparisons, and/or/not, numbers and statistic names"

_COMPARISONS: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}

_SIGNS: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}

_CONSTRUCT_NAMES: dict[type[ast.AST], str] = {  # anything else is named by its ast class
    ast.Call: "function call",
    ast.Subscript: "subscript",
    ast.Lambda: "lambda",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string",
    ast.NamedExpr: "assignment expression (:=)",
    ast.BinOp: "arithmetic",
    ast.UnaryOp: "bitwise operator ~",  # the other unary operators are handled before
    ast.IfExp: "conditional expression",
    ast.List: "list",
    ast.Tuple: "tuple",
    ast.Set: "set",
    ast.Dict: "dict",
}

_CONSTANT_KINDS: dict[type, str] = {
    str: "string",
    bytes: "bytes",
    bool: "boolean constant",
    type(None): "None constant",
    complex: "complex number",
    type(...): "ellipsis",
}

_REJECTED_COMPARISONS: dict[type[ast.cmpop], str] = {
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}


# --- parsing and validation ---------------------------------------------------------------


def normalize(expr: str) -> str:
    """Collapse whitespace, so criteria may span lines (YAML block scalars) yet print on one."""
    return " ".join(expr.split())


def _parse(expr: str) -> tuple[ast.expr, list[str]]:
    """Parse and validate the structure of ``expr``; return its body and dotted names in order."""
    source = normalize(expr)
    if not source:
        raise ValueError("criterion is empty")
    names: list[str] = []
    try:
        tree = ast.parse(source, mode="eval")
        _check_condition(tree.body, source, names)
    except SyntaxError as exc:
        where = f"column {exc.offset}" if exc.offset else "end of input"  # offset 0: ran out of input
        raise ValueError(f"{quoted(source)} does not parse ({exc.msg} at {where})") from None
    except (RecursionError, MemoryError):  # thousands of nested `not`s
        raise ValueError(f"{source[:40]!r}... is nested too deeply") from None
    return tree.body, names


def _check_condition(node: ast.expr, source: str, names: list[str]) -> None:
    """A condition is a comparison, or conditions combined by and/or/not."""
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check_condition(value, source, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check_condition(node.operand, source, names)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARISONS:
                raise ValueError(f"operator '{_REJECTED_COMPARISONS[type(op)]}' is not allowed ({ALLOWED})")
        for operand in (node.left, *node.comparators):
            _check_value(operand, source, names)
    else:
        _check_value(node, source, names)  # rejects what is no value either
        text = _segment(source, node)
        raise ValueError(f"{quoted(text)} is a value, not a condition: compare it, e.g. {quoted(text + ' > 0')}")


def _check_value(node: ast.expr, source: str, names: list[str]) -> None:
    """A value is a statistic name or a (signed) number."""
    if isinstance(node, (ast.Name, ast.Attribute)):
        names.append(_dotted_name(node, source))
    elif isinstance(node, ast.Constant):
        _check_number(node, source)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _SIGNS:
        if not isinstance(node.operand, ast.Constant):
            raise ValueError(f"unary sign in {quoted(_segment(source, node))} applies only to numbers ({ALLOWED})")
        _check_number(node.operand, source)
    elif isinstance(node, (ast.Compare, ast.BoolOp)) or isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        raise ValueError(f"condition {quoted(_segment(source, node))} cannot be used as a value in a comparison")
    else:
        construct = _CONSTRUCT_NAMES.get(type(node), type(node).__name__)
        raise ValueError(f"{construct} {quoted(_segment(source, node))} is not allowed ({ALLOWED})")


def _check_number(node: ast.Constant, source: str) -> None:
    kind = _CONSTANT_KINDS.get(type(node.value))
    if kind is not None:
        raise ValueError(f"{kind} {quoted(_segment(source, node))} is not allowed ({ALLOWED})")
    try:
        float(node.value)  # evaluation works in floats
    except OverflowError:
        raise ValueError("a number in the criterion is too large to compare") from None


def _dotted_name(node: ast.Name | ast.Attribute, source: str) -> str:
    """Flatten ``a.b.c`` (nested Attribute nodes around a Name) into "a.b.c"."""
    segments: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        segments.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        raise ValueError(
            f"attribute access on a non-name expression {quoted(_segment(source, current))} is not allowed ({ALLOWED})"
        )
    segments.append(current.id)
    name = ".".join(reversed(segments))
    for segment in segments:
        if segment.startswith("_"):
            raise ValueError(f"name segment {quoted(segment)} in {quoted(name)} starts with '_', which is not allowed")
    return name


def _segment(source: str, node: ast.AST) -> str:
    return ast.get_source_segment(source, node) or ast.unparse(node)


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def statistic_names(expr: str) -> list[str]:
    """The dotted statistic names ``expr`` uses, in order of appearance, each once.

    Raises ValueError like :func:`check_criterion` if ``expr`` is not a valid criterion.
    """
    return _unique(_parse(expr)[1])


def check_criterion(expr: str, vocabulary: Collection[str]) -> None:
    """Raise a one-line ValueError if ``expr`` is not a valid criterion.

    It must parse, use only allowed constructs, and every segment of every dotted name must
    be in ``vocabulary`` or look like ``layer<N>``. Unknown segments are reported with close
    matches, e.g. "unknown name 'hman' in 'ce_loss.hman.mean' (did you mean 'human'?)".
    """
    for name in statistic_names(expr):
        for segment in words(name):
            if segment not in vocabulary and not LAYER_SCOPE.fullmatch(segment):
                raise ValueError(f"unknown name {quoted(segment)} in {quoted(name)} ({_hint(segment, vocabulary)})")


def _hint(segment: str, vocabulary: Collection[str]) -> str:
    close = difflib.get_close_matches(segment, sorted(vocabulary))
    if close:
        return "did you mean " + " or ".join(f"'{match}'" for match in close) + "?"
    return "known: " + ", ".join(sorted(vocabulary)) + ", layer<N>"


# --- evaluation ---------------------------------------------------------------------------


@dataclass
class CriterionResult:
    """The verdict on one criterion. ``passed`` is False whenever ``error`` is set."""

    name: str
    expr: str
    passed: bool
    values: dict[str, float | None]
    """Every statistic the criterion names, in order; None where not computed."""
    error: str | None = None


class _Evaluator:
    """Walks a validated criterion; remembers which NaN statistics it consulted."""

    def __init__(self, values: Mapping[str, float]):
        self.values = values
        self.nan_names: list[str] = []

    def condition(self, node: ast.expr) -> bool:
        if isinstance(node, ast.BoolOp):
            outcomes = (self.condition(value) for value in node.values)  # lazy: short-circuits
            return all(outcomes) if isinstance(node.op, ast.And) else any(outcomes)
        if isinstance(node, ast.UnaryOp):  # validated: only `not` reaches here
            return not self.condition(node.operand)
        assert isinstance(node, ast.Compare)
        return self.comparison(node)

    def comparison(self, node: ast.Compare) -> bool:
        left = self.value(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = self.value(right_node)  # evaluated lazily, like a Python chain
            if math.isnan(left) or math.isnan(right) or not _COMPARISONS[type(op)](left, right):
                return False
            left = right
        return True

    def value(self, node: ast.expr) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.UnaryOp):
            return _SIGNS[type(node.op)](self.value(node.operand))
        name = ast.unparse(node)  # validated: a dotted name, which unparses to itself
        number = self.values[name]
        if math.isnan(number) and name not in self.nan_names:
            self.nan_names.append(name)
        return number


def evaluate_criterion(name: str, expr: str, stats: Mapping[str, float | None]) -> CriterionResult:
    """Evaluate one criterion against a flat stats dict (see the module doc for the rules)."""
    expr = normalize(expr)
    try:
        body, names = _parse(expr)
    except ValueError as exc:
        return CriterionResult(name, expr, False, {}, str(exc))
    values = {stat: _as_float(stats.get(stat)) for stat in _unique(names)}
    missing = [stat for stat, value in values.items() if value is None]
    if missing:
        return CriterionResult(name, expr, False, values, _not_computed(missing))
    evaluator = _Evaluator(values)  # type: ignore[arg-type]  # no None left
    passed = evaluator.condition(body)
    if evaluator.nan_names:
        return CriterionResult(name, expr, False, values, _are_nan(evaluator.nan_names))
    return CriterionResult(name, expr, passed, values)


def evaluate_criteria(criteria: Mapping[str, str], stats: Mapping[str, float | None]) -> list[CriterionResult]:
    """Evaluate every named criterion, in order."""
    return [evaluate_criterion(name, expr, stats) for name, expr in criteria.items()]


def _as_float(value: float | None) -> float | None:
    """numpy scalars become plain floats (JSON-serialisable, printable)."""
    return None if value is None else float(value)


def _not_computed(names: list[str]) -> str:
    return f"statistic {names[0]} not computed" if len(names) == 1 else f"statistics {', '.join(names)} not computed"


def _are_nan(names: list[str]) -> str:
    return f"{names[0]} is NaN" if len(names) == 1 else f"{', '.join(names)} are NaN"


# --- reporting ----------------------------------------------------------------------------


def outcome(result: CriterionResult) -> str:
    """PASSED, FAILED or ERROR, as pytest says it."""
    if result.error is not None:
        return "ERROR"
    return "PASSED" if result.passed else "FAILED"


def format_result(result: CriterionResult) -> str:
    """One pytest-style line, e.g. ``PASSED effect: x.overall.d > 0 [x.overall.d=1.49]``."""
    line = f"{outcome(result)} {result.name}: {result.expr}"
    if result.values:
        line += " [" + ", ".join(f"{stat}={format_number(value, 'not computed')}" for stat, value in result.values.items()) + "]"
    if result.error is not None:
        line += f" - {result.error}"
    return line


def summary_line(results: list[CriterionResult]) -> str:
    """``2 passed, 1 failed`` (errors count as failed); ``no criteria`` when there are none."""
    passed = sum(result.passed for result in results)
    failed = len(results) - passed
    counts = [f"{count} {word}" for count, word in ((passed, "passed"), (failed, "failed")) if count]
    return ", ".join(counts) or "no criteria"


def to_json(results: list[CriterionResult]) -> list[dict]:
    """criteria.json rows: name, expr, passed, values, error (None for a statistic not computed)."""
    return [asdict(result) for result in results]


def from_json(row: dict) -> CriterionResult:
    """A criteria.json row read back."""
    return CriterionResult(row["name"], row["expr"], bool(row["passed"]), row["values"], row.get("error"))
