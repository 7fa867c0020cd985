"""Report templates: where a spec may take one from, the checks at validation, and the sandbox
they render in.

A spec is data, never code. `report.template` must resolve (symlinks followed) to a file
inside reports/templates/ or the spec file's own folder, and must not be the spec file or a
file it extends; `harness validate` checks this and compiles the template and every template
it includes, imports or extends by name (`check_template`), so a syntax error or an unknown
include is found before a run, not after its last stage.

Templates render in jinja2's ImmutableSandboxedEnvironment, which refuses Python internals
(`__globals__`, `__subclasses__`, `__init__`, ...) and changing lists or dicts in place, and
`{% include %}` / `{% extends %}` reach only the same folders. On top of it, a render has a
budget (`RenderBudget`), so that no template can hang or balloon:

- **operations**: every loop step (`{% for %}`, `range`), call, filter, attribute lookup and
  intercepted operator counts; `OPERATIONS` of them at most, and `SECONDS` of wall time;
- **values**: `*`, `**`, `+`, `%`, string padding, `replace`, `join` and `format` are checked
  *before* they compute, and every other result after, so no value exceeds `MAX_VALUE`
  characters (or items), and no integer `MAX_INT_BITS` bits;
- **output**: everything a template writes (into RESULTS.md, a macro or a `{% set %}` block)
  counts toward `MAX_OUTPUT` characters.

An overrun, like a template error, is one InputError line (exit 2) naming the template; the run
folder is then discarded, so nothing is written.

Imports no torch: validation checks templates.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.loaders import split_template_path
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

import harness
from harness.errors import InputError
from harness.inputs import read_text
from harness.numbers import format_number, format_percent
from harness.schema import Spec


def _shipped_templates() -> Path:
    """reports/templates/: package data `harness/report_templates/` in an installed wheel, the
    repository's own folder beside the package in a source checkout (an editable install)."""
    package = Path(harness.__file__).parent
    installed = package / "report_templates"
    return installed if installed.is_dir() else package.parent / "reports" / "templates"


TEMPLATES_DIR = _shipped_templates()
"""Templates shipped with the harness; `report.template` names one of these, or a file beside the spec."""

OPERATIONS = 10_000_000
"""Loop steps, calls, filters, lookups and operators one render may take."""
SECONDS = 20.0
"""Wall time one render may take (checked every `CLOCK_EVERY` operations)."""
CLOCK_EVERY = 4096
MAX_VALUE = 1_000_000
"""Characters of a string, items of a list, that one template expression may make."""
MAX_INT_BITS = 100_000
"""Bits of an integer a template may compute (`7 ** (10**9)` would take hours)."""
MAX_OUTPUT = 16_000_000
"""Characters a render may write in all (RESULTS.md of the quickstart is about 11,000)."""
MAX_RANGE = 100_000
"""Items of one `range(...)` (jinja2's own sandbox limit)."""


def find_template(spec: Spec, spec_file: str | Path, extended: Collection[Path] = ()) -> Path:
    """`report.template`: a file in reports/templates/, else one in the spec file's folder.

    `extended`: the files the spec extends; like the spec file itself, none may be the template.
    """
    spec_file = Path(spec_file)
    name = spec.report.template
    where = f"{spec_file}: report.template"
    roots = (TEMPLATES_DIR, spec_file.parent)
    for candidate in (root / name for root in roots):
        if candidate.exists():
            _check_confined(candidate, roots, (spec_file, *extended), where)
            return candidate
    raise InputError(f"{where}: template '{name}' not found")


def _check_confined(path: Path, roots: Collection[Path], spec_files: Collection[Path], where: str) -> None:
    resolved = path.resolve()
    if resolved in {spec_file.resolve() for spec_file in spec_files}:
        raise InputError(f"{where}: '{path}' is a spec file, not a template")
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        raise InputError(f"{where}: '{path}' resolves to '{resolved}', outside {TEMPLATES_DIR} and the spec's folder")


def explicit_template(path: Path) -> Path:
    """A template the caller names directly (not a spec's field): it must exist."""
    if not path.is_file():
        raise InputError(f"{path}: template not found")
    return path


class _ConfinedLoader(jinja2.BaseLoader):
    """Loads only regular files that resolve inside its search folders, through the bounded
    reader (kind `template`): a symlink beside the template cannot pull in a file from
    elsewhere through `{% include %}`, and a FIFO or a huge file is refused in one line."""

    def __init__(self, folders: Iterable[Path]):
        self.folders = [Path(folder) for folder in folders]

    def get_source(self, environment: jinja2.Environment, template: str):
        for folder in self.folders:
            path = folder.joinpath(*split_template_path(template))
            if path.exists():
                _check_confined(path, self.folders, (), template)
                source = read_text(path, "template", str(path))
                return source, str(path), lambda: False
        raise jinja2.TemplateNotFound(template)


# --- the budget -----------------------------------------------------------------------------------


class BudgetExceeded(Exception):
    """A render went past one of its limits; the message says which, in words."""


