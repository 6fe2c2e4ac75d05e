"""Stage ``baseline``: the classical scikit-learn reference, fitted on the training split alone.

Model and hyperparameters are chosen by stratified k-fold cross-validation on train, then
refitted on all of it (:mod:`tlflax.baseline`). Writes the class probabilities of validation
and test - predictions, not the model: a fitted scikit-learn model is only stored as a
pickle, which this project never writes - the choice with every candidate's score, and the
metrics. ``evaluate`` reports every model against it.
"""

from __future__ import annotations

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.baseline import fit_baseline
from tlflax.config import Params
from tlflax.data.tfds_store import read_class_names, read_image_split
from tlflax.data.tfds_text import read_text_split
from tlflax.io import atomic_path, write_arrays, write_json
from tlflax.metrics import classification_report

PREDICTED_SPLITS = ("validation", "test")
# The prepared dataset's split readers, by modality. Not tlflax.tasks: a task
# resolves the backbone (and imports JAX), which a scikit-learn baseline never uses.
SPLIT_READERS = {"image": read_image_split, "text": read_text_split}


def run(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.baseline
    modality, name = params.prepare.modality, params.prepare.stored_name
    read_split = SPLIT_READERS[modality]
    class_names = read_class_names(paths.dataset_dir, name)
    train_records, train_labels = read_split(paths.dataset_dir, name, "train")
    baseline = fit_baseline(
        train_records,
        train_labels,
        modality=modality,
        seed=cfg.seed,
        cv_folds=cfg.cv_folds,
        num_classes=len(class_names),
    )
    probabilities, labels = {}, {}
    for split in PREDICTED_SPLITS:
        records, labels[split] = read_split(paths.dataset_dir, name, split)
        probabilities[split] = baseline.predict_proba(records, location=split)
    validation = classification_report(
        probabilities["validation"], labels["validation"], class_names
    )
    fit_seconds = round(baseline.fit_seconds, 2)
    with atomic_path(paths.baseline, directory=True) as temporary:
        write_arrays(temporary / "predictions.npz", **probabilities)
        write_json(
            temporary / "model.json",
            {
                "model": baseline.model,
                "hyperparameters": baseline.hyperparameters,
                "cv_accuracy": baseline.cv_accuracy,
                "cv_folds": baseline.cv_folds,
                "seed": cfg.seed,
                "candidates_cv_accuracy": baseline.candidate_cv_accuracies,
                "train_examples": baseline.train_examples,
                "fit_seconds": fit_seconds,
            },
        )
    write_json(
        paths.metrics("baseline"),
        {
            "model": baseline.model,
            "cv_accuracy": baseline.cv_accuracy,
            "validation_accuracy": validation["accuracy"],
            "fit_seconds": fit_seconds,
        },
    )
    print(
        f"baseline: {baseline.model} (CV accuracy {baseline.cv_accuracy:.4f} on train), "
        f"validation accuracy {validation['accuracy']:.4f}, {fit_seconds:.1f} s"
    )


if __name__ == "__main__":
    run_stage("baseline", run)
