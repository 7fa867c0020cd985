"""Where a model comes from and how it is prompted: the spec model of `models.<alias>` (and of a
tokenizer named by `dataset.tokenizer`). Imports no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from harness.base import StrictModel


class GGUFSource(StrictModel):
    """A GGUF file shipped inside an installed Python package."""

    package: str
    """Import name of the package (located with importlib, not imported, unless `assemble`)."""
    file: str = "*.gguf"
    """Glob for the file inside the package directory (ignored with `assemble`)."""
    assemble: bool = False
    """The package ships the file in chunks: call its `assemble(path)` to write it."""


class ModelSpec(StrictModel):
    """Where a model comes from and how it is placed."""

    id: str | None = None
    """Hub id (`google/gemma-2-2b`), local model directory, or local `.gguf` file; a display
    name only when `gguf` is given."""
    gguf: GGUFSource | None = None
    """Load from a GGUF file inside an installed package instead of the hub."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype."""
    device_map: str = "auto"
    """accelerate placement: `auto`, `cpu`, `cuda`, `cuda:0`, ..."""
    trust_remote_code: bool = False
    """Run model code from the hub. Off unless the spec says so."""
    chat: bool = False
    """Prompt it as a chat model: generation formats each prompt with the tokenizer's chat
    template (a user turn, then `add_generation_prompt`), and capture and CE read exactly
    those ids followed by the response (`harness.chat`). A tokenizer without a chat
    template needs `chat_template`."""
    system: str | None = None
    """With `chat`: a system turn before the prompt (default: none, or what the template adds)."""
    chat_template: str | None = None
    """With `chat`: a jinja chat-template file used instead of the tokenizer's own. A relative
    path is relative to the folder of the spec file that names it."""

    @model_validator(mode="after")
    def _has_source(self) -> "ModelSpec":
        if self.id is None and self.gguf is None:
            raise ValueError("give `id` (hub id or local path) or `gguf`")
        if not self.chat and (self.system is not None or self.chat_template is not None):
            raise ValueError("`system` and `chat_template` need `chat: true`")
        return self
