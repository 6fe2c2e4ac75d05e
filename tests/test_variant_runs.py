"""pipelines.variant_runs: every (variant, seed) a real `dvc exp run` of a real pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.seeds import read_seed_params
from pipelines.variant_runs import run_variants
from tests.conftest import run

# A one-stage pipeline that writes what the comparison commands read: an evaluate.json whose
# fine-tuned accuracy is the variant's setting plus a hundredth of the seed.
STAGE = (
    "import json, yaml; p = yaml.safe_load(open('params.yaml')); "
    "json.dump({'finetune': {'accuracy': p['train']['rate'] + p['train']['seed'] / 100, "
    "'macro_f1': 0.5}}, open('evaluate.json', 'w'))"
)


def _project(root: Path) -> Path:
    (root / "params.yaml").write_text("experiment: toy\ntrain:\n  rate: 0.1  # kept\n  seed: 0\n")
    pipeline = {
        "stages": {
            "evaluate": {
                "cmd": f'{sys.executable} -c "{STAGE}"',
                "params": ["train"],
                "metrics": [{"evaluate.json": {"cache": False}}],
            }
        }
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    for command in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "t"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "toy"],
    ):
        result = run(command, cwd=root)
        assert result.returncode == 0, result.stderr
    return root


def test_each_variant_runs_under_each_seed_and_the_params_come_back(tmp_path):
    project = _project(tmp_path)
    original = (project / "params.yaml").read_bytes()
    seen = []

    def record(variant, seed, evaluation, seconds):
        seen.append((variant, seed, round(evaluation["finetune"]["accuracy"], 6)))
        assert seconds > 0

    run_variants(
        project,
        "dvc.yaml",
        read_seed_params(project, "dvc.yaml"),
        {"slow": ["train.rate=0.25"], "fast": ["train.rate=0.75"]},
        [1],
        Path("evaluate.json"),
        record,
    )
    assert seen == [("slow", 1, 0.26), ("fast", 1, 0.76)]
    # DVC rewrote the file to set each value; it gets its own bytes back, comment and all.
    assert (project / "params.yaml").read_bytes() == original
    listed = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(listed) == ["toy-fast-seed1", "toy-slow-seed1"]
    # The workspace is back to the params file's own run, not the last variant's.
    assert json.loads((project / "evaluate.json").read_text())["finetune"]["accuracy"] == 0.1
    status = run([sys.executable, "-m", "dvc", "status"], cwd=project)
    assert "Data and pipelines are up to date." in status.stdout
