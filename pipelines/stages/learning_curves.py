"""The evaluate stage's learning curves, from the dvclive logs the training stages wrote.

Not in ``common``: every stage imports that, and DVC would re-run ``prepare`` after a change
to a figure only ``evaluate`` draws.
"""

from __future__ import annotations

import csv

from pipelines.stages.common import ExperimentPaths
from tlflax.plots import plot_learning_curves

# The seeds' "higher start, higher slope, higher asymptote", one curve per way of training.
CURVES = (
    ("train_head", "head only (frozen backbone)"),
    ("finetune", "fine-tuned (from the head)"),
    ("train_scratch", "from scratch (random weights)"),
)


def read_learning_curves(paths: ExperimentPaths) -> dict[str, list[float]]:
    """Validation accuracy per epoch of each phase that ran, from its dvclive log."""
    curves = {}
    for stage, label in CURVES:
        tsv = paths.live(stage) / "plots" / "metrics" / "validation_accuracy.tsv"
        if tsv.exists():
            with open(tsv, newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
            curves[label] = [float(row["validation_accuracy"]) for row in rows]
    return curves


def plot_experiment_learning_curves(
    paths: ExperimentPaths, baseline_model: str, baseline_validation_accuracy: float
) -> None:
    """Draw the curves of :func:`read_learning_curves` to ``learning_curves.png`` in the
    experiment's plots, with the baseline's validation accuracy as a reference line (the
    curves are validation accuracy per epoch)."""
    plot_learning_curves(
        read_learning_curves(paths),
        paths.plots / "learning_curves.png",
        title=f"{paths.experiment}: validation accuracy per epoch",
        reference_lines={f"baseline: {baseline_model}": baseline_validation_accuracy},
    )
