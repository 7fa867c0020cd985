"""The data stage: filtering and first-sentence split exactly as specified."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from harness import data_sources
from harness.data_sources import WikiTextDataset as DatasetSpec
from harness.errors import InputError
from harness.spec import load_spec
from harness.stages import data

from conftest import wikitext_rows

SHARED_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
"""The project's CI copy of the split (absent on a user's machine)."""


def test_split_at_first_period_space_past_character_ten():
    assert data_sources.split_first_sentence("Dr. No is a film. It was made in 1962.") == ("Dr. No is a film.", "It was made in 1962.")
    assert data_sources.split_first_sentence("Short. Text here without") is None
    assert data_sources.split_first_sentence("No sentence break at all") is None


def test_first_sentence_rule_skip_drops_an_early_period_the_next_rule_passes_over():
    early = "Dr. No is a film. It was made in 1962."
    late = "A film was made in 1962. Dr. No came out."
    assert data_sources.split_first_sentence(early, "skip") is None
    assert data_sources.split_first_sentence(late, "skip") == data_sources.split_first_sentence(late, "next") == (
        "A film was made in 1962.", "Dr. No came out."
    )


def test_selection_with_the_reference_rule_skips_paragraphs_with_an_early_period(tiny_tokenizer):
    spec = DatasetSpec(n_samples=40, min_tokens=30, max_tokens=200, first_sentence="skip")
    samples = data.select_samples(data_sources.paragraphs(wikitext_rows(), spec), tiny_tokenizer, spec, "spec.yaml")
    expected = []
    for index, row in enumerate(wikitext_rows()):  # the reference's rule, restated
        text = row.strip()
        if not text or text.startswith("="):
            continue
        count = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
        first = text.find(". ")
        if 30 <= count <= 200 and first > 10:
            expected.append((index, text[: first + 1], text[first + 2 :]))
        if len(expected) == 40:
            break
    assert [(s.row, s.prompt, s.responses["human"]) for s in samples] == expected
    next_rule = spec.model_copy(update={"first_sentence": "next"})
    with_next_rule = data.select_samples(data_sources.paragraphs(wikitext_rows(), next_rule), tiny_tokenizer, next_rule, "spec.yaml")
    assert [s.row for s in with_next_rule] != [s.row for s in samples]  # an early ". " occurs among these rows


def test_selection_follows_the_rules(tiny_tokenizer):
    spec = DatasetSpec(n_samples=10, min_tokens=30, max_tokens=200)
    samples = data.select_samples(data_sources.paragraphs(wikitext_rows(), spec), tiny_tokenizer, spec, "spec.yaml")
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
    assert [(s.row, s.prompt, s.responses["human"]) for s in samples] == expected
    assert all(s.prompt.endswith(".") for s in samples)


def test_too_few_paragraphs_is_an_input_error(tiny_tokenizer):
    spec = DatasetSpec(n_samples=5, min_tokens=30, max_tokens=200)
    with pytest.raises(InputError, match=r"spec.yaml: dataset.n_samples: only [0-4] paragraphs .* 5 asked for"):
        data.select_samples(data_sources.paragraphs(wikitext_rows()[:8], spec), tiny_tokenizer, spec, "spec.yaml")


def test_detokenize_undoes_wikitext_artifacts():
    raw = "The 1 @,@ 000 @-@ strong army ( led by him ) won , and it 's over ."
    assert data_sources.detokenize(raw) == "The 1,000-strong army (led by him) won, and it's over."


def test_packaged_rows_equal_the_shared_copy_in_order():
    if not SHARED_COPY.is_file():
        pytest.skip(f"{SHARED_COPY} is not on this machine")
    assert data_sources.packaged_rows("spec.yaml") == SHARED_COPY.read_text(encoding="utf-8").splitlines()


def test_a_packaged_copy_with_another_digest_is_refused(monkeypatch):
    monkeypatch.setattr(data_sources, "PACKAGED_SHA256", "0" * 64)
    with pytest.raises(InputError, match=r"^spec.yaml: dataset: packaged copy .* has sha256 4f3e427e4aff") as error:
        data_sources.packaged_rows("spec.yaml")
    assert "\n" not in str(error.value)


def test_rows_come_from_the_spec_file_then_the_packaged_copy_then_the_hub(tmp_path, monkeypatch):
    hub_calls = []
    monkeypatch.setattr(data_sources, "load_hub_split",
                        lambda name, config, split, revision, where: hub_calls.append(config) or {"text": ["A hub row of text. Its rest."]})
    spec_file = tmp_path / "sub" / "spec.yaml"
    spec_file.parent.mkdir()
    (spec_file.parent / "rows.txt").write_text("The first row here. Its rest.\r\n= Heading =\r\nThe second row. More.\r\n", encoding="utf-8")
    spec_file.write_text(
        "name: x\nmodels: {base: {id: m}}\ndataset: {path: rows.txt}\n"
        "conditions: {human: {source: human}, model: {source: generate}}\n",
        encoding="utf-8",
    )
    named = load_spec(spec_file).dataset  # relative to the spec file's folder, not the working dir
    assert Path(named.path) == spec_file.parent / "rows.txt" and named.read_at_collection
    table = data_sources.read_table(named, "spec.yaml")
    assert [(r.row, r.prompt, r.responses) for r in table.records] == [
        (0, "The first row here.", {"human": "Its rest."}), (2, "The second row.", {"human": "More."})]
    assert table.sha256 == hashlib.sha256((spec_file.parent / "rows.txt").read_bytes()).hexdigest()
    packaged = data_sources.read_table(DatasetSpec(), "spec.yaml")
    assert packaged.records == data_sources.paragraphs(data_sources.packaged_rows("spec.yaml"), DatasetSpec())
    assert not DatasetSpec().read_at_collection and not DatasetSpec().reads_hub
    hub = DatasetSpec(hub_config="wikitext-103-raw-v1")
    assert hub.reads_hub and [r.prompt for r in data_sources.read_table(hub, "spec.yaml").records] == ["A hub row of text."]
    assert hub_calls == ["wikitext-103-raw-v1"]


def test_a_named_file_that_does_not_exist_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"^spec.yaml: dataset.path: .*missing.txt: file not found$"):
        data_sources.read_table(DatasetSpec(path=str(tmp_path / "missing.txt")), "spec.yaml")
