"""Open a local HTML page in headless Chromium, with the network unreachable, for tests.

Pages are loaded from ``file://`` after their scripts ran (Chromium's virtual time lets timers
and rendering finish without real waiting). Every host name resolves to nothing and every
request goes to a dead proxy, so a page that still needs a CDN shows it: its scripts do not
load and what they draw is missing.

Chromium is a test requirement (``make install-test`` installs it): a missing browser fails
the test with that instruction instead of skipping it, so a green suite always means the pages
were really rendered.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LAUNCH_TIMEOUT_S = 120
OFFLINE_FLAGS = (
    # A CDN reference must fail, fast and always: no DNS, and no route even by IP address.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
)
COMMON_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in containers
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    # No --allow-file-access-from-files: a page must load its neighbours from file:// the way
    # a person's browser would.
)


def find_browser() -> str:
    """The path of a Chromium executable; fails the calling test if there is none."""
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "no Chromium found (looked for " + ", ".join(BROWSER_NAMES) + "): "
        "run `make install-test` to install Debian's chromium",
        pytrace=False,
    )


def _run_browser(arguments: list[str], page: Path, wait_ms: int) -> subprocess.CompletedProcess:
    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no page to open at {page}")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            find_browser(),
            *COMMON_FLAGS,
            *OFFLINE_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={wait_ms}",
            *arguments,
            page.as_uri(),
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"chromium exited with {result.returncode} on {page}:\n{result.stderr[-3000:]}"
        )
    return result


def render_dom(path: Path, wait_ms: int = 5000) -> str:
    """The page's DOM (serialised HTML) after its scripts ran for ``wait_ms`` of virtual time."""
    return _run_browser(["--dump-dom"], path, wait_ms).stdout


def screenshot(path: Path, out_png: Path, wait_ms: int = 5000) -> None:
    """Save a 1280x1600 PNG of the page after its scripts ran, for a person to look at."""
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _run_browser(
        ["--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={out_png}"],
        path,
        wait_ms,
    )
    if not out_png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {path} to {out_png}")
