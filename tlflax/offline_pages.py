"""HTML report pages that render offline: CDN scripts, styles and fonts replaced by local copies.

The Data Docs of Great Expectations and the page of ``dvc plots show`` load Vega, Bootstrap,
jQuery, Font Awesome ... from CDNs, so without a network they show blank charts, empty tables
and unstyled text. The same files, at pinned versions, come from the npm registry at set-up
(``web/package.json``, ``npm ci --prefix web`` in ``make assets``). The functions here copy the
ones a page needs next to it, under ``static/vendor/``, and point the page at them by relative
path, so a report folder stays viewable when opened from the file system or copied elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from tlflax.errors import MissingInputError

# web/node_modules of the repository this package is installed from (editable install).
WEB_ASSETS = Path(__file__).resolve().parent.parent / "web" / "node_modules"
VENDOR_FOLDER = Path("static") / "vendor"
INSTALL_HINT = "run `make assets` (it runs `npm ci --prefix web`)"

_VEGA = "vega/build/vega.min.js"
_VEGA_LITE = "vega-lite/build/vega-lite.min.js"
_VEGA_EMBED = "vega-embed/build/vega-embed.min.js"
_FONT_AWESOME = "@fortawesome/fontawesome-free"
_BOOTSTRAP_TABLE = "bootstrap-table/dist"
_FILTER_CONTROL = f"{_BOOTSTRAP_TABLE}/extensions/filter-control/bootstrap-table-filter-control"

# The files the page of pipelines/templates/dvc_plots.html loads from its static/vendor/.
DVC_PLOTS_FILES = (_VEGA, _VEGA_LITE, _VEGA_EMBED)

# Every CDN URL in the pages of GX's Data Docs (great_expectations/render/view/templates),
# and the file of web/node_modules that replaces it. A URL is matched up to a query string.
# Versions are those of web/package.json: the same as the URLs' except popper.js (1.16.1, the
# one Bootstrap 4.3.1 declares; same 1.x API), bootstrap-table's filter-control stylesheet
# (1.19.1, as its script) and Vega (6.x: the charts GX draws with Altair 6 are Vega-Lite 6).
DATA_DOCS_FILES = {
    "https://cdn.jsdelivr.net/npm/vega@5": _VEGA,
    "https://cdn.jsdelivr.net/npm/vega-lite@5": _VEGA_LITE,
    "https://cdn.jsdelivr.net/npm/vega-embed@6": _VEGA_EMBED,
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": (
        f"{_FONT_AWESOME}/css/all.min.css"
    ),
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": (
        "popper.js/dist/umd/popper.min.js"
    ),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": (
        "bootstrap/dist/js/bootstrap.min.js"
    ),
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": (
        "bootstrap/dist/css/bootstrap.min.css"
    ),
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/"
    "bootstrap-prefers-dark.css": "@forevolve/bootstrap-dark/dist/css/bootstrap-prefers-dark.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": (
        f"{_BOOTSTRAP_TABLE}/bootstrap-table.min.js"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": (
        f"{_BOOTSTRAP_TABLE}/bootstrap-table.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.js": f"{_FILTER_CONTROL}.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.css": f"{_FILTER_CONTROL}.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.css": f"{_FILTER_CONTROL}.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/"
    "bootstrap-datepicker.min.js": "bootstrap-datepicker/dist/js/bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/"
    "bootstrap-datepicker.min.css": "bootstrap-datepicker/dist/css/bootstrap-datepicker.min.css",
}
# Folders a copied stylesheet loads by relative path (Font Awesome's ../webfonts/).
DATA_DOCS_COMPANIONS = (f"{_FONT_AWESOME}/webfonts",)
# GX's logos on S3 have no npm package; the site's own static/images/ holds the light one,
# which also stands in for the dark theme's.
DATA_DOCS_SITE_FILES = {
    "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png": (
        "static/images/logo-long.png"
    ),
    "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png": (
        "static/images/logo-long.png"
    ),
}

_TAG = re.compile(r"<(?:script|link)\b[^>]*>", re.IGNORECASE)
_TAG_URL = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)
# Subresource integrity and CORS mode make a browser refuse a script read from file://.
_CROSS_ORIGIN_ATTRIBUTES = re.compile(
    r"""\s+(?:integrity|crossorigin)(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s>]+))?""", re.IGNORECASE
)


def copy_assets(paths: Iterable[str], destination: Path, assets: Path = WEB_ASSETS) -> None:
    """Copy each file or folder ``assets/<path>`` to ``destination/<path>``.

    Raises:
        MissingInputError: naming the files absent from ``assets``, with how to install them.
    """
    paths = list(paths)
    missing = [path for path in paths if not (assets / path).exists()]
    if missing:
        raise MissingInputError(
            f"{assets}: web assets missing for offline report pages ({', '.join(missing)}); "
            + INSTALL_HINT
        )
    for path in paths:
        source, target = assets / path, destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)


def localise_pages(site: Path, targets: Mapping[str, Path]) -> list[Path]:
    """Point every ``*.html`` page under ``site`` at local files instead of URLs.

    Args:
        site: folder of the pages (searched recursively).
        targets: URL -> the local file replacing it; the URL also matches with a query string.

    Returns:
        The pages rewritten. Their ``<script>``/``<link>`` tags now reading a local file lose
        ``integrity`` and ``crossorigin``, which would block them on ``file://``.
    """
    patterns = [
        # The whole URL only: "vega@5" is not the start of "vega@5.20.2".
        (re.compile(re.escape(url) + r"""(?:\?[^"'\s)]*)?(?=["'\s)>]|$)"""), target)
        for url, target in sorted(targets.items(), key=lambda item: -len(item[0]))
    ]
    rewritten = []
    for page in sorted(site.rglob("*.html")):
        original = page.read_text(encoding="utf-8")
        html = original
        for pattern, target in patterns:
            relative = Path(os.path.relpath(target, page.parent)).as_posix()
            html = pattern.sub(lambda _match, path=relative: path, html)
        html = _TAG.sub(_drop_cross_origin_attributes, html)
        if html != original:
            page.write_text(html, encoding="utf-8")
            rewritten.append(page)
    return rewritten


def _drop_cross_origin_attributes(tag: re.Match[str]) -> str:
    url = _TAG_URL.search(tag.group(0))
    if url is None or _is_remote(url.group(1)):
        return tag.group(0)
    return _CROSS_ORIGIN_ATTRIBUTES.sub("", tag.group(0))


def remote_references(html: str) -> list[str]:
    """The http(s) URLs that ``<script src>`` and ``<link href>`` tags of ``html`` load."""
    urls = []
    for tag in _TAG.finditer(html):
        url = _TAG_URL.search(tag.group(0))
        is_stylesheet_or_script = "<script" in tag.group(0).lower() or re.search(
            r"""rel\s*=\s*["']?(?:stylesheet|preload|modulepreload|icon)""", tag.group(0), re.I
        )
        if url and _is_remote(url.group(1)) and is_stylesheet_or_script:
            urls.append(url.group(1))
    return urls


def _is_remote(url: str) -> bool:
    return url.lower().startswith(("http://", "https://", "//"))


def localise_data_docs(site: Path, assets: Path = WEB_ASSETS) -> list[str]:
    """Make the Data Docs site in ``site`` render offline.

    A report is no reason to stop a pipeline: when the web assets are not installed, or a GX
    upgrade brought a CDN URL ``DATA_DOCS_FILES`` does not map, this warns and goes on.

    Returns:
        The URLs the pages still load from the network (none when all went well).
    """
    vendor = site / VENDOR_FOLDER
    try:
        copy_assets([*DATA_DOCS_FILES.values(), *DATA_DOCS_COMPANIONS], vendor, assets)
    except MissingInputError as error:
        warnings.warn(
            f"{site}: Data Docs left loading scripts from CDNs, blank offline: {error}; "
            "then build them again",
            stacklevel=2,
        )
        return sorted(_remote_references_under(site))
    targets = {url: vendor / path for url, path in DATA_DOCS_FILES.items()}
    targets.update({url: site / path for url, path in DATA_DOCS_SITE_FILES.items()})
    localise_pages(site, targets)
    remote = sorted(_remote_references_under(site))
    if remote:
        warnings.warn(
            f"{site}: Data Docs still load {', '.join(remote)}; add a local copy to "
            "web/package.json and tlflax.offline_pages.DATA_DOCS_FILES",
            stacklevel=2,
        )
    return remote


def _remote_references_under(site: Path) -> set[str]:
    return {
        url
        for page in site.rglob("*.html")
        for url in remote_references(page.read_text(encoding="utf-8"))
    }


def vendor_dvc_plots(output: Path, assets: Path = WEB_ASSETS) -> None:
    """Copy the scripts a ``dvc plots show`` page made from pipelines/templates/dvc_plots.html
    loads into ``output/static/vendor/``.

    Raises:
        MissingInputError: when ``assets`` lacks the files (web assets not installed).
    """
    copy_assets(DVC_PLOTS_FILES, output / VENDOR_FOLDER, assets)
