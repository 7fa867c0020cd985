"""The base of every typed record: spec models and run-folder records alike."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""Names that appear inside criteria (conditions, comparisons, models) must be identifiers."""


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a spec must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)  # docstrings: schema descriptions


class FieldError(ValueError):
    """A cross-field check failing at a known field path (the spec loader names that path)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
