"""Stage ``evaluate``: every model against the classical baseline, on the full test split.

The baseline's probabilities come from the baseline stage; the head-only, fine-tuned (and,
where the pipeline trains one, from-scratch) models are run here. Each model's entry in
``evaluate.json`` carries its accuracy gain over the baseline.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from flax import nnx

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.checkpoint import restore_tree
from tlflax.config import Params
from tlflax.data.errors import DataError
from tlflax.errors import MissingInputError
from tlflax.io import atomic_path, read_arrays, write_json
from tlflax.metrics import classification_report
from tlflax.plots import plot_learning_curves
from tlflax.tasks import Task, class_probabilities, task_for
from tlflax.train import create_head, head_forward

HEADLINE = ("accuracy", "macro_f1", "ece")
# The seeds' "higher start, higher slope, higher asymptote", one curve per way of training.
CURVES = (
    ("train_head", "head only (frozen backbone)"),
    ("finetune", "fine-tuned (from the head)"),
    ("train_scratch", "from scratch (random weights)"),
)


def _head_only_probabilities(params: Params, paths: ExperimentPaths, num_classes: int):
    test = read_arrays(paths.features / "test.npz")
    head = create_head(test["features"].shape[1], num_classes, params.train_head)
    nnx.update(head, restore_tree(paths.head, nnx.state(head, nnx.Param)))
    return class_probabilities(head, head_forward, test, params.evaluate.batch_size)


def _saved_model_probabilities(
    task: Task, model_dir: Path, test: dict[str, np.ndarray], num_classes: int
) -> np.ndarray:
    model, forward = task.load_classifier(num_classes, model_dir / "model")
    return class_probabilities(model, forward, test, task.params.evaluate.batch_size)


def read_baseline_predictions(
    paths: ExperimentPaths, num_classes: int, split_sizes: dict[str, int]
) -> tuple[str, dict[str, np.ndarray]]:
    """The baseline stage's model name and class probabilities of each split in ``split_sizes``.

    Raises:
      MissingInputError: the baseline stage has not run.
      DataError: its outputs are unreadable or do not fit the splits (run it again).
    """
    predictions_file, model_file = paths.baseline / "predictions.npz", paths.baseline / "model.json"
    for path in (predictions_file, model_file):
        if not path.exists():
            raise MissingInputError(
                f"{path}: not found; run the baseline stage first (dvc repro baseline): every "
                "model is reported against the classical baseline"
            )
    probabilities = read_arrays(predictions_file, required=tuple(split_sizes))
    for split, size in split_sizes.items():
        if probabilities[split].shape != (size, num_classes):
            raise DataError(
                predictions_file,
                f"{split!r} probabilities have shape {probabilities[split].shape}, but the "
                f"{split} split holds {size} examples of {num_classes} classes",
                "run the baseline stage again",
            )
    try:
        model = json.loads(model_file.read_text(encoding="utf-8"))["model"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(
            model_file,
            f"names no model ({type(error).__name__}: {error})",
            "run the baseline stage again",
        ) from None
    return str(model), probabilities


def headline_metrics(reports: dict[str, dict], baseline_model: str) -> dict[str, dict]:
    """The :data:`HEADLINE` scores of each model's report: the baseline's with its model's
    name, every other model's with its accuracy gain over the baseline (4 decimals)."""
    metrics = {name: {key: report[key] for key in HEADLINE} for name, report in reports.items()}
    baseline_accuracy = metrics["baseline"]["accuracy"]
    metrics["baseline"]["model"] = baseline_model
    for name, scores in metrics.items():
        if name != "baseline":
            scores["gain_over_baseline"] = round(scores["accuracy"] - baseline_accuracy, 4)
    return metrics


def _learning_curves(paths: ExperimentPaths) -> dict[str, list[float]]:
    """Validation accuracy per epoch of each phase that ran, from its dvclive log."""
    curves = {}
    for stage, label in CURVES:
        tsv = paths.live(stage) / "plots" / "metrics" / "validation_accuracy.tsv"
        if tsv.exists():
            with open(tsv, newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
            curves[label] = [float(row["validation_accuracy"]) for row in rows]
    return curves


def _write_confusion(path, labels, predictions, class_names) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (class_names[a], class_names[p]) for a, p in zip(labels, predictions, strict=True)
        )


def run(params: Params, paths: ExperimentPaths) -> None:
    task = task_for(params, paths.dataset_dir)
    class_names = task.class_names()
    test = task.read_inputs("test")
    labels = test["label"]
    _, validation_labels = task.read_split("validation")
    baseline_model, baseline = read_baseline_predictions(
        paths, len(class_names), {"validation": len(validation_labels), "test": len(labels)}
    )
    probabilities = {
        "baseline": baseline["test"],
        "head_only": _head_only_probabilities(params, paths, len(class_names)),
        "finetune": _saved_model_probabilities(task, paths.finetune, test, len(class_names)),
    }
    # The from-scratch model exists where the pipeline has a train_scratch stage.
    if (paths.scratch / "model").exists():
        probabilities["scratch"] = _saved_model_probabilities(
            task, paths.scratch, test, len(class_names)
        )
    reports = {
        name: classification_report(
            probs, labels, class_names, calibration_bins=params.evaluate.calibration_bins
        )
        for name, probs in probabilities.items()
    }
    metrics = headline_metrics(reports, baseline_model)
    metrics["n_train"] = int(len(task.read_split("train")[1]))
    metrics["n_test"] = int(len(labels))
    write_json(paths.metrics("evaluate"), metrics)
    write_json(paths.plots / "classification_report.json", reports)
    _write_confusion(
        paths.plots / "confusion.csv", labels, probabilities["finetune"].argmax(axis=1), class_names
    )
    # The curves are validation accuracy per epoch: the baseline's line is its validation score.
    baseline_validation = classification_report(
        baseline["validation"], validation_labels, class_names
    )["accuracy"]
    plot_learning_curves(
        _learning_curves(paths),
        paths.plots / "learning_curves.png",
        title=f"{params.experiment}: validation accuracy per epoch",
        reference_lines={f"baseline: {baseline_model}": baseline_validation},
    )
    for name, report in reports.items():
        print(
            f"evaluate: {name:9s} accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}"
        )


if __name__ == "__main__":
    run_stage("evaluate", run)
