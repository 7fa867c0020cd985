"""Data sources end to end on the tiny model: a JSONL and a CSV file with their own column names,
response columns as conditions, a covariate in per_sample.csv, a chat-formatted generator; the
issue's interface spec, as written there, runs."""

from __future__ import annotations

import csv
import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from harness import data_sources
from harness.session import run_spec
from harness.spec import load_spec
from harness.stages.stats import load_table

ROWS = [
    {"uid": f"q{i}", "question": f"Question {i}: what happened in the year 18{i}0, and why?",
     "answer": f"In 18{i}0 the river flooded, the town \"moved\", and a new bridge was built, {i} times over.",
     "alt_answer": f"Nothing much happened in 18{i}0;\nthe records are lost.", "difficulty": i % 3}
    for i in range(8)
]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def interface_spec(folder: Path, model_dir: Path, source: str, path: str) -> Path:
    """The issue's interface, on the tiny model (which has no chat template: a file gives one)."""
    (folder / "chat.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    spec = folder / f"{source}.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: own-data-{source}
        dataset:
          source: {source}
          path: {path}
          columns: {{id: uid, prompt: question}}
          responses: {{reference: answer, alternative: alt_answer}}
          covariates: [difficulty]
          n_samples: 8
        conditions:
          reference: {{source: column, column: reference}}
          alternative: {{source: column, column: alternative}}
          model: {{source: generate, generation: {{max_new_tokens: 6}}}}
        models:
          base: {{id: "{model_dir}", chat: true, system: "You are a helpful assistant.", chat_template: chat.jinja}}
        metrics: [smoothness]
        stats: {{bootstrap_resamples: 50, mixed_model: false}}
        report: {{plots: false}}
        criteria:
          smoother: smoothness.overall.d > 0
    """), encoding="utf-8")
    return spec


def write_csv(path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)


@pytest.fixture(scope="module", params=["jsonl", "csv"])
def own_data_run(request, tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "jsonl":
        (folder / "my-data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
        spec = interface_spec(folder, tiny_model_dir, "jsonl", "my-data.jsonl")
    else:
        write_csv(folder / "my-data.csv")
        spec = interface_spec(folder, tiny_model_dir, "csv", "my-data.csv")
    return request.param, run_spec(spec, folder / "runs", log=lambda line: None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_texts_are_the_file_rows_verbatim(own_data_run):
    _, outcome = own_data_run
    texts = read_jsonl(outcome.run_dir / "texts.jsonl")
    for condition, column in (("reference", "answer"), ("alternative", "alt_answer")):
        mine = [text for text in texts if text["condition"] == condition]
        assert len(mine) == len(ROWS)  # n is the row count
        # a CSV cell is text: the same strings, quotes, commas and newlines included
        assert [(t["prompt"], t["response"]) for t in mine] == [(row["question"], row[column]) for row in ROWS]
    samples = read_jsonl(outcome.run_dir / "samples.jsonl")
    assert [sample["id"] for sample in samples] == [row["uid"] for row in ROWS]


def test_a_covariate_reaches_per_sample_csv(own_data_run):
    _, outcome = own_data_run
    table = load_table(outcome.run_dir / "per_sample.csv")
    by_sample = table.groupby("sample_id")["difficulty"].unique()  # one value per sample, on every row of it
    assert {key: [str(v) for v in value] for key, value in by_sample.items()} == {
        str(i): [str(row["difficulty"])] for i, row in enumerate(ROWS)}
    assert set(table["condition"]) == {"reference", "alternative", "model"}


def test_the_chat_model_reads_its_template_with_one_bos(own_data_run, tiny_tokenizer):
    _, outcome = own_data_run
    texts = read_jsonl(outcome.run_dir / "texts.jsonl")
    for text in texts:
        assert text["model_prompt"] == (
            f"<bos>[system] You are a helpful assistant.\n[user] {text['prompt']}\n[assistant] "
        )
        ids = tiny_tokenizer(text["model_prompt"], add_special_tokens=False)["input_ids"]
        assert ids.count(tiny_tokenizer.bos_token_id) == 1
    generated = [text for text in texts if text["condition"] == "model"]
    assert len(generated) == len(ROWS) and all(text["generator"] == "base" for text in generated)


def test_the_data_key_holds_the_hash_of_the_bytes_read(tmp_path):
    path = tmp_path / "my-data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    spec = data_sources.JsonlDataset(source="jsonl", path=str(path), columns={"id": "uid", "prompt": "question"},
                                     responses={"reference": "answer"}, covariates=["difficulty"])
    table = data_sources.read_table(spec, "spec.yaml")
    assert table.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [(r.id, r.prompt, r.responses, r.covariates) for r in table.records] == [
        (row["uid"], row["question"], {"reference": row["answer"]}, {"difficulty": row["difficulty"]}) for row in ROWS]


def test_a_parquet_file_reads_as_the_jsonl_does(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "my-data.parquet")
    (tmp_path / "my-data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    common = dict(columns={"id": "uid", "prompt": "question"}, responses={"reference": "answer", "alternative": "alt_answer"},
                  covariates=["difficulty"])
    parquet = data_sources.ParquetDataset(source="parquet", path=str(tmp_path / "my-data.parquet"), **common)
    jsonl = data_sources.JsonlDataset(source="jsonl", path=str(tmp_path / "my-data.jsonl"), **common)
    assert data_sources.read_table(parquet, "s").records == data_sources.read_table(jsonl, "s").records


def test_a_hub_source_names_name_config_split_revision(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data_sources, "load_hub_split", lambda *args: calls.append(args[:4]) or ROWS)
    spec = tmp_path / "hub.yaml"
    spec.write_text(textwrap.dedent("""
        name: hub
        models: {base: {id: m}}
        dataset:
          source: hub
          hub: {name: org/prefs, config: default, split: test, revision: v1.0}
          columns: {prompt: question}
          responses: {chosen: answer, rejected: alt_answer}
        conditions:
          chosen: {source: column, column: chosen}
          rejected: {source: column, column: rejected}
    """), encoding="utf-8")
    dataset = load_spec(spec).dataset
    assert dataset.reads_hub and not dataset.read_at_collection
    records = data_sources.read_table(dataset, str(spec)).records
    assert calls == [("org/prefs", "default", "test", "v1.0")]
    assert [r.responses["rejected"] for r in records] == [row["alt_answer"] for row in ROWS]
    assert [r.id for r in records] == [str(i) for i in range(len(ROWS))]  # no id column: the row


def test_lengths_count_words_or_characters_without_a_tokenizer(tmp_path):
    from harness.stages.data import select_samples

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    base = dict(source="jsonl", path=str(path), columns={"prompt": "question"}, responses={"reference": "answer"})
    records = data_sources.read_table(data_sources.JsonlDataset(**base), "s").records
    words = data_sources.JsonlDataset(**base, length_unit="words", min_tokens=10, max_tokens=40)
    chars = data_sources.JsonlDataset(**base, length_unit="characters", min_tokens=1, max_tokens=10_000)
    kept = select_samples(records, None, words, "s")
    assert [s.length for s in kept] == [len(f"{r.prompt} {r.responses['reference']}".split()) for r in records]
    assert [s.length for s in select_samples(records, None, chars, "s")] == [
        len(f"{r.prompt} {r.responses['reference']}") for r in records]


def test_a_dataset_of_prompts_only_is_valid_when_every_condition_generates(tmp_path):
    (tmp_path / "prompts.csv").write_text("text\nOnce upon a time\n", encoding="utf-8")  # validate opens the file
    spec = tmp_path / "prompts.yaml"
    spec.write_text(textwrap.dedent("""
        name: prompts-only
        models: {base: {id: m}}
        dataset: {source: csv, path: prompts.csv, columns: {prompt: text}}
        conditions:
          greedy: {source: generate}
          sampled: {source: generate, generation: {temperature: 0.7}}
    """), encoding="utf-8")
    dataset = load_spec(spec).dataset
    assert dataset.response_names() == [] and dataset.n_samples is None and not dataset.filters_length