class RenderBudget:
    """What one render has used so far; `tick` for each operation, `emitted` for each write."""

    def __init__(self) -> None:
        self.operations = 0
        self.output = 0
        self.deadline = time.monotonic() + SECONDS

    def tick(self, count: int = 1) -> None:
        before, self.operations = self.operations, self.operations + count
        if self.operations > OPERATIONS:
            raise BudgetExceeded(f"takes more than {OPERATIONS:,} operations (a loop too long?)")
        if before // CLOCK_EVERY != self.operations // CLOCK_EVERY and time.monotonic() > self.deadline:
            raise BudgetExceeded(f"runs longer than {SECONDS:g} s")

    def emitted(self, text: Any) -> Any:
        self.tick()
        self.output += len(text) if isinstance(text, str) else len(str(text))
        if self.output > MAX_OUTPUT:
            raise BudgetExceeded(f"writes more than {MAX_OUTPUT:,} characters")
        return text


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset, range)) else 0


def _check_value(value: Any, what: str) -> Any:
    """`value`, unless it is a string or sequence over MAX_VALUE or an integer over MAX_INT_BITS."""
    if _size(value) > MAX_VALUE:
        raise BudgetExceeded(f"{what} makes a value of {_size(value):,} items, more than the {MAX_VALUE:,} a template value may have")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise BudgetExceeded(f"{what} makes an integer of {value.bit_length():,} bits, more than {MAX_INT_BITS:,}")
    return value


def _refuse_large(size: float, what: str) -> None:
    if size > MAX_VALUE:
        raise BudgetExceeded(f"{what} would make a value of {size:,.0f} items, more than the {MAX_VALUE:,} a template value may have")


_FORMAT_NUMBER = re.compile(r"\d+")


def _check_format(template: str, args: Iterable[Any], what: str) -> None:
    """A `%` or `{}` format: no width or precision (in the string or passed as an argument) past MAX_VALUE."""
    for number in _FORMAT_NUMBER.findall(template):
        if len(number) > 7 or int(number) > MAX_VALUE:
            raise BudgetExceeded(f"{what} formats with a width of {number[:20]}, more than {MAX_VALUE:,}")
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_VALUE and "*" in template:
            raise BudgetExceeded(f"{what} formats with a width of {arg}, more than {MAX_VALUE:,}")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operator whose result would be too large, before computing it."""
    what = f"'{operator}'"
    numbers = all(isinstance(side, (int, float)) for side in (left, right))
    if operator == "**" and numbers and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if left.bit_length() * right > MAX_INT_BITS:
            raise BudgetExceeded(f"{what} would make an integer of about {left.bit_length() * right:,} bits, more than {MAX_INT_BITS:,}")
    elif operator == "*":
        for sequence, count in ((left, right), (right, left)):
            if _size(sequence) and isinstance(count, int):
                _refuse_large(_size(sequence) * max(count, 0), what)
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"{what} would make an integer of more than {MAX_INT_BITS:,} bits")
    elif operator == "+":
        _refuse_large(_size(left) + _size(right), what)
    elif operator == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,), what)


_STR_GROWING = {"ljust", "rjust", "center", "zfill", "expandtabs", "replace", "join", "format", "format_map"}
"""str methods whose result can be much larger than the string: checked before they run."""


def _check_str_call(method: str, text: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse a growing str method (or filter) before it runs; returns `args` (an iterable
    argument of `join` made a list, counted)."""
    what = f"{method}()"
    if method in ("format", "format_map"):
        _check_format(text, [*args, *kwargs.values()], what)
        return args
    if method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _refuse_large(len(text) + (text.count(args[0]) if args[0] else len(text) + 1) * len(args[1]), what)
    elif method == "join" and args:
        items = args[0] if _size(args[0]) else list(args[0])
        _refuse_large(len(text) * max(len(items) - 1, 0) + sum(_size(item) for item in items), what)
        return (items, *args[1:])
    for value in [*args, *kwargs.values()]:
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_VALUE:
            raise BudgetExceeded(f"{what} with {value:,} would make a value of more than {MAX_VALUE:,} characters")
    return args


class _BudgetedRange:
    """`range` in a template: at most MAX_RANGE items, each counted when iterated."""

    def __init__(self, environment: "_BudgetedEnvironment", *args: int):
        self.items = range(*args)
        if len(self.items) > MAX_RANGE:
            raise BudgetExceeded(f"range() of {len(self.items):,} items, more than {MAX_RANGE:,}")
        self.budget = environment.budget

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[int]:
        for item in self.items:
            self.budget.tick()
            yield item

    def __reversed__(self) -> Iterator[int]:
        for item in reversed(self.items):
            self.budget.tick()
            yield item

    def __getitem__(self, index):
        return self.items[index]

    def __contains__(self, item) -> bool:
        return item in self.items


