"""`harness view` in a real headless Chromium (Debian's chromium, driven by Selenium through
chromium-driver): a sweep of a tiny local model, its site opened from file://.

Where no Chromium is installed the browser tests skip with a message; in CI (CI=true) they fail
instead. Each browser test keeps a screenshot in its tmp dir (screenshot.png).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.diagnostics import overall_metric
from harness.rundir import read_criteria
from harness.session import run_spec
from harness.stages.stats import load_table
from harness.sweep_report import point_runs
from harness.view import write_view
from conftest import unavailable
from test_run import Log, tiny_spec


try:
    import plotly  # noqa: F401
except ImportError:
    unavailable("harness view needs plotly (pip install 'harness[view]')")

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("HARNESS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HARNESS_CHROMEDRIVER", "/usr/bin/chromedriver")
WINDOWS = "capture: {windows: [[0, 4], [4, 10]]}\n"
MATRIX = "matrix:\n  stats.bootstrap_resamples: [100, 200]\n"
DIRECTIONS = """
metrics: [smoothness, magnitude, projection_mean]
directions: {probe: {path: probe.npy}}
criteria: {probe_moves: projection_mean.probe.layer1.d > -100}
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir):
    """A two-point sweep (the points share every stage but stats), with position windows and a
    direction set (a random direction per layer)."""
    folder = tmp_path_factory.mktemp("view")
    np.save(folder / "probe.npy", np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32))
    tiny_spec(folder, tiny_model_dir, name="tinyview", extra=WINDOWS)
    spec = folder / "tinyviewsweep.yaml"
    spec.write_text("extends: tinyview.yaml\nname: tinyviewsweep\n" + MATRIX + DIRECTIONS)
    outcome = run_spec(spec, folder / "runs", log=Log())
    return outcome.sweep_dir


@pytest.fixture(scope="module")
def run_dir(sweep):
    return point_runs(sweep)[0]


@pytest.fixture(scope="module")
def run_view(run_dir, tmp_path_factory):
    return write_view(run_dir, tmp_path_factory.mktemp("site") / "view")


def page_data(index: Path) -> dict:
    text = (index.parent / "data.js").read_text(encoding="utf-8")
    return json.loads(text[text.index("=") + 1 : text.rindex(";")])


# --- the site's files -------------------------------------------------------------------------


def test_the_site_ships_its_scripts_and_names_no_network_resource(run_view):
    folder = run_view.parent
    assert {path.name for path in (folder / "assets").iterdir()} == {"plotly.min.js", "view.js", "view.css"}
    for own in (run_view, folder / "assets" / "view.js", folder / "assets" / "view.css"):
        text = own.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, own
    html = run_view.read_text(encoding="utf-8")
    assert 'src="assets/plotly.min.js"' in html and 'src="data.js"' in html


def test_the_data_reads_the_runs_own_statistic_and_column_names(run_dir, run_view):
    data = page_data(run_view)
    stats = json.loads((run_dir / "stats.json").read_text())
    criteria = read_criteria(run_dir)
    assert [c["name"] for c in data["criteria"]] == [c["name"] for c in criteria]
    for shown, row in zip(data["criteria"], criteria):
        assert [s["name"] for s in shown["statistics"]] == list(row["values"])
        for stat in shown["statistics"]:
            assert stat["value"] == pytest.approx(stats[stat["name"]])
            for name, value in stat["related"].items():
                assert value is None or isinstance(value, float | int), name
    smoother = next(c for c in data["criteria"] if c["name"] == "model_text_smoother")
    d = next(s for s in smoother["statistics"] if s["name"] == "smoothness.overall.d")
    assert d["ci"] == pytest.approx([stats["smoothness.overall.d_ci_low"], stats["smoothness.overall.d_ci_high"]])
    assert d["curve"]["layers"] == [0, 1, 2]
    assert d["curve"]["values"] == pytest.approx([stats[f"smoothness.layer{layer}.d"] for layer in range(3)])
    # the window columns are the grid's names, each with its per-layer effect curve
    windows = {entry["column"]: [w["column"] for w in entry["windows"]] for entry in data["windows"]}
    assert windows["smoothness"] == ["smoothness.window0_4", "smoothness.window4_10"]
    primary = data["primary"]["comparison"]
    assert set(data["effects"][primary]) == {name for entry in data["windows"] for name in (entry["column"], *windows[entry["column"]])}
    assert set(windows) == {"smoothness", "magnitude", "projection_mean.probe"}
    assert [row["metric"] for row in data["directions"][0]["rows"]] == ["projection_mean.probe"]


