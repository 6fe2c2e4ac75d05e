"""Stage ``baseline``: the classical scikit-learn reference, fitted on the training split alone.

Model and hyperparameters are chosen by stratified k-fold cross-validation on train, then
refitted on all of it (:mod:`tlflax.baseline`). Writes the class probabilities of validation
and test - predictions, not the model: a fitted scikit-learn model is only stored as a
pickle, which this project never writes - the choice with every candidate's score, and the
metrics (:mod:`tlflax.baseline_predictions`). ``evaluate`` reports every model against it.
"""

from __future__ import annotations

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.baseline_predictions import fit_and_predict, write_baseline
from tlflax.config import Params
from tlflax.io import write_json


def run(params: Params, paths: ExperimentPaths) -> None:
    predictions = fit_and_predict(
        paths.dataset_dir, params.prepare.stored_name, params.prepare.modality, params.baseline
    )
    write_baseline(paths.baseline, predictions)
    write_json(paths.metrics("baseline"), predictions.metrics())
    baseline = predictions.baseline
    print(
        f"baseline: {baseline.model} (CV accuracy {baseline.cv_accuracy:.4f} on train), "
        f"validation accuracy {predictions.validation_accuracy:.4f}, "
        f"{predictions.fit_seconds:.1f} s"
    )


if __name__ == "__main__":
    run_stage("baseline", run)
