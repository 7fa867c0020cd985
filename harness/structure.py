"""Model structure: the one module that knows where a transformers model keeps its decoder blocks
and, inside a block, which submodule plays which role.

A decoder block adds an attention sublayer and an MLP sublayer to the residual stream. The
families below lay their blocks out that way; a `Block` finds the two sublayers by role (the
child `self_attn` or `attention`, and `mlp`), and knows which module's output is what each one
*adds*: the sublayer itself in a pre-norm block (Llama, Mistral, Qwen 2/3, Gemma 1, Phi-3,
GPT-NeoX, sequential or parallel), its output norm where the family normalises sublayer outputs
before the residual add (Gemma 2/3's `post_attention_layernorm` / `post_feedforward_layernorm`,
OLMo 2's post-norms). Capture sites (`harness.sites`) are written against a `Block`, so a new
family is one line in FAMILIES, and a new site never names a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from harness.lazy import lazy_import
from harness.sites import SITES

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.hooks import RemovableHandle

torch = lazy_import("torch")

ATTENTION_NAMES = ("self_attn", "attention")
"""What transformers calls a decoder block's attention sublayer (GPT-NeoX: `attention`)."""
MLP_NAMES = ("mlp",)
OUTPUT_NORMS = {"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}
"""Per sublayer, the norm its output passes before the residual add, in a family with `normed_outputs`.
(In a pre-norm block `post_attention_layernorm` is the MLP's *input* norm: the name alone says nothing.)"""


@dataclass(frozen=True)
class Layout:
    """How a family's decoder block adds its sublayers to the residual stream."""

    normed_outputs: bool = False
    """Each sublayer's output passes a norm (OUTPUT_NORMS) before it joins the residual stream."""


PRE_NORM, NORMED_OUTPUTS = Layout(), Layout(normed_outputs=True)
FAMILIES: dict[str, Layout] = {
    "llama": PRE_NORM, "mistral": PRE_NORM, "qwen2": PRE_NORM, "qwen3": PRE_NORM, "gemma": PRE_NORM,
    "phi3": PRE_NORM, "gpt_neox": PRE_NORM,
    "gemma2": NORMED_OUTPUTS, "gemma3_text": NORMED_OUTPUTS, "olmo2": NORMED_OUTPUTS,
}
"""Text config `model_type` -> layout: the families whose attention and MLP sublayers a Block can find."""


class UnknownArchitecture(ValueError):
    """The model's structure is not one this module knows (no decoder blocks, or a family
    whose sublayers it cannot name)."""


def architecture(model: nn.Module) -> str:
    """The text model's `model_type` (`llama`, `gemma2`, `gemma3_text`, ...): a Gemma 3 wrapper
    answers for its language model."""
    return model.config.get_text_config().model_type


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: `layers` of the model's decoder, where transformers keeps them."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnknownArchitecture(f"cannot find the decoder blocks of {type(model).__name__} (no `get_decoder().layers`)")
    return layers


@dataclass(frozen=True)
class Tap:
    """Where a site reads one block: a module's output, or (`reads_input`) its first input."""

    module: nn.Module
    reads_input: bool = False

    def register(self, read: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call `read` with the hidden states [batch, tokens, d] at this tap on every forward."""
        if self.reads_input:
            # the block's hidden states: positional in every family's decoder loop, by keyword in case one passes it so
            return self.module.register_forward_pre_hook(
                lambda module, args, kwargs: read(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
            )
        return self.module.register_forward_hook(
            lambda module, args, output: read(output[0] if isinstance(output, tuple) else output)
        )

    def change(self, changed: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
        """Replace the hidden states at this tap by `changed(hidden)` on every forward (an
        intervention); taps registered later read what it returns."""
        if self.reads_input:
            def replace_input(module, args, kwargs):
                if args:
                    return (changed(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": changed(kwargs["hidden_states"])}

            return self.module.register_forward_pre_hook(replace_input, with_kwargs=True)

        def replace_output(module, args, output):
            return (changed(output[0]), *output[1:]) if isinstance(output, tuple) else changed(output)

        return self.module.register_forward_hook(replace_output)


@dataclass(frozen=True)
class Block:
    """One decoder block of a model, seen by role."""

    module: nn.Module
    family: str
    """The model's `architecture` (FAMILIES keys the sublayer layout on it)."""

    def input(self) -> Tap:
        """The residual stream entering the block."""
        return Tap(self.module, reads_input=True)

    def output(self) -> Tap:
        """The residual stream leaving the block (the block's own output)."""
        return Tap(self.module)

    def attention_output(self) -> Tap:
        """What the attention sublayer adds to the residual stream."""
        return self._added_by("attention", ATTENTION_NAMES)

    def mlp_output(self) -> Tap:
        """What the MLP sublayer adds to the residual stream."""
        return self._added_by("mlp", MLP_NAMES)

    def _added_by(self, role: str, names: Sequence[str]) -> Tap:
        if self.family not in FAMILIES:
            raise UnknownArchitecture(
                f"no known {role} sublayer layout for architecture {self.family!r} (known: {', '.join(sorted(FAMILIES))})"
            )
        children = dict(self.module.named_children())
        found = [name for name in names if name in children]
        if not found:
            raise UnknownArchitecture(f"{type(self.module).__name__} has no {role} submodule ({' or '.join(names)})")
        if FAMILIES[self.family].normed_outputs:
            return Tap(self.module.get_submodule(OUTPUT_NORMS[role]))
        return Tap(children[found[0]])


def blocks(model: nn.Module) -> list[Block]:
    """Every decoder block of `model`, in order."""
    family = architecture(model)
    return [Block(module, family) for module in decoder_blocks(model)]


def site_taps(model: nn.Module, site: str) -> list[Tap]:
    """Per decoder block, where capture site `site` reads it."""
    try:
        return [SITES[site](block) for block in blocks(model)]
    except (AttributeError, UnknownArchitecture) as exc:
        raise UnknownArchitecture(f"capture site {site!r}: {exc}") from None


def resolve_sites(model: nn.Module, sites: Sequence[str]) -> None:
    """Raise UnknownArchitecture (a ValueError naming the site) if `model` lacks one of `sites`."""
    for site in sites:
        site_taps(model, site)


def resolve_layers(model: nn.Module, requested: str | list[int]) -> list[int]:
    """The block indices `capture.layers` names (`all`, or a list checked against the depth)."""
    n_layers = len(decoder_blocks(model))
    if requested == "all":
        return list(range(n_layers))
    too_deep = [layer for layer in requested if layer >= n_layers]
    if too_deep:
        raise ValueError(f"layers {too_deep} do not exist (the model has {n_layers})")
    return list(requested)