def test_the_samples_carry_each_conditions_response_and_the_per_sample_difference(run_dir, run_view):
    data = page_data(run_view)
    table = load_table(run_dir / "per_sample.csv")
    overall = overall_metric(table, "smoothness").set_index(["condition", "sample_id"])["value"]
    texts = [json.loads(line) for line in (run_dir / "texts.jsonl").read_text().splitlines()]
    assert len(data["samples"]) == 6
    for sample in data["samples"]:
        key = str(sample["id"])
        assert sample["diff"] == pytest.approx(overall[("human", key)] - overall[("model", key)])
        for text in (t for t in texts if t["sample_id"] == sample["id"]):
            assert sample["conditions"][text["condition"]]["response"] == text["response"]


def test_a_bad_target_or_output_is_one_line_and_exit_2(tmp_path, run_dir):
    def view(*args):
        return subprocess.run([sys.executable, "-m", "harness", "view", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)

    missing = view(str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not a finished run folder" in missing.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    refused = view(str(run_dir), "-o", str(occupied))
    assert refused.returncode == 2 and "not a view folder" in refused.stderr and (occupied / "notes.txt").is_file()


# --- in the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install 'harness[browser]')")
    if missing:
        unavailable(f"no headless Chromium to test the view in: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, tmp_path):
    """Open a site's index.html from file://; afterwards, keep a screenshot and check that the
    browser logged no error and requested nothing but local files."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser"), browser.get_log("performance")  # what earlier tests left

    def open_page(index: Path):
        browser.get(index.resolve().as_uri())
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.readyState") == "complete"
                                         and d.find_elements("css selector", "#summary"))
        return browser

    yield open_page
    browser.save_screenshot(str(tmp_path / "screenshot.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    requested = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requested if m["method"] == "Network.requestWillBeSent"}
    assert urls and all(url.startswith(("file://", "data:")) for url in urls), urls


def wait_for(browser, css: str, count: int | None = None):
    from selenium.webdriver.support.ui import WebDriverWait

    def found(driver):
        nodes = driver.find_elements("css selector", css)
        return nodes if nodes and (count is None or len(nodes) == count) else False

    return WebDriverWait(browser, 30).until(found)


def test_the_page_loads_from_disk_and_draws_its_plots(page, run_view):
    browser = page(run_view)
    assert browser.execute_script("return typeof Plotly") == "object"
    wait_for(browser, "#effect-plot .main-svg")
    wait_for(browser, "#window-plot .main-svg")
    assert browser.find_element("css selector", "#manifest").is_displayed()
    assert "smoothness" in browser.find_element("css selector", "#effect-plot").text
    assert "projection_mean.probe" in browser.find_element("css selector", "#directions").text


def test_every_criterion_is_listed_with_its_outcome(page, run_dir, run_view):
    browser = page(run_view)
    listed = {node.get_attribute("data-criterion"): node.get_attribute("data-outcome")
              for node in browser.find_elements("css selector", "li.criterion")}
    expected = {row["name"]: "ERROR" if row.get("error") else ("PASSED" if row["passed"] else "FAILED") for row in read_criteria(run_dir)}
    assert listed == expected
    for node in browser.find_elements("css selector", "li.criterion"):
        assert node.find_element("css selector", ".badge").text == node.get_attribute("data-outcome")


def test_clicking_a_criterion_shows_its_statistics_with_intervals_and_curve(page, run_dir, run_view):
    browser = page(run_view)
    stats = json.loads((run_dir / "stats.json").read_text())
    browser.find_element("css selector", 'li.criterion[data-criterion="model_text_smoother"]').click()
    detail = browser.find_element("css selector", "#criterion-detail")
    assert detail.is_displayed()
    rows = {row.find_elements("css selector", "td")[0].text: row.text
            for row in detail.find_elements("css selector", "table.statistics tbody tr")}
    assert set(rows) == {"smoothness.overall.d", "smoothness.overall.p"}
    low = stats["smoothness.overall.d_ci_low"]
    assert browser.execute_script("return arguments[0].toPrecision(4)", low).rstrip("0").rstrip(".") in rows["smoothness.overall.d"]
    wait_for(browser, '.criterion-curve[data-statistic="smoothness.overall.d"] .main-svg')


def test_the_sample_browser_lists_every_sample_and_sorts(page, run_view):
    browser = page(run_view)
    data = page_data(run_view)
    rows = wait_for(browser, "tr.sample", len(data["samples"]))
    assert browser.find_element("css selector", "#sample-count").text == f"{len(data['samples'])} of {len(data['samples'])} samples"
    by_diff = [str(s["id"]) for s in sorted(data["samples"], key=lambda s: s["diff"], reverse=True)]
    assert [row.get_attribute("data-sample") for row in rows] == by_diff  # sorted by the difference at first
    browser.find_element("css selector", 'th[data-sort="diff"]').click()
    assert [row.get_attribute("data-sample") for row in browser.find_elements("css selector", "tr.sample")] == by_diff[::-1]
    browser.find_element("css selector", 'th[data-sort="id"]').click()
    ids = [int(row.get_attribute("data-sample")) for row in browser.find_elements("css selector", "tr.sample")]
    assert ids == sorted(ids, reverse=True)
    short = sum(1 for s in data["samples"] if s["short"])
    browser.find_element("css selector", "#only-short").click()
    assert len(browser.find_elements("css selector", "tr.sample")) == short


def test_a_token_heatmap_renders_for_a_chosen_sample(page, run_dir, run_view):
    from selenium.webdriver.support.ui import Select

    browser = page(run_view)
    deltas = [json.loads(line) for line in (run_dir / "token_deltas.jsonl").read_text().splitlines()]
    chosen = sorted({row["sample_id"] for row in deltas})[-1]
    Select(browser.find_element("css selector", "#token-sample")).select_by_value(str(chosen))
    layer = browser.find_element("css selector", "#token-layer").get_attribute("value")
    for condition in ("human", "model"):
        row = next(r for r in deltas if r["sample_id"] == chosen and r["condition"] == condition and str(r["layer"]) == layer)
        tokens = wait_for(browser, f'.heat-row[data-condition="{condition}"] .tok', len(row["tokens"]))
        coloured = [token for token in tokens if "background" in (token.get_attribute("style") or "")]
        assert len(coloured) == sum(norm is not None for norm in row["norms"])
        assert [token.get_attribute("textContent") for token in tokens] == [t.replace("\n", "↵") for t in row["tokens"]]
    wait_for(browser, "#token-plot .main-svg")
    assert f"sample #{chosen}" in browser.find_element("css selector", "#token-plot").text


def test_a_sweeps_view_links_each_points_page(page, sweep, tmp_path):
    index = write_view(sweep, tmp_path / "sweep-view")
    browser = page(index)
    links = browser.find_elements("css selector", "a.point-link")
    runs = point_runs(sweep)
    assert [link.text for link in links] == [point["id"] for point in json.loads((sweep / "sweep.json").read_text())["points"]]
    assert all((index.parent / "points" / run.name / "index.html").is_file() for run in runs)
    links[-1].click()
    wait_for(browser, "li.criterion")
    assert browser.current_url.endswith(f"points/{runs[-1].name}/index.html")
    assert browser.find_element("css selector", "header .up a").text == "← sweep"
