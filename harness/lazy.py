"""Modules imported on their first use.

torch and transformers take seconds to import, and a fully cached run never computes with them:
the stage modules that need them name them through `lazy_import`, which keeps both off the CLI's
start-up path until a stage computes (or a model loads).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Callable


class _LazyModule(ModuleType):
    """Stands in for the module `__name__`; its attributes are the module's, imported on first use."""

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attribute)


def lazy_import(name: str) -> Any:
    """The module `name`, imported when an attribute of it is first read (`torch.float16`)."""
    return _LazyModule(name)


def inference_mode(fn: Callable) -> Callable:
    """`@torch.inference_mode()`, importing torch only when `fn` is called."""

    @functools.wraps(fn)
    def in_inference_mode(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return in_inference_mode
