"""The classical baseline on a prepared dataset: fitted on train, its predictions stored and read.

:func:`fit_and_predict` fits :func:`tlflax.baseline.fit_baseline` on the training split and
predicts validation and test; :func:`write_baseline` stores the class probabilities and the
choice - predictions, not the model: a fitted scikit-learn model is only stored as a pickle,
which this project never writes - and :func:`read_baseline_predictions` reads them back, for
every other model to be reported against. No JAX here: a scikit-learn baseline never uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlflax.baseline import Baseline, Modality, fit_baseline
from tlflax.config import BaselineParams
from tlflax.data.errors import DataError
from tlflax.data.subsets import at_most, take
from tlflax.data.tfds_audio import read_audio_split
from tlflax.data.tfds_store import dataset_version_dir, read_class_names, read_image_split
from tlflax.data.tfds_text import read_text_split
from tlflax.errors import MissingInputError
from tlflax.io import atomic_path, read_arrays, write_arrays, write_json
from tlflax.metrics import classification_report

PREDICTED_SPLITS = ("validation", "test")
# The prepared dataset's split readers, by modality (audio's, which also gives the clips'
# sample rate: read_audio_split). Not tlflax.tasks: a task resolves the backbone (and
# imports JAX), which a scikit-learn baseline never uses.
SPLIT_READERS = {"image": read_image_split, "text": read_text_split}
# The files of a stored baseline, in its folder.
PREDICTIONS_FILE = "predictions.npz"
MODEL_FILE = "model.json"


@dataclass(frozen=True)
class BaselinePredictions:
    """The fitted baseline and what it predicted.

    Attributes:
      baseline: the chosen model, refitted on all of train.
      seed: the seed that shuffled its cross-validation folds.
      probabilities: split -> class probabilities (N, classes), for each of
        :data:`PREDICTED_SPLITS`.
      validation_accuracy: its accuracy on the validation split.
    """

    baseline: Baseline
    seed: int
    probabilities: dict[str, np.ndarray]
    validation_accuracy: float

    @property
    def fit_seconds(self) -> float:
        """Wall time of the selection and the refit, rounded to 0.01 s."""
        return round(self.baseline.fit_seconds, 2)

    def choice(self) -> dict[str, Any]:
        """The stored choice (``model.json``): the model with every candidate's score."""
        baseline = self.baseline
        return {
            "model": baseline.model,
            "hyperparameters": baseline.hyperparameters,
            "cv_accuracy": baseline.cv_accuracy,
            "cv_folds": baseline.cv_folds,
            "seed": self.seed,
            "candidates_cv_accuracy": baseline.candidate_cv_accuracies,
            "train_examples": baseline.train_examples,
            "fit_seconds": self.fit_seconds,
        }

    def metrics(self) -> dict[str, Any]:
        """The headline scores: the model, its CV and validation accuracy, its fit time."""
        return {
            "model": self.baseline.model,
            "cv_accuracy": self.baseline.cv_accuracy,
            "validation_accuracy": self.validation_accuracy,
            "fit_seconds": self.fit_seconds,
        }


def fit_and_predict(
    dataset_dir: Path, name: str, modality: Modality, cfg: BaselineParams
) -> BaselinePredictions:
    """Fit the baseline on the training split of prepared dataset ``name`` in ``dataset_dir``
    (model and hyperparameters chosen by cross-validation on train) and predict the
    :data:`PREDICTED_SPLITS`.

    Raises:
      DataError: a split is unreadable, or train cannot be cross-validated.
    """
    class_names = read_class_names(dataset_dir, name)
    train_records, train_labels, sample_rate = _read_split(dataset_dir, name, modality, "train")
    if cfg.max_train_examples is not None and len(train_labels) > cfg.max_train_examples:
        fitted = at_most(train_labels, cfg.max_train_examples, seed=cfg.seed)
        print(
            f"baseline: fitted on {len(fitted)} of {len(train_labels)} training examples "
            "(a stratified subset, baseline.max_train_examples)"
        )
        train_records, train_labels = take(train_records, fitted), train_labels[fitted]
    baseline = fit_baseline(
        train_records,
        train_labels,
        modality=modality,
        seed=cfg.seed,
        cv_folds=cfg.cv_folds,
        num_classes=len(class_names),
        sample_rate=sample_rate,
    )
    probabilities, labels = {}, {}
    for split in PREDICTED_SPLITS:
        records, labels[split], rate = _read_split(dataset_dir, name, modality, split)
        if len(records) and rate != sample_rate:  # an empty split has no rate
            raise DataError(
                dataset_version_dir(dataset_dir, name),
                f"split {split!r} holds clips at {rate} Hz, train at {sample_rate} Hz",
                "run the `prepare` stage again",
            )
        probabilities[split] = baseline.predict_proba(records, location=split)
    validation = classification_report(
        probabilities["validation"], labels["validation"], class_names
    )
    return BaselinePredictions(baseline, cfg.seed, probabilities, validation["accuracy"])


def _read_split(
    dataset_dir: Path, name: str, modality: Modality, split: str
) -> tuple[Any, np.ndarray, int | None]:
    """``(inputs, labels, sample rate)`` of one split; the rate is audio's, else None."""
    if modality == "audio":
        return read_audio_split(dataset_dir, name, split)
    return (*SPLIT_READERS[modality](dataset_dir, name, split), None)


def write_baseline(folder: Path, predictions: BaselinePredictions) -> None:
    """Store the probabilities and the choice in ``folder``, atomically (all or nothing)."""
    with atomic_path(folder, directory=True) as temporary:
        write_arrays(temporary / PREDICTIONS_FILE, **predictions.probabilities)
        write_json(temporary / MODEL_FILE, predictions.choice())


def read_baseline_predictions(
    folder: Path, num_classes: int, split_sizes: dict[str, int]
) -> tuple[str, dict[str, np.ndarray]]:
    """The stored baseline's model name and class probabilities of each split in
    ``split_sizes``, from ``folder`` (:func:`write_baseline`).

    Raises:
      MissingInputError: the baseline stage has not run.
      DataError: its outputs are unreadable or do not fit the splits (run it again).
    """
    predictions_file, model_file = folder / PREDICTIONS_FILE, folder / MODEL_FILE
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
