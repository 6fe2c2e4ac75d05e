"""Stage ``advise``: measure the frozen backbone on this data and recommend how to transfer.

Probes the pooled output after every backbone layer group (one forward pass) on a
stratified subset of train, scores each probe on validation, and writes the recommendation
with its evidence: ``metrics/<experiment>/advice.json`` (a DVC metric, which the ``plan``
stage merges with params.yaml into the run's plan) and
``reports/<experiment>/advice.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.advice_report import advice_markdown
from tlflax.api import advise
from tlflax.config import Params
from tlflax.io import atomic_path, write_json
from tlflax.tasks import task_for


def advice_path(paths: ExperimentPaths) -> Path:
    return paths.metrics("advice")


def report_path(paths: ExperimentPaths) -> Path:
    return Path("reports") / paths.experiment / "advice.md"


def run(params: Params, paths: ExperimentPaths) -> None:
    started = time.perf_counter()
    advice = advise(task_for(params, paths.dataset_dir))
    write_json(advice_path(paths), advice.to_json())
    report = advice_markdown(advice, title=f"{params.experiment}: transfer strategy advice")
    with atomic_path(report_path(paths)) as temporary:
        temporary.write_text(report, encoding="utf-8")
    evidence, taps = advice.evidence, advice.taps
    print(
        f"advise: {advice.strategy} (top {advice.unfreeze_groups} of {evidence.num_groups} "
        f"layer groups), {advice.schedule.steps} steps; best probe "
        f"{evidence.best.validation_accuracy:.3f} after {evidence.best.group_name}, top "
        f"{evidence.top.validation_accuracy:.3f}, taps {list(taps.taps)} "
        f"{taps.validation_accuracy:.3f}; {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    run_stage("advise", run)
