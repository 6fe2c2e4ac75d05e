"""The HTML reports render offline: real pages, opened in headless Chromium without a network.

Two pages are built the way the pipeline builds them: the DVC plots page, by the flow's
``_render_dvc_plots`` over a tiny DVC project of two experiments, and the Great Expectations
Data Docs, by ``validate_manifest`` over a small manifest of scikit-learn's digits. Chromium
(tests/browser.py) resolves no host name and routes through a dead proxy, so a script still
loaded from a CDN would not run: the charts and the index table are drawn only when the
pages' scripts are the local copies of web/node_modules.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from prefect.logging import disable_run_logger
from sklearn.datasets import load_digits

from pipelines.flows import _render_dvc_plots
from tests.browser import render_dom, screenshot
from tests.test_validation import CLASSES, THRESHOLDS
from tlflax.data.manifest import image_manifest
from tlflax.data.subsets import stratified_subset
from tlflax.offline_pages import WEB_ASSETS, localise_data_docs, localise_pages, remote_references
from tlflax.validation import validate_manifest

EXPERIMENT = "demo"
STEPS = 12
# A Vega chart drawn by vega-embed: an SVG of marks, or a canvas.
DRAWN_CHART = re.compile(r'<svg[^>]*class="marks"|<canvas')


def _require_web_assets() -> None:
    if not WEB_ASSETS.is_dir():
        pytest.fail(f"{WEB_ASSETS} missing: run `make assets` (npm ci --prefix web)")


# --- The DVC plots page -----------------------------------------------------------------------


def _write_pipeline(path: Path, experiment: str, wdir: str | None = None) -> None:
    stage = {
        "cmd": "true",
        "plots": [
            {f"dvclive/{experiment}/train/plots/metrics": {"x": "step", "cache": False}},
            {
                f"plots/{experiment}/confusion.csv": {
                    "template": "confusion",
                    "x": "predicted",
                    "y": "actual",
                    "cache": False,
                }
            },
        ],
    }
    if wdir:
        stage["wdir"] = wdir
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"stages": {"train": stage}}))
    (path.parent / "params.yaml").write_text(yaml.safe_dump({"experiment": experiment}))


@pytest.fixture(scope="module")
def dvc_plots_page(tmp_path_factory) -> Path:
    """The flow's plots page of experiment ``demo`` in a DVC project that also holds an
    experiment ``other`` whose plot files do not exist yet (it has not run)."""
    _require_web_assets()
    project = tmp_path_factory.mktemp("dvc_plots")
    _write_pipeline(project / "dvc.yaml", EXPERIMENT)
    _write_pipeline(project / "experiments/other/dvc.yaml", "other", wdir="../..")
    metrics = project / "dvclive" / EXPERIMENT / "train/plots/metrics"
    metrics.mkdir(parents=True)
    loss = 1.0 / (1.0 + np.arange(STEPS))
    for name, values in (("train_loss", loss), ("validation_accuracy", 1.0 - loss / 2)):
        rows = [f"step\t{name}", *(f"{step}\t{value:.4f}" for step, value in enumerate(values))]
        (metrics / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    confusion = project / "plots" / EXPERIMENT / "confusion.csv"
    confusion.parent.mkdir(parents=True)
    confusion.write_text("actual,predicted\ncat,cat\ncat,dog\ndog,dog\ndog,dog\n")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    with disable_run_logger():
        index = _render_dvc_plots(project, EXPERIMENT, refresh=True)
    assert index is not None, "dvc plots show wrote no page"
    return index


def test_dvc_plots_page_draws_its_charts_offline(dvc_plots_page: Path, tmp_path: Path) -> None:
    html = dvc_plots_page.read_text()
    assert remote_references(html) == []
    # Only the experiment's own plots: the other experiment's, not run yet, made DVC fail.
    assert "dvclive/other" not in html and "plots/other" not in html
    plot_ids = re.findall(r'vegaEmbed\(\s*["\']#([^"\']+)', html)
    assert len(plot_ids) == 3, plot_ids  # two learning curves and the confusion matrix

    dom = render_dom(dvc_plots_page)
    for plot_id in plot_ids:
        division = _element_by_id(dom, plot_id)
        assert DRAWN_CHART.search(division), f"plot {plot_id} not drawn:\n{division[:2000]}"
    screenshot(dvc_plots_page, tmp_path / "dvc_plots.png")


def test_a_page_still_loading_vega_from_a_cdn_stays_blank(dvc_plots_page: Path) -> None:
    """The control: the browser really is offline, so the test above proves the local copies."""
    html = dvc_plots_page.read_text().replace(
        'src="static/vendor/', 'src="https://cdn.jsdelivr.net/npm/'
    )
    online_only = dvc_plots_page.with_name("online_only.html")
    online_only.write_text(html)
    assert remote_references(html)
    assert not DRAWN_CHART.search(render_dom(online_only, wait_ms=2000))


def _element_by_id(dom: str, element_id: str) -> str:
    """The HTML from the element with ``element_id`` to the next element with a plot id."""
    start = dom.index(f'id="{element_id}"')
    following = re.search(r'<div id="', dom[start + 1 :])
    return dom[start : start + 1 + following.start()] if following else dom[start:]


# --- Great Expectations Data Docs ---------------------------------------------------------


@pytest.fixture(scope="module")
def data_docs(tmp_path_factory) -> Path:
    """The Data Docs site of one validation run, built by ``validate_manifest``."""
    _require_web_assets()
    data = load_digits()
    images = (data.images * 15).astype(np.uint8)[..., np.newaxis]
    labels = data.target.astype(np.int64)
    splits = {"train": stratified_subset(labels, per_class=10, seed=0)}
    splits["validation"] = stratified_subset(labels, per_class=5, seed=1, exclude=splits["train"])
    taken = np.concatenate(list(splits.values()))
    splits["test"] = stratified_subset(labels, per_class=5, seed=2, exclude=taken)
    manifest = image_manifest(
        {split: (images[rows], labels[rows]) for split, rows in splits.items()}, CLASSES
    )
    site = tmp_path_factory.mktemp("validation") / "data_docs"
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=site)
    assert summary.data_docs_index.is_file()
    return site


def test_data_docs_reference_only_local_files(data_docs: Path) -> None:
    pages = sorted(data_docs.rglob("*.html"))
    assert len(pages) >= 3  # index, expectation suite, validation result
    for page in pages:
        html = page.read_text()
        assert remote_references(html) == [], page
        for tag in re.findall(r"<(?:script|link)\b[^>]*>", html):
            assert "integrity=" not in tag and "crossorigin" not in tag, (page, tag)
        for reference in re.findall(r'(?:src|href)="([^"#:]+\.(?:js|css))"', html):
            assert (page.parent / reference).is_file(), (page, reference)


def test_data_docs_index_lists_the_validation_run_offline(data_docs: Path, tmp_path) -> None:
    dom = render_dom(data_docs / "index.html")
    # bootstrap-table draws the rows from data in a script; without its script, no rows.
    rows = re.findall(r'<tr[^>]*data-href="(validations/[^"]+\.html)"', dom)
    assert len(rows) == 1, dom[-3000:]
    assert (data_docs / rows[0]).is_file()
    screenshot(data_docs / "index.html", tmp_path / "data_docs_index.png")


def test_data_docs_validation_page_draws_its_charts_offline(data_docs: Path) -> None:
    (page,) = (data_docs / "validations").rglob("*.html")
    charts = len(re.findall(r"vegaEmbed\(", page.read_text()))
    assert charts > 0  # label distributions and KL divergences
    assert len(DRAWN_CHART.findall(render_dom(page))) == charts


# --- The localisation itself ----------------------------------------------------------------


def test_localise_pages_points_every_depth_at_the_copy(tmp_path: Path) -> None:
    url = "https://cdn.example.org/lib@1"
    tag = f'<script src="{url}?v=2" integrity="sha384-x" crossorigin="anonymous"></script>'
    longer = '<script src="https://cdn.example.org/lib@1.2/lib.min.js"></script>'
    for page in (tmp_path / "index.html", tmp_path / "a/b/page.html"):
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"<html><head>{tag}{longer}")
    copy = tmp_path / "static/vendor/lib.min.js"

    localise_pages(tmp_path, {url: copy})

    top = (tmp_path / "index.html").read_text()
    assert top.startswith('<html><head><script src="static/vendor/lib.min.js"></script>')
    nested = (tmp_path / "a/b/page.html").read_text()
    assert '<script src="../../static/vendor/lib.min.js"></script>' in nested
    # Another version of the library is not the one mapped.
    assert remote_references(nested) == ["https://cdn.example.org/lib@1.2/lib.min.js"]


def test_data_docs_without_installed_assets_warn_and_name_the_fix(tmp_path: Path) -> None:
    page = tmp_path / "index.html"
    page.write_text('<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>')
    with pytest.warns(UserWarning, match=r"make assets"):
        remote = localise_data_docs(tmp_path, assets=tmp_path / "no_node_modules")
    assert remote == ["https://code.jquery.com/jquery-3.7.1.min.js"]
