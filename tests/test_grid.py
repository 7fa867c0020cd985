"""The measurement grid: column names built and parsed back, multiple-testing families, the
orders capture and per_sample.csv use, and `capture.windows` with its old name `stats.positions`."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, build_tiny_model
from harness import schema, structure
from harness.errors import InputError
from harness.grid import Column, Grid, Window
from harness.spec import load_spec
from harness.stages import capture
from harness.stages.capture import Measurement, TextToMeasure

FULL = Grid(
    metrics=("smoothness", "projection_variance", "magnitude"),
    sites=("resid_post", "attn_out"),
    directions=("refusal", "probe"),
    windows=(Window(0, 5), Window(5, 20)),
    held_out=frozenset({"probe"}),
    conditions=("human", "model"),
    comparisons=("human_vs_model",),
)


def test_a_column_builds_the_names_per_sample_csv_has_always_used():
    assert Column("smoothness").name == "smoothness"
    assert Column("smoothness", "attn_out").name == "smoothness_attn_out"
    assert Column("projection_mean", direction="refusal").name == "projection_mean.refusal"
    assert Column("smoothness", window=Window(0, 5)).name == "smoothness.window0_5"
    assert Column("projection_variance", "attn_out", "refusal", Window(5, 20)).name == "projection_variance_attn_out.refusal.window5_20"


def test_every_column_of_a_grid_parses_back_to_itself():
    columns = FULL.columns()
    assert len(columns) == 2 * 3 * 4  # sites x (whole + 2 windows) x (2 metrics + 1 metric x 2 direction sets)
    for column in columns:
        assert Column.parse(column.name) == column
        assert FULL.column(column.name) == column
    assert Column.parse("ce_loss") == Column("ce_loss")  # a text metric's name reads as a column too
    assert Column.parse("magnitude_mlp_out.window3_4") == Column("magnitude", "mlp_out", window=Window(3, 4))


@pytest.mark.parametrize("name", ["", "a.b.c", "smoothness..x", "smoothness.window0_5.refusal", "projection_mean.refusal."])
def test_a_name_that_is_no_column_is_refused(name):
    with pytest.raises(ValueError):
        Column.parse(name)


def test_the_grid_looks_up_only_its_own_columns():
    with pytest.raises(KeyError, match="variance"):
        FULL.column("variance")
    with pytest.raises(KeyError):
        FULL.column("smoothness.window0_6")


def test_a_window_word_names_one_window_only():
    assert Window.parse("window5_20") == Window(5, 20)
    assert Window.parse("window05_20") is None and Window.parse("windows") is None


def test_families_are_a_columns_layers_or_every_window_of_it():
    family = {column.name: column.family for column in FULL.per_layer_columns()}
    assert family["smoothness.window0_5"] == family["smoothness.window5_20"]
    assert family["smoothness"] != family["smoothness.window0_5"]
    assert family["smoothness.window0_5"] != family["smoothness_attn_out.window0_5"]
    assert family["projection_variance.refusal.window0_5"] != family["projection_variance.probe.window0_5"]
    assert len(set(family.values())) == len(FULL.whole_columns()) * 2  # per whole column: its layers, its windows
    assert Column.parse("ce_loss").family == (Column("ce_loss"), False)


def test_the_grid_orders_columns_for_the_buffer_and_for_per_sample_csv():
    grid = Grid(("smoothness", "projection_mean"), ("resid_post", "mlp_out"), ("d",), (Window(0, 5), Window(5, 9)))
    assert [column.name for column in grid.columns()] == [
        "smoothness", "projection_mean.d",
        "smoothness.window0_5", "projection_mean.d.window0_5",
        "smoothness.window5_9", "projection_mean.d.window5_9",
        "smoothness_mlp_out", "projection_mean_mlp_out.d",
        "smoothness_mlp_out.window0_5", "projection_mean_mlp_out.d.window0_5",
        "smoothness_mlp_out.window5_9", "projection_mean_mlp_out.d.window5_9",
    ]
    assert [column.name for column in grid.per_layer_columns()] == [
        "smoothness", "projection_mean.d", "smoothness_mlp_out", "projection_mean_mlp_out.d",
        "smoothness.window0_5", "smoothness.window5_9", "projection_mean.d.window0_5", "projection_mean.d.window5_9",
        "smoothness_mlp_out.window0_5", "smoothness_mlp_out.window5_9",
        "projection_mean_mlp_out.d.window0_5", "projection_mean_mlp_out.d.window5_9",
    ]
    assert [column.name for column in grid.primary_columns()] == ["smoothness", "projection_mean.d"]
    assert grid.buffer_shape(layers=3, texts=4) == (12, 3, 4)


def test_the_vocabulary_and_the_held_out_samples():
    vocabulary = FULL.statistic_vocabulary()
    assert {"smoothness_attn_out", "refusal", "window5_20", "human_vs_model", "model", "ce_loss", "p_holm"} <= vocabulary
    assert not {"smoothness.window0_5", "layer3"} & vocabulary
    held_out = FULL.held_out_samples({"refusal": [9], "probe": [0, 1]})
    assert set(held_out) == {column.name for column in FULL.per_layer_columns() if column.direction == "probe"}
    assert all(samples == {0, 1} for samples in held_out.values())


def test_a_shipped_spec_builds_its_grid():
    grid = load_spec(REPO / "specs" / "quickstart-directions.yaml").grid
    assert grid.directions == ("model_minus_human",) and grid.held_out == {"model_minus_human"}
    assert [column.name for column in grid.primary_columns()][-3:] == [
        "projection_variance.model_minus_human", "projection_smoothness.model_minus_human", "projection_mean.model_minus_human",
    ]


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return build_tiny_model("llama", len(tiny_tokenizer))


def test_capture_fills_and_names_its_buffer_in_grid_order(llama, tiny_tokenizer):
    """Each column measured in the full grid equals the same column measured alone: the value a
    name gets is the value computed for that column, whatever else the buffer holds."""
    texts = [TextToMeasure("The game began development in 2010.", "It carried over a large portion of the work, as planned."),
             TextToMeasure("A short one here.", "Yes, it is short.")]
    tokenized = [capture.tokenize_for_capture(tiny_tokenizer, text) for text in texts]
    layers = structure.resolve_layers(llama, "all")
    vectors = {name: torch.nn.functional.normalize(torch.randn(len(layers), 32, generator=torch.Generator().manual_seed(seed)), dim=-1)
               for seed, name in enumerate(FULL.directions)}

    def measure(grid: Grid) -> list[dict]:
        measurement = Measurement(grid, layers, directions={name: vectors[name] for name in grid.directions})
        return capture.measure_batch(llama, torch.device("cpu"), tiny_tokenizer.pad_token_id, tokenized, measurement)

    together = measure(FULL)
    assert [list(record["layer_metrics"]) for record in together] == [[c.name for c in FULL.columns()]] * len(texts)
    for column in FULL.columns():
        alone = measure(Grid((column.metric,), (column.site,), (column.direction,) if column.direction else (),
                             (column.window,) if column.window else ()))
        for full_record, alone_record in zip(together, alone):
            np.testing.assert_allclose(full_record["layer_metrics"][column.name], alone_record["layer_metrics"][column.name],
                                       rtol=1e-6, atol=1e-7, err_msg=column.name)


def write(folder: Path, text: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


SPEC = """
    name: windows
    models: {base: {id: some/model}}
    conditions: {human: {source: human}, model: {source: generate}}
    criteria: {late: smoothness.window5_20.overall.d > 0}
