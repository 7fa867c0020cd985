"""Report templates: where a spec may take one from, and the sandbox it renders in.

A spec is data, never code. `report.template` must resolve (symlinks followed) to a file
inside reports/templates/ or the spec file's own folder, and must not be the spec file or a
file it extends; `harness validate` checks this. Templates render in jinja2's
SandboxedEnvironment, which refuses Python internals (`__globals__`, `__subclasses__`,
`__init__`, ...), and `{% include %}` / `{% extends %}` reach only the same folders.

Imports no torch: validation checks templates.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

import harness
from harness.errors import InputError
from harness.schema import Spec
from harness.numbers import format_number, format_percent

def _shipped_templates() -> Path:
    """reports/templates/: package data `harness/report_templates/` in an installed wheel, the
    repository's own folder beside the package in a source checkout (an editable install)."""
    package = Path(harness.__file__).parent
    installed = package / "report_templates"
    return installed if installed.is_dir() else package.parent / "reports" / "templates"


TEMPLATES_DIR = _shipped_templates()
"""Templates shipped with the harness; `report.template` names one of these, or a file beside the spec."""


def find_template(spec: Spec, spec_file: str | Path, extended: Collection[Path] = ()) -> Path:
    """`report.template`: a file in reports/templates/, else one in the spec file's folder.

    `extended`: the files the spec extends; like the spec file itself, none may be the template.
    """
    spec_file = Path(spec_file)
    name = spec.report.template
    where = f"{spec_file}: report.template"
    roots = (TEMPLATES_DIR, spec_file.parent)
    for candidate in (root / name for root in roots):
        if candidate.is_file():
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


class _ConfinedLoader(jinja2.FileSystemLoader):
    """Loads only files that resolve inside its search folders: a symlink beside the
    template cannot pull in a file from elsewhere through `{% include %}`."""

    def get_source(self, environment: jinja2.Environment, template: str):
        source, filename, uptodate = super().get_source(environment, template)
        _check_confined(Path(filename), [Path(folder) for folder in self.searchpath], (), f"{template}")
        return source, filename, uptodate


def render_template(path: Path, context: dict) -> str:
    """Render a template in the sandbox; a template error is the user's input error, named by file (and line)."""
    environment = SandboxedEnvironment(
        loader=_ConfinedLoader([path.parent, TEMPLATES_DIR]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: free text goes through the `md` filter instead
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(num=format_number, percent=format_percent, md=escape_markdown)
    try:
        return environment.get_template(path.name).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"{path}: line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:  # SecurityError (a sandbox escape) included
        raise InputError(f"{path}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- filters ------------------------------------------------------------------------------


def escape_markdown(text: str) -> str:
    """Text that renders literally inside a markdown table cell."""
    special = "\\`*_[]<>|#"
    return "".join("\\" + char if char in special else char for char in text)
