"""Capture sites: where in each decoder block the capture stage reads the residual stream.

A site is a registered function ``(architecture) -> module path`` inside one decoder block
(``""`` = the block itself); the capture stage hooks that module's output (the first element
when it returns a tuple). ``architecture`` is the text config's ``model_type``. Adding a site
is one decorated function here plus its name in a spec's ``capture.sites``.

Imports no torch: spec validation checks site names without it.
"""

from __future__ import annotations

from typing import Callable

from harness.registry import Registry

SITES: Registry[Callable[[str], str]] = Registry("capture site")
DEFAULT_SITE = "resid_post"
"""The site whose metrics keep their bare names (``smoothness``, not ``smoothness_resid_post``)."""


class UnknownArchitecture(ValueError):
    """A site has no module path for the model's architecture."""


def capture_site(fn: Callable[[str], str]) -> Callable[[str], str]:
    """Register a capture site under its function name."""
    SITES.add(fn.__name__, fn, fn.__module__)
    return fn


def _per_architecture(site: str, architecture: str, paths: dict[str, str]) -> str:
    if architecture not in paths:
        raise UnknownArchitecture(
            f"capture site {site!r} is not defined for architecture {architecture!r} (known: {', '.join(sorted(paths))})"
        )
    return paths[architecture]


@capture_site
def resid_post(architecture: str) -> str:
    """The residual stream after the block: the block's own output."""
    return ""


@capture_site
def attn_out(architecture: str) -> str:
    """What the attention sublayer adds to the residual stream (Gemma: after its post-attention norm)."""
    return _per_architecture(
        "attn_out",
        architecture,
        {"llama": "self_attn", "gemma2": "post_attention_layernorm", "gemma3_text": "post_attention_layernorm"},
    )


@capture_site
def mlp_out(architecture: str) -> str:
    """What the MLP sublayer adds to the residual stream (Gemma: after its post-feedforward norm)."""
    return _per_architecture(
        "mlp_out",
        architecture,
        {"llama": "mlp", "gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm"},
    )
