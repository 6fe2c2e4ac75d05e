"""Stage ``report``: the experiment's run report and model card, from what the run wrote.

``reports/<experiment>/index.html`` is one self-contained page (inline SVG figures, inline
style: it opens offline from the file system) and ``reports/<experiment>/MODEL_CARD.md``
the model card (:mod:`pipelines.run_report`, :mod:`pipelines.model_card`). An absent input
leaves its part out; nothing it reads is required.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipelines.report_inputs import ProjectPaths
from pipelines.run_report import write_run_reports
from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.config import Params


def _warn(message: str) -> None:
    print(f"report: warning: {message}", file=sys.stderr)


def run(params: Params, paths: ExperimentPaths) -> None:
    page, card = write_run_reports(
        ProjectPaths(paths.experiment, Path(".")),
        Path("reports") / paths.experiment,
        _warn,
        params,
    )
    print(f"report: wrote {page} and {card}")


if __name__ == "__main__":
    run_stage("report", run)
