"""A tiny project on a small CNN, built once per session, for the reliability tests.

Its pipeline is the real one (``dvc repro``, the stage commands, Orbax checkpoints, dvclive
logs), with a small CNN from random weights as the backbone: faults are about processes and
files, not about which network runs, and every stage then takes seconds.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from tests.conftest import TINY_PARAMS, _merge, make_project_copy, run

SMALL_PARAMS = _merge(
    TINY_PARAMS,
    {
        "extract": {"backbone": "small_cnn", "pretrained": False},
        # Every setting the advise stage could fill in is written out: the runs compared
        # below must train the same way whatever the advice says.
        "finetune": {
            "epochs": 3,
            "warmup_fraction": 0.1,
            "layer_lr_decay": 0.8,
            "rules": [
                {"pattern": "^head/"},
                {"pattern": "^backbone/blocks/0/", "freeze": True},
                {"pattern": "^backbone/"},
            ],
        },
    },
)
# Everything the vision stages write.
OUTPUT_ROOTS = (
    "data/vision",
    "models/vision",
    "metrics/vision",
    "dvclive/vision",
    "plots/vision",
    "reports/vision",
)


def build_small_project(destination: Path) -> Path:
    """A git + DVC copy of the project whose pipeline has run up to ``finetune`` (recorded in
    dvc.lock), plus ``baseline`` and ``evaluate`` run by their stage commands."""
    project = make_project_copy(destination, SMALL_PARAMS)
    result = run([sys.executable, "-m", "dvc", "repro", "finetune"], cwd=project, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # evaluate reports every model against the classical baseline's stored predictions.
    for stage in ("baseline", "evaluate"):
        result = run([sys.executable, "-m", f"pipelines.stages.{stage}"], cwd=project, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    return project


def copy_project(source: Path, destination: Path, *, with_history: bool = True) -> Path:
    """A full copy of a built project; without git and DVC when ``with_history`` is False."""
    ignore = None if with_history else shutil.ignore_patterns(".git", ".dvc")
    shutil.copytree(source, destination, symlinks=True, ignore=ignore)
    return destination


def hash_outputs(project: Path) -> dict[str, str]:
    """SHA-256 of every file the stages wrote, by path relative to ``project``."""
    digests = {}
    for root in OUTPUT_ROOTS:
        for path in sorted((project / root).rglob("*")):
            if path.is_file():
                digests[str(path.relative_to(project))] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return digests
