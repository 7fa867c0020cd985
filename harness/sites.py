"""Capture sites: where in each decoder block the capture stage reads the residual stream.

A site is a registered function ``(block) -> tap``: given one decoder block seen by role
(`harness.structure.Block`), it says where to read it, the output of one of the block's
modules or the block's input. The model's structure stays in `harness.structure`; a site only
names a role. Adding a site is one function decorated with `capture_site` (here, or in another
package) plus its name in a spec's ``capture.sites``.

Imports no torch: spec validation checks site names without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from harness.registry import Registry

if TYPE_CHECKING:
    from harness.structure import Block, Tap

Site = Callable[["Block"], "Tap"]
SITES: Registry[Site] = Registry("capture site")
DEFAULT_SITE = "resid_post"
"""The site whose metrics keep their bare names (``smoothness``, not ``smoothness_resid_post``)."""


def capture_site(fn: Site) -> Site:
    """Register a capture site under its function name; its docstring's first line is what
    `harness ls sites` shows."""
    SITES.add(fn.__name__, fn, fn.__module__)
    return fn


@capture_site
def resid_post(block: Block) -> Tap:
    """The residual stream after the block: the block's own output."""
    return block.output()


@capture_site
def resid_pre(block: Block) -> Tap:
    """The residual stream entering the block (block 0: the embeddings as the model scales them)."""
    return block.input()


@capture_site
def attn_out(block: Block) -> Tap:
    """What the attention sublayer adds to the residual stream; after its output norm where the family has one."""
    return block.attention_output()


@capture_site
def mlp_out(block: Block) -> Tap:
    """What the MLP sublayer adds to the residual stream; after its output norm where the family has one."""
    return block.mlp_output()
