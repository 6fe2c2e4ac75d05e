"""End to end: the real Prefect flow runs the real `dvc repro` stages on a tiny copy."""

import json
import sys

import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow


def test_flow_runs_every_stage_then_dvc_is_a_noop(tiny_project):
    result = run([sys.executable, "-m", "pipelines.flows"], cwd=tiny_project, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tiny_project / "metrics/vision/evaluate.json").read_text())
    assert metrics["n_test"] == 10000
    assert metrics["n_train"] == 60
    for phase in ("head_only", "finetune"):
        assert 0.0 <= metrics[phase]["accuracy"] <= 1.0
        # Even 6 images per class through a pretrained backbone beat chance (0.1) clearly.
        assert metrics[phase]["accuracy"] > 0.3, metrics
    assert "head-only accuracy" in result.stdout + result.stderr
    # extract.taps: auto - the plan, and so every model, reads the depths the advice chose
    # on train, and the advice report says why.
    advice = json.loads((tiny_project / "metrics/vision/advice.json").read_text())
    plan = json.loads((tiny_project / "metrics/vision/plan.json").read_text())
    assert plan["taps"] == advice["taps"]["taps"] and len(plan["taps"]) >= 1
    assert "## Depths the head reads" in (tiny_project / "reports/vision/advice.md").read_text()
    lock = (tiny_project / "dvc.lock").read_text()
    stages = ("prepare", "validate", "advise", "plan", "extract", "train_head", "finetune")
    stages += ("evaluate",)
    for stage in stages:
        assert f"  {stage}:" in lock

    # Nothing changed: DVC reruns nothing.
    again = run([sys.executable, "-m", "dvc", "repro"], cwd=tiny_project, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout, again.stdout
    status = run([sys.executable, "-m", "dvc", "status", "dvc.yaml"], cwd=tiny_project, timeout=120)
    assert "up to date" in status.stdout, status.stdout


def test_bad_params_stop_the_stage_with_one_line_naming_the_key(tiny_project):
    params = tiny_project / "params.yaml"
    original = params.read_text()
    try:
        broken = yaml.safe_load(original)
        broken["finetune"]["learnig_rate"] = broken["finetune"].pop("learning_rate")
        params.write_text(yaml.safe_dump(broken))
        result = run(
            [sys.executable, "-m", "pipelines.stages.finetune"], cwd=tiny_project, timeout=120
        )
        assert result.returncode == 2
        assert (
            "finetune.learnig_rate" in result.stderr
            and "did you mean 'learning_rate'" in result.stderr
        )
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        # DVC records nothing for a stage that failed.
        repro = run(
            [sys.executable, "-m", "dvc", "repro", "finetune"], cwd=tiny_project, timeout=300
        )
        assert repro.returncode != 0
        assert "did you mean 'learning_rate'" in repro.stdout + repro.stderr
    finally:
        params.write_text(original)
