"""What ``dvc plots show`` draws for one experiment, and the page template it draws into.

No Prefect here: :mod:`pipelines.flows` runs the command and logs what goes wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.dvc_commands import open_repository
from pipelines.reports import read_experiment

# Loads Vega from static/vendor/ beside the page, not from a CDN: the page renders offline.
DVC_PLOTS_TEMPLATE = Path(__file__).resolve().parent / "templates" / "dvc_plots.html"


def experiment_plots(project: Path, experiment: str) -> list[str]:
    """The plot outputs of ``experiment``'s pipeline (its own in experiments/, else the root
    one), as paths from the project root: exact outputs, which ``dvc plots show`` takes as
    its targets without also reading them as plain files. Without targets DVC reads every
    pipeline's plots, and fails on those of experiments that have not run yet."""
    own = f"experiments/{experiment}/dvc.yaml"
    pipeline = own if read_experiment(project, own) == experiment else "dvc.yaml"
    with open_repository(str(project)) as repository:
        return [
            os.path.relpath(plot.fs_path, repository.root_dir)
            for plot in repository.index.plots
            if os.path.relpath(plot.stage.dvcfile.path, repository.root_dir) == pipeline
        ]
