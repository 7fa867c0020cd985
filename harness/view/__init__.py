"""`harness view`: a finished run or sweep folder as a static site that opens from disk.

The site is ``index.html``, ``data.js`` (the page's data: JSON, assigned to one global so that a
page opened from ``file://`` can read it without a server; browsers refuse `fetch` there) and
``assets/`` (the page's script and style from this package, and Plotly's offline bundle from the
plotly wheel, the optional extra ``view``). Nothing is fetched from the network.

A sweep's site lists its points, each linking to its own page under ``points/<run folder>/``;
the pages share the sweep site's assets.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import jinja2

from harness.artifacts import json_text, staged, write_text
from harness.errors import InputError
from harness.rundir import is_run_dir
from harness.sweep_report import is_sweep_dir, point_runs
from harness.view.data import run_data, sweep_data

VIEW_FOLDER = "view"
"""The site's folder inside a run or sweep folder (`harness run --view`, `harness view` without -o)."""

ASSETS = ("view.js", "view.css")
"""This package's own files of the page (harness/view/assets/)."""

PLOTLY_BUNDLE = "plotly.min.js"


def plotly_bundle() -> Path:
    """Plotly's self-contained JavaScript bundle, as its Python wheel ships it."""
    try:
        import plotly  # an optional extra (harness[view]): missing, it is one line naming the install
    except ImportError:
        raise InputError("harness view needs Plotly's offline bundle: pip install 'harness[view]' (or pip install plotly)") from None
    bundle = Path(plotly.__file__).parent / "package_data" / PLOTLY_BUNDLE
    if not bundle.is_file():
        raise InputError(f"{bundle}: plotly {plotly.__version__} ships no offline bundle; pip install 'plotly>=5'")
    return bundle


def write_view(target: Path, output: Path | None = None) -> Path:
    """Write the site of run or sweep folder `target` into `output` (default: `target`/view/),
    replacing what was there; return the index.html."""
    target = Path(target)
    if not (is_run_dir(target) or is_sweep_dir(target)):
        raise InputError(f"{target}: not a finished run folder or sweep folder (no stats.json / criteria.json / sweep.json)")
    output = Path(output) if output is not None else target / VIEW_FOLDER
    if output.is_file() or (output.is_dir() and any(output.iterdir()) and not (output / "data.js").is_file()):
        raise InputError(f"{output}: -o: exists and is not a view folder; name a new or empty folder")
    bundle = plotly_bundle()
    with staged(output) as folder:
        _write_assets(folder / "assets", bundle)
        if is_sweep_dir(target):
            _write_sweep(target, folder)
        else:
            _write_page(folder, run_data(target), "assets")
        if output.exists():  # an earlier view of the same folder: replaced whole
            shutil.rmtree(output)
    return output / "index.html"


def _write_sweep(sweep_dir: Path, folder: Path) -> None:
    links, headlines = {}, {}
    for run_dir in point_runs(sweep_dir):
        data = run_data(run_dir)
        _write_page(folder / "points" / run_dir.name, data, "../../assets", up=("sweep", "../../index.html"))
        links[run_dir.name], headlines[run_dir.name] = f"points/{run_dir.name}/index.html", data["headline"]
    _write_page(folder, sweep_data(sweep_dir, links, headlines), "assets")


def _write_page(folder: Path, data: dict, assets: str, up: tuple[str, str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if up is not None:
        data = {**data, "up": {"label": up[0], "link": up[1]}}
    template = jinja2.Template(resources.files(__package__).joinpath("index.html.j2").read_text(encoding="utf-8"), autoescape=True)
    write_text(folder / "index.html", template.render(title=data["title"], assets=assets))
    # `</` inside a string would end the <script> element early; JSON allows `<\/`
    write_text(folder / "data.js", "window.HARNESS_VIEW = " + json_text(data, indent=None).replace("</", "<\\/") + ";\n")


def _write_assets(folder: Path, bundle: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, folder / PLOTLY_BUNDLE)
    for name in ASSETS:
        write_text(folder / name, resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8"))
