"""Shared test set-up: offline settings and a tiny, real copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Prefect and DVC configure logging on import (logging.config.dictConfig), which closes every
# handler installed before - including absl's, whose stream is pytest's capture file; a test
# module importing them after TFDS/Orbax would then break pytest's output capture. Import
# them first, before any such handler exists.
import pipelines.flows  # noqa: F401, I001

ROOT = Path(__file__).resolve().parent.parent
RAW_FASHION_MNIST = ROOT / "data" / "raw" / "fashion-mnist"
RAW_ASTERISK = ROOT / "data" / "raw" / "asterisk"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

# Settings small enough for a whole pipeline in about a minute on 2 cores.
TINY_PARAMS = {
    "prepare": {"train_per_class": 6, "validation_per_class": 3},
    "validate": {"min_examples_per_class": 3, "max_class_ratio": 2.0},
    "extract": {"backbone": "efficientnet_lite0", "image_size": 32, "batch_size": 256},
    "train_head": {"max_epochs": 5, "patience": 5},
    "finetune": {"epochs": 2, "batch_size": 20, "learning_rate": 1e-4},
    "evaluate": {"batch_size": 500},
}


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with the project's virtualenv first on PATH, capturing its output."""
    environment = dict(os.environ)
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment["PATH"]
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, **kwargs
    )


def make_project_copy(destination: Path, params_override: dict) -> Path:
    """A git + DVC repository holding the project's tracked files and the raw data."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file() and not name.startswith(("dvc.lock", "metrics/", "plots/")):
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shutil.copytree(RAW_FASHION_MNIST, destination / "data/raw/fashion-mnist")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (destination / "params.yaml").write_text(
        yaml.safe_dump(_merge(params, params_override), sort_keys=False)
    )
    for command in (
        ["git", "init", "-q"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(command, cwd=destination, check=True, capture_output=True)
    return destination


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    if not RAW_FASHION_MNIST.exists():
        pytest.fail(f"{RAW_FASHION_MNIST} is missing: run `make assets` (scripts/fetch_assets.sh)")
    return make_project_copy(tmp_path_factory.mktemp("project"), TINY_PARAMS)


@pytest.fixture(scope="session")
def small_project(tmp_path_factory) -> Path:
    """A tiny project on a small CNN whose pipeline has run once (tests/small_project.py).

    Shared by the reliability tests: copy it (``copy_project``) before changing anything.
    """
    if not RAW_FASHION_MNIST.exists():
        pytest.fail(f"{RAW_FASHION_MNIST} is missing: run `make assets` (scripts/fetch_assets.sh)")
    from tests.small_project import build_small_project

    return build_small_project(tmp_path_factory.mktemp("small_project"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with a ``slow`` test first, each file's tests kept together and in order.

    ``make test`` hands whole files to two workers in this order (xdist ``--dist
    loadfile``): the long pipeline files start at once, and the many short files fill in
    beside them, rather than one long file running alone at the end.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
