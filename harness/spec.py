"""Spec files: YAML loaded (following `extends:`) and validated into `harness.schema.Spec`.

A spec may start with ``extends: other.yaml``: the other file (resolved relative to this
one) is loaded first and this file's keys are merged over it — mappings merge key by key,
everything else replaces, and ``null`` deletes a key. Every error names the file and the
field it is about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from harness.base import FieldError
from harness.data_sources import DATA_SOURCES
from harness.errors import InputError
from harness.overrides import Override, apply
from harness.schema import Spec
from harness.sources import SOURCES
from harness.inputs import TENSOR_SUFFIXES, open_input, read_text
from harness.templates import check_template, find_template


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value)
        return merged
    return over


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """Parse a spec file (following `extends:`) into one resolved mapping."""
    return _read_yaml(Path(path), ())[0]


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> tuple[dict, tuple[Path, ...]]:
    """The resolved mapping, and the files it extends (nearest first)."""
    if path.resolve() in seen:
        raise InputError(f"{path}: extends: circular chain {' -> '.join(str(p) for p in seen)}")
    text = read_text(path, "spec")  # regular, within the limit, UTF-8: else one line naming the file
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: {where}: not valid YAML ({problem})") from None
    except ValueError as exc:  # a tagged or implicit value that does not convert (`2020-13-45`, `!!int x`)
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise InputError(f"{path}: nested too deeply to be a spec") from None
    if data is None:
        raise InputError(f"{path}: empty spec")
    if not isinstance(data, dict):
        raise InputError(f"{path}: a spec is a mapping of keys, not a {type(data).__name__}")
    _anchor_paths(data, path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data, ()
    if not isinstance(parent, str):
        raise InputError(f"{path}: extends: must be a file name")
    parent_path = path.parent / parent
    if not parent_path.exists():
        raise InputError(f"{path}: extends: {str(parent_path)!r} not found")
    base, extended = _read_yaml(parent_path, seen + (path.resolve(),))
    return _merge(base, data), (parent_path, *extended)


def _anchor_paths(data: dict, folder: Path) -> None:
    """A relative `dataset.path`, `directions.<name>.path` or `models.<alias>.chat_template` is
    relative to the folder of the spec file that names it."""
    def values(key: str) -> list:
        entries = data.get(key)
        return list(entries.values()) if isinstance(entries, dict) else []

    for entry, key in [(data.get("dataset"), "path"), *((d, "path") for d in values("directions")),
                       *((m, "chat_template") for m in values("models"))]:
        if isinstance(entry, dict) and isinstance(entry.get(key), str):
            entry[key] = str(folder / entry[key])


def load_spec(path: str | Path, overrides: Sequence[Override] = (), point: bool = False) -> Spec:
    """Load and validate a spec; raise InputError with one line naming file and field.

    `overrides` are set over the resolved file (`harness.overrides`); an error they cause
    names the override. `point`: the spec of one point of the file's matrix (its values are
    among `overrides`): `matrix` and `sweep_criteria` belong to the sweep, not to the point.
    """
    path = Path(path)
    data, extended = _read_yaml(path, ())
    data = apply(data, overrides)
    if point:
        data = {key: value for key, value in data.items() if key not in ("matrix", "sweep_criteria")}
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        field, message = _first_error(exc)
        culprit = next((o.origin + ": " for o in reversed(overrides) if o.touches(field)), "")
        raise InputError(f"{path}: {culprit}{field}: {message}") from None
    check_named_files(spec, path, extended)
    return spec


def check_named_files(spec: Spec, path: Path, extended: Sequence[Path] = ()) -> None:
    """Every check of the files a spec names that needs no model: the template is allowed (a
    spec is data: its template must not be code from elsewhere) and compiles with what it
    includes; the dataset and direction files are regular, readable files within their limits."""
    template = find_template(spec, path, extended)
    check_template(template, f"{path}: report.template")
    dataset_path = getattr(spec.dataset, "path", None)  # a hub dataset names no file
    if dataset_path is not None:
        open_input(dataset_path, "dataset", f"{path}: dataset.path: {dataset_path}").close()
    for name, entry in spec.directions.items():
        where = f"{path}: directions.{name}.path: {entry.path}"
        if Path(entry.path).suffix.lower() not in TENSOR_SUFFIXES:
            raise InputError(f"{where}: not a .safetensors, .pt or .npy file")
        open_input(entry.path, "directions", where).close()


def _first_error(exc: ValidationError) -> tuple[str, str]:
    """The field (dotted) and message of a validation error, as one line says it."""
    errors = exc.errors()  # of a union's failed branches, the deepest error says most
    err = max((e for e in errors if e["loc"][:2] == errors[0]["loc"][:2]), key=lambda e: len(e["loc"]))
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, FieldError):
        return ctx_error.field, str(ctx_error)
    field = ".".join(str(p) for p in _without_union_tags(err["loc"]) if "[" not in str(p)) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        field += ".source"
        known = ", ".join(DATA_SOURCES if field == "dataset.source" else SOURCES)
        message = f"missing: one of {known}" if err["type"] == "union_tag_not_found" else (
            f"must be one of {known}, not {err['input'].get('source')!r}"
        )
    return field, message


def _without_union_tags(loc: tuple) -> tuple:
    """pydantic puts the discriminator value in the path: conditions.x.generate.seed."""
    if len(loc) > 2 and loc[0] == "conditions" and loc[2] in SOURCES:
        return loc[:2] + loc[3:]
    if len(loc) > 1 and loc[0] == "dataset" and loc[1] in DATA_SOURCES:
        return loc[:1] + loc[2:]
    return loc


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML (what `validate` shows and runs/ records); a spec without a
    matrix (a matrix point's included) says nothing of sweeps."""
    sweepless = {"matrix", "sweep_criteria"} if not spec.matrix else None
    return yaml.safe_dump(spec.model_dump(mode="json", exclude=sweepless), sort_keys=False)


def spec_json_schema() -> dict:
    """JSON Schema of a spec file, for editors: `extends` added, nothing required (an extending
    file may be partial; `harness validate` checks the resolved spec)."""
    schema = Spec.model_json_schema()
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "Spec file (relative to this one) whose keys this file overrides.",
    }
    return _drop_required(schema)


def _drop_required(node: Any) -> Any:
    """A file that `extends` another may omit anything, so the editor schema requires nothing;
    a union is `anyOf` (without its required `source:`, a `dataset:` fits several sources)."""
    if isinstance(node, dict):
        return {"anyOf" if key == "oneOf" else key: _drop_required(value) for key, value in node.items() if key != "required"}
    if isinstance(node, list):
        return [_drop_required(item) for item in node]
    return node