_ITERATED, _BOUNDED, _EMITTED = "harness_iterated", "harness_bounded", "harness_emitted"
"""Filters the budget inserts into every template (`_Instrument`): per loop item, per result, per write."""


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so that the budget sees each loop step, each filter's and
    concatenation's result and each write."""

    def _wrap(self, node: nodes.Expr, filter_name: str) -> nodes.Filter:
        return nodes.Filter(node, filter_name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._wrap(node.iter, _ITERATED)
        return node

    def visit_Filter(self, node: nodes.Filter) -> nodes.Filter:
        node = self.generic_visit(node)
        return node if node.node is None else self._wrap(node, _BOUNDED)  # None: a {% filter %} block's own

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        return self._wrap(self.generic_visit(node), _BOUNDED)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [self._wrap(child, _EMITTED) for child in node.nodes]
        return node


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with a `RenderBudget` (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.budget = RenderBudget()
        self.globals["range"] = lambda *bounds: _BudgetedRange(self, *bounds)
        self.filters.update({name: _checked_filter(self, name, function) for name, function in self.filters.items()})
        self.filters[_ITERATED] = self._iterated
        self.filters[_BOUNDED] = lambda value: _check_value(value, "an expression")
        self.filters[_EMITTED] = self.budget.emitted

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Instrument().visit(super()._parse(source, name, filename))

    def _iterated(self, items: Any) -> Iterator[Any]:
        for item in items:
            self.budget.tick()
            yield item

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        self.budget.tick()
        _check_binop(operator, left, right)
        return _check_value(super().call_binop(context, operator, left, right), f"'{operator}'")

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget.tick()
        return super().getitem(obj, argument)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.budget.tick()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        text = getattr(method, "__self__", None)
        if isinstance(text, str) and getattr(method, "__name__", "") in _STR_GROWING:
            args = _check_str_call(method.__name__, text, args, kwargs)
        return _check_value(super().call(__context, __obj, *args, **kwargs), "a call")


_FILTER_AS_METHOD = {"center": "center", "indent": "ljust", "replace": "replace", "join": "join", "format": "format",
                     "wordwrap": "ljust", "truncate": "ljust"}
"""Filters that can grow a string, and the str method whose check applies (its width or strings)."""


def _checked_filter(environment: _BudgetedEnvironment, name: str, function: Any) -> Any:
    """A built-in filter counted as one operation and, when it can grow a string, checked before it runs."""
    method = _FILTER_AS_METHOD.get(name)
    passes = getattr(function, "jinja_pass_arg", None)

    @wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        environment.budget.tick()
        if method:
            first = 1 if passes is not None else 0  # the context / environment jinja passes first
            value, rest = args[first], args[first + 1:]
            if name == "format":
                _check_format(str(value), [*rest, *kwargs.values()], "format")
            elif name == "join":
                items = value if _size(value) else list(value)
                separator = rest[0] if rest else kwargs.get("d", "")
                _check_str_call("join", str(separator), (items,), {})
                args = (*args[:first], items, *rest)
            else:
                _check_str_call(method, value if isinstance(value, str) else str(value), rest, kwargs)
        return function(*args, **kwargs)

    return checked


# --- compiling and rendering ----------------------------------------------------------------------


def _environment(path: Path) -> _BudgetedEnvironment:
    environment = _BudgetedEnvironment(
        loader=_ConfinedLoader([path.parent, TEMPLATES_DIR]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: free text goes through the `md` filter instead
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(num=format_number, percent=format_percent, md=escape_markdown)
    return environment


def check_template(path: Path, where: str) -> None:
    """Compile the template and every template it names in `include`, `import`, `from` or
    `extends` (a name computed at render time cannot be checked before); InputError on a syntax
    error or a template not found, `where` naming the spec field."""
    environment = _environment(path)
    pending, seen = [path.name], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            source, filename, _ = environment.loader.get_source(environment, name)
            environment.get_template(name)  # compiles it
            pending.extend(ref for ref in meta.find_referenced_templates(environment.parse(source)) if ref is not None)
        except jinja2.TemplateNotFound as exc:
            raise InputError(f"{where}: {path}: names template '{exc.name}', which is not found") from None
        except jinja2.TemplateSyntaxError as exc:
            raise InputError(f"{where}: {exc.filename or path}: line {exc.lineno}: {exc.message}") from None
        except InputError as exc:  # an include that is not a readable regular file
            raise InputError(f"{where}: {exc}") from None


def render_template(path: Path, context: dict) -> str:
    """Render a template in the budgeted sandbox; a template error or an overrun is the user's
    input error, named by file (and line)."""
    environment = _environment(path)
    try:
        return environment.get_template(path.name).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"{path}: line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:  # SecurityError (a sandbox escape) included
        raise InputError(f"{path}: {_first_line(exc)}") from None
    except BudgetExceeded as exc:
        raise InputError(f"{path}: the template {exc}; nothing was written") from None
    except RecursionError:
        raise InputError(f"{path}: the template recurses too deeply (a macro that calls itself?); nothing was written") from None
    except MemoryError:
        raise InputError(f"{path}: the template runs out of memory; nothing was written") from None
    except (OverflowError, ValueError, TypeError, ZeroDivisionError, AttributeError, LookupError) as exc:
        raise InputError(f"{path}: the template fails: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- filters ------------------------------------------------------------------------------


def escape_markdown(text: str) -> str:
    """Text that renders literally inside a markdown table cell."""
    special = "\\`*_[]<>|#"
    return "".join("\\" + char if char in special else char for char in text)