"""


def test_stats_positions_is_the_old_name_of_capture_windows(tmp_path, caplog):
    schema._note_renamed.cache_clear()
    new = load_spec(write(tmp_path, SPEC + "    capture: {windows: [[0, 5], [5, 20]]}\n"))
    with caplog.at_level(logging.WARNING, logger=schema.__name__):
        old = load_spec(write(tmp_path, SPEC + "    stats: {positions: [[0, 5], [5, 20]]}\n"))
        load_spec(tmp_path / "spec.yaml")
    assert old == new and old.grid.windows == (Window(0, 5), Window(5, 20))
    assert [record.getMessage() for record in caplog.records] == [
        "note: stats.positions is deprecated: it is now capture.windows, same meaning (rename it in the spec)"
    ]  # once


def test_a_spec_giving_both_names_of_the_windows_is_refused(tmp_path):
    both = SPEC + "    capture: {windows: [[0, 5]]}\n    stats: {positions: [[5, 20]]}\n"
    with pytest.raises(InputError, match=r"stats\.positions: is the old name of capture\.windows; give only capture\.windows"):
        load_spec(write(tmp_path, both))


def test_a_metric_named_like_another_metric_at_a_site_is_refused(tmp_path, monkeypatch):
    from harness.metrics import LAYER_METRICS

    monkeypatch.setitem(LAYER_METRICS._entries, "magnitude_attn_out", LAYER_METRICS["magnitude"])  # registered for this test only
    monkeypatch.setitem(LAYER_METRICS._origins, "magnitude_attn_out", "tests")
    spec = SPEC.replace("criteria: {late: smoothness.window5_20.overall.d > 0}", "metrics: [smoothness, magnitude_attn_out]")
    with pytest.raises(InputError, match=r"metrics: 'magnitude_attn_out' at site 'resid_post' is named 'magnitude_attn_out'"):
        load_spec(write(tmp_path, spec))
