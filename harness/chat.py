"""Chat formatting: a prompt as a chat model reads it (`models.<alias>.chat: true`).

The prompt becomes a user turn (after a `system:` turn, if the spec gives one), rendered by the
tokenizer's chat template, or a `chat_template:` file, with `add_generation_prompt`. The text is
then tokenized *without* the tokenizer's special tokens, so a BOS the template writes is not
added again: the commonest fault of evaluation tools, a doubled BOS, cost Gemma most of its
accuracy in one of them (lm-eval #1465). Where the template writes none and the tokenizer
would add one, it is written in front, so the ids hold exactly one either way. Generation,
capture and CE all read these ids (then the response's, tokenized without special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import InputError
from harness.inputs import read_text
from harness.model_spec import ModelSpec


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of a text it encodes."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@dataclass(frozen=True)
class ChatFormat:
    """How one model's prompts are formatted: the template, the system turn, the BOS to add."""

    tokenizer: object
    template: str
    system: str | None
    bos: str
    """Written in front of the rendered text: the tokenizer's BOS where it would add one and
    the template writes none, else empty."""

    @classmethod
    def of(cls, tokenizer, spec: ModelSpec, where: str) -> "ChatFormat":
        """The model's format; a tokenizer without a chat template (and no `chat_template`
        file), or a template that fails on a plain prompt, is one InputError line."""
        if spec.chat_template is not None:
            template = read_text(spec.chat_template, "template", f"{where}.chat_template: {spec.chat_template!r}")
        else:
            template = tokenizer.chat_template
            if not template:
                raise InputError(f"{where}.chat: the tokenizer of {spec.id!r} has no chat template "
                                 "(give one as `chat_template: <file>`, or drop `chat: true`)")
        chat = cls(tokenizer, template, spec.system, "")
        try:
            rendered = chat.render("A prompt.")
        except Exception as exc:  # jinja's errors, a template raising on a system turn, ...
            raise InputError(f"{where}.chat_template: the chat template fails on a prompt "
                             f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None
        writes_bos = tokenizer.bos_token is not None and rendered.startswith(tokenizer.bos_token)
        return cls(tokenizer, template, spec.system, tokenizer.bos_token if adds_bos(tokenizer) and not writes_bos else "")

    def render(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )

    def prompt(self, prompt: str) -> str:
        """The text the model reads, to be tokenized with `add_special_tokens=False`."""
        return self.bos + self.render(prompt)
