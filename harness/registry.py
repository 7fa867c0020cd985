"""What users extend: named registries (metrics, condition sources, capture sites), and the
plugins that fill them from other packages.

Every registry is a `Registry`: a read-only mapping from name to entry that records the
package each entry comes from (`harness ls metrics|sources|sites` shows it). Built-ins and
plugins register through the same public decorators (`harness.metrics.layer_metric`,
`harness.sources.condition_source`, `harness.sites.capture_site`, ...).

A plugin is a distribution with an entry point in the `harness.plugins` group; each names a
module, imported (by `load_plugins`, before any spec is validated) for its registrations:

    [project.entry-points."harness.plugins"]
    my_metrics = "my_package.harness_metrics"

A plugin that fails to import or registers a name that is taken is one error line naming
its package (InputError, exit 2). Imports no torch.
"""

from __future__ import annotations

import contextvars
import importlib
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Generic, TypeVar

from harness.errors import InputError

ENTRY_POINT_GROUP = "harness.plugins"
BUILT_IN = "harness"
"""The origin of the built-ins."""

T = TypeVar("T")
_loading: contextvars.ContextVar[str | None] = contextvars.ContextVar("loading_plugin", default=None)
"""The distribution whose plugin module is being imported (what its registrations record)."""
_loaded = False


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name, each with the package it comes from; a name registers once."""

    def __init__(self, kind: str):
        self.kind = kind
        """What an entry is, as an error line says it (`trajectory metric`)."""
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def add(self, name: str, entry: T, module: str) -> None:
        """Register `entry` under `name`, defined in `module` (its package is the origin)."""
        origin = origin_of(module)
        if name in self._entries:
            raise InputError(
                f"plugin {origin}: registers the {self.kind} {name!r}, which {self._origins[name]} already registered"
            )
        self._entries[name] = entry
        self._origins[name] = origin

    def origin(self, name: str) -> str:
        """The package that registered `name` (`harness` for the built-ins)."""
        return self._origins[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def origin_of(module: str) -> str:
    """The package a registration made in `module` comes from: the plugin being loaded, or the module's top-level package."""
    top = module.split(".")[0]
    return BUILT_IN if top == BUILT_IN else _loading.get() or top


def load_plugins() -> None:
    """Import every `harness.plugins` entry point's module, once (each registers what it adds)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        package = entry_point.dist.name if entry_point.dist is not None else entry_point.value
        token = _loading.set(package)
        try:
            importlib.import_module(entry_point.value.split(":")[0])
        except InputError:
            _loaded = False
            raise
        except Exception as exc:  # any failure of another package's code is that package's one line
            _loaded = False
            raise InputError(
                f"plugin {package}: entry point {entry_point.name} = {entry_point.value!r} failed to import "
                f"({type(exc).__name__}: {exc})"
            ) from None
        finally:
            _loading.reset(token)
