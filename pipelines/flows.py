"""The Prefect flow: the pipeline as an ordered list of DVC stages.

Each task asks DVC to reproduce one stage; DVC decides whether anything changed, so a
repeated run costs what a DVC no-op costs. Run it with no server (Prefect's ephemeral API):

    python -m pipelines.flows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Offline by construction: no telemetry lookups, before Prefect is imported.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402

STAGES = ("prepare", "validate", "extract", "train_head", "finetune", "evaluate")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; its own output says why."""


def _stage_environment() -> dict[str, str]:
    # Stage commands call `python`; make it this interpreter (the project's virtualenv).
    environment = dict(os.environ)
    interpreter_dir = str(Path(sys.executable).parent)
    environment["PATH"] = interpreter_dir + os.pathsep + environment.get("PATH", "")
    return environment


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, project_dir: str) -> None:
    """Reproduce one DVC stage, streaming its output into the Prefect log."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(
        command,
        cwd=project_dir,
        env=_stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
    if process.wait() != 0:
        raise StageFailed(f"stage '{stage}' failed (exit {process.returncode}); see its log above")


def summary_line(metrics: dict) -> str:
    """One line comparing the head-only and fine-tuned test results."""
    parts = [f"test set: {metrics['n_test']} images, trained on {metrics['n_train']}"]
    for name, label in (("head_only", "head-only"), ("finetune", "fine-tuned"), ("scratch", "scratch")):
        if name in metrics:
            parts.append(
                f"{label} accuracy {metrics[name]['accuracy']:.4f} (macro-F1 {metrics[name]['macro_f1']:.4f})"
            )
    return "; ".join(parts)


@flow(name="tlflax-pipeline", log_prints=True)
def pipeline(
    experiment: str = "vision", stages: list[str] | None = None, project_dir: str | None = None
) -> dict:
    """Run the pipeline's DVC stages in order and return the evaluation metrics."""
    project = project_dir or str(PROJECT_ROOT)
    for stage in stages or list(STAGES):
        run_stage(stage, project)
    metrics_path = Path(project) / "metrics" / experiment / "evaluate.json"
    metrics = json.loads(metrics_path.read_text())
    print(summary_line(metrics))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="vision")
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT))
    arguments = parser.parse_args()
    try:
        pipeline(experiment=arguments.experiment, project_dir=arguments.project_dir)
    except StageFailed as error:
        print(f"pipeline: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
