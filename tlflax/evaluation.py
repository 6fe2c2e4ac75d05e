"""Every saved model of an experiment against the classical baseline, on the full test split.

The baseline's probabilities are the stored ones (:mod:`tlflax.baseline_predictions`); the
head-only, fine-tuned (and, where one was trained, from-scratch) models are run here, their
probabilities scaled by the temperatures the calibrate stage fitted on validation
(:mod:`tlflax.calibration`). Each model's headline scores carry its accuracy gain over the
baseline.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import nnx

from tlflax.baseline_predictions import read_baseline_predictions
from tlflax.calibration import calibrate_models
from tlflax.checkpoint import restore_tree
from tlflax.io import atomic_path, read_arrays
from tlflax.metrics import classification_report
from tlflax.tasks import Task, class_probabilities
from tlflax.train import create_head, head_forward

HEADLINE = ("accuracy", "macro_f1", "ece", "balanced_accuracy", "min_recall")


@dataclass(frozen=True)
class Evaluation:
    """Every model's scores on the test split.

    Attributes:
      class_names: the dataset's classes (label ``i`` -> element ``i``).
      labels: the test split's labels.
      probabilities: model -> its test class probabilities: ``baseline``, ``head_only``,
        ``finetune`` and, where one was trained, ``scratch`` (temperature-scaled).
      reports: model -> its :func:`~tlflax.metrics.classification_report` on test.
      metrics: model -> its :func:`headline_metrics`, with ``n_train`` and ``n_test``; a
        scaled model's also with its ``temperature`` and ``ece_uncalibrated``.
      reliability: scaled model -> ``calibrated`` and ``uncalibrated``
        :func:`~tlflax.calibration.reliability_diagram` on test.
      baseline_model: the baseline's model name.
      baseline_validation: the baseline's class probabilities of the validation split.
      validation_labels: the validation split's labels.
    """

    class_names: list[str]
    labels: np.ndarray
    probabilities: dict[str, np.ndarray]
    reports: dict[str, dict]
    metrics: dict
    baseline_model: str
    baseline_validation: np.ndarray
    validation_labels: np.ndarray
    reliability: dict[str, dict]

    def baseline_validation_accuracy(self) -> float:
        """The baseline's accuracy on validation: the reference of validation learning curves."""
        return classification_report(
            self.baseline_validation, self.validation_labels, self.class_names
        )["accuracy"]


def head_only_probabilities(
    task: Task, features: Path, head_dir: Path, num_classes: int
) -> np.ndarray:
    """Class probabilities of the head saved in ``head_dir`` on the cached ``features`` of
    a split (the frozen backbone's)."""
    split = read_arrays(features)
    head = create_head(split["features"].shape[1], num_classes, task.params.train_head)
    nnx.update(head, restore_tree(head_dir, nnx.state(head, nnx.Param)))
    return class_probabilities(head, head_forward, split, task.params.evaluate.batch_size)


def saved_model_probabilities(
    task: Task, model_dir: Path, test: dict[str, np.ndarray], num_classes: int
) -> np.ndarray:
    """Class probabilities of ``test`` by the whole classifier saved in ``model_dir``."""
    model, forward = task.load_classifier(num_classes, model_dir / "model")
    return class_probabilities(model, forward, test, task.params.evaluate.batch_size)


def trained_model_probabilities(
    task: Task,
    inputs: dict[str, np.ndarray],
    *,
    features: Path,
    head_dir: Path,
    finetune_dir: Path,
    scratch_dir: Path,
) -> dict[str, np.ndarray]:
    """Class probabilities of one split's ``inputs`` by the head (on the split's cached
    ``features``), the fine-tuned model and, where ``scratch_dir`` holds one, the
    from-scratch model: ``head_only``, ``finetune``, ``scratch``."""
    num_classes = len(task.class_names())
    probabilities = {
        "head_only": head_only_probabilities(task, features, head_dir, num_classes),
        "finetune": saved_model_probabilities(task, finetune_dir, inputs, num_classes),
    }
    # The from-scratch model exists where the pipeline has a train_scratch stage.
    if (scratch_dir / "model").exists():
        probabilities["scratch"] = saved_model_probabilities(task, scratch_dir, inputs, num_classes)
    return probabilities


def headline_metrics(reports: dict[str, dict], baseline_model: str) -> dict[str, dict]:
    """The :data:`HEADLINE` scores of each model's report and its recall of each class
    (``per_class_recall``): the baseline's with its model's name, every other model's with
    its accuracy gain over the baseline (4 decimals)."""
    metrics = {
        name: {
            **{key: report[key] for key in HEADLINE},
            "per_class_recall": {c: scores["recall"] for c, scores in report["per_class"].items()},
        }
        for name, report in reports.items()
    }
    baseline_accuracy = metrics["baseline"]["accuracy"]
    metrics["baseline"]["model"] = baseline_model
    for name, scores in metrics.items():
        if name != "baseline":
            scores["gain_over_baseline"] = round(scores["accuracy"] - baseline_accuracy, 4)
    return metrics


def evaluate_saved_models(
    task: Task,
    *,
    test_features: Path,
    head_dir: Path,
    finetune_dir: Path,
    scratch_dir: Path,
    baseline_dir: Path,
    temperatures: Mapping[str, float] | None = None,
) -> Evaluation:
    """Score the baseline (stored in ``baseline_dir``), the head (``head_dir``, on the cached
    ``test_features``), the fine-tuned model and, where ``scratch_dir`` holds one, the
    from-scratch model on the test split; each trained model's probabilities scaled by its
    temperature in ``temperatures`` (absent: 1, unscaled).

    Raises:
      MissingInputError: a model, or the baseline's predictions, not written yet.
      DataError: a split, the cached features or the baseline's predictions unreadable.
      CheckpointError: a saved model that does not fit this task.
    """
    class_names = task.class_names()
    test = task.read_inputs("test")
    labels = test["label"]
    _, validation_labels = task.read_split("validation")
    baseline_model, baseline = read_baseline_predictions(
        baseline_dir, len(class_names), {"validation": len(validation_labels), "test": len(labels)}
    )
    uncalibrated = trained_model_probabilities(
        task,
        test,
        features=test_features,
        head_dir=head_dir,
        finetune_dir=finetune_dir,
        scratch_dir=scratch_dir,
    )
    bins = task.params.evaluate.calibration_bins
    calibrated = calibrate_models(uncalibrated, labels, temperatures or {}, bins=bins)
    probabilities = {"baseline": baseline["test"], **calibrated.probabilities}
    reports = {
        name: classification_report(probs, labels, class_names, calibration_bins=bins)
        for name, probs in probabilities.items()
    }
    metrics = headline_metrics(reports, baseline_model)
    for name, scores in calibrated.scores.items():
        metrics[name].update(scores)
    metrics["n_train"] = int(len(task.read_split("train")[1]))
    metrics["n_test"] = int(len(labels))
    # Largest / smallest test class: above 1.5 the run report leads with macro-F1.
    test_counts = np.bincount(labels, minlength=len(class_names))
    metrics["test_class_ratio"] = float(test_counts.max() / max(test_counts.min(), 1))
    return Evaluation(
        class_names=class_names,
        labels=labels,
        probabilities=probabilities,
        reports=reports,
        metrics=metrics,
        baseline_model=baseline_model,
        baseline_validation=baseline["validation"],
        validation_labels=validation_labels,
        reliability=calibrated.reliability,
    )


def write_confusion(
    path: Path, labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]
) -> None:
    """Write one ``actual,predicted`` row of class names per example to a CSV, atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (class_names[a], class_names[p]) for a, p in zip(labels, predictions, strict=True)
        )
