"""The data stage: filtering and first-sentence split exactly as specified."""

from __future__ import annotations

import pytest

from harness.stages import data
from harness.errors import InputError
from harness.schema import DatasetSpec

from conftest import wikitext_rows


def test_split_at_first_period_space_past_character_ten():
    assert data.split_first_sentence("Dr. No is a film. It was made in 1962.") == ("Dr. No is a film.", "It was made in 1962.")
    assert data.split_first_sentence("Short. Text here without") is None
    assert data.split_first_sentence("No sentence break at all") is None


def test_selection_follows_the_rules(tiny_tokenizer):
    spec = DatasetSpec(n_samples=10, min_tokens=30, max_tokens=200)
    samples = data.select_samples(wikitext_rows(), tiny_tokenizer, spec, "spec.yaml")
    assert [s.sample_id for s in samples] == list(range(10))
    rows = wikitext_rows()
    expected = []
    for index, row in enumerate(rows):  # an independent re-statement of the rules
        text = row.strip()
        if not text or text.startswith("="):
            continue
        count = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
        cut = text.find(". ", 11)
        if 30 <= count <= 200 and cut > 10:
            expected.append((index, text[: cut + 1], text[cut + 2 :]))
        if len(expected) == 10:
            break
    assert [(s.row, s.prompt, s.human_response) for s in samples] == expected
    assert all(s.prompt.endswith(".") for s in samples)


def test_too_few_paragraphs_is_an_input_error(tiny_tokenizer):
    spec = DatasetSpec(n_samples=5, min_tokens=30, max_tokens=200)
    with pytest.raises(InputError, match=r"spec.yaml: dataset.n_samples: only [0-4] paragraphs .* 5 asked for"):
        data.select_samples(wikitext_rows()[:8], tiny_tokenizer, spec, "spec.yaml")


def test_detokenize_undoes_wikitext_artifacts():
    raw = "The 1 @,@ 000 @-@ strong army ( led by him ) won , and it 's over ."
    assert data.detokenize(raw) == "The 1,000-strong army (led by him) won, and it's over."
