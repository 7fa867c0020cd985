"""Key-path settings over a spec's resolved mapping: one mechanism for `--set key.path=value`,
`--limit`, `--device` and each point of a spec's `matrix:`.

A key path is the spec's keys joined by dots (`conditions.model.generation.temperature`); `*`
stands for every key of a mapping (`models.*.device_map`). The value replaces what was at the
key (a mapping is not merged into the one it replaces); missing mappings on the way are
created, so an unknown key reaches validation and is reported there like a typo in the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from harness.errors import InputError, quoted

KEY_PATH = re.compile(r"[A-Za-z0-9_*-]+(\.[A-Za-z0-9_*-]+)*")
"""Spec keys joined by dots; `*` is every key of a mapping."""


@dataclass(frozen=True)
class Override:
    """One value set at a key path, and how the user wrote it (what an error line names)."""

    path: str
    value: Any
    origin: str
    """`--set dataset.n_samples=8`, `--limit 8`, `matrix: models.base={id: x}`."""

    def touches(self, field: str) -> bool:
        """Whether a validation error at `field` (dotted) lies on this override's key path: at
        the key, below it (a field of the value set), or above it (an unknown key it created)."""
        return all(mine in ("*", theirs) for mine, theirs in zip(self.path.split("."), field.split(".")))


def flow(value: Any) -> str:
    """A value as one line of YAML (`0.7`, `{id: x}`), as a user would type it."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def parse_set(text: str) -> Override:
    """`key.path=value` from the command line; the value is YAML (`30`, `true`, `{id: x}`)."""
    origin = f"--set {text}"
    path, equals, raw = text.partition("=")
    path = path.strip()
    if not equals or not KEY_PATH.fullmatch(path):
        raise InputError(f"{origin}: expected key.path=value, e.g. dataset.n_samples=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{origin}: the value is not valid YAML ({problem})") from None
    return Override(path, value, origin)


def command_line(sets: Sequence[str] = (), limit: int | None = None, device: str | None = None) -> list[Override]:
    """The run's overrides in the order they apply: each `--set`, then `--limit`, then `--device`."""
    overrides = [parse_set(text) for text in sets]
    if limit is not None:
        overrides.append(Override("dataset.n_samples", limit, f"--limit {limit}"))
    if device is not None:
        overrides.append(Override("models.*.device_map", device, f"--device {device}"))
    return overrides


def apply(data: dict, overrides: Sequence[Override]) -> dict:
    """A copy of `data` with every override set, in order."""
    for override in overrides:
        data = _set(data, override.path.split("."), override.value, override)
    return data


def _set(node: Any, keys: list[str], value: Any, override: Override) -> Any:
    if not keys:
        return value
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise InputError(f"{override.origin}: {quoted(keys[0])} is set inside a {type(node).__name__}, not a mapping")
    head, rest = keys[0], keys[1:]
    targets = list(node) if head == "*" else [head]
    return {**node, **{key: _set(node.get(key), rest, value, override) for key in targets}}
