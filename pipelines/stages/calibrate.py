"""Stage ``calibrate``: one temperature per trained model, fitted on the validation split.

The head-only model runs on the cached validation features, the fine-tuned (and, where the
pipeline trains one, from-scratch) model on the validation split (:mod:`tlflax.evaluation`);
each model's temperature minimises its validation negative log-likelihood
(:mod:`tlflax.calibration`). ``models/<experiment>/calibration.json`` holds, per model, the
temperature and the validation NLL and ECE before and after; ``evaluate`` and ``predict``
scale the models' probabilities by it.
"""

from __future__ import annotations

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.calibration import CALIBRATION_FILE_NAME, fit_calibration
from tlflax.config import Params
from tlflax.evaluation import trained_model_probabilities
from tlflax.io import write_json
from tlflax.tasks import task_for


def run(params: Params, paths: ExperimentPaths) -> None:
    task = task_for(params, paths.dataset_dir)
    validation = task.read_inputs("validation")
    probabilities = trained_model_probabilities(
        task,
        validation,
        features=paths.features / "validation.npz",
        head_dir=paths.head,
        finetune_dir=paths.finetune,
        scratch_dir=paths.scratch,
    )
    calibrations = {
        name: fit_calibration(
            probs, validation["label"], bins=params.evaluate.calibration_bins
        ).as_dict()
        for name, probs in probabilities.items()
    }
    write_json(paths.finetune.parent / CALIBRATION_FILE_NAME, calibrations)
    for name, fit in calibrations.items():
        print(
            f"calibrate: {name:9s} temperature {fit['temperature']:.3f}  validation ECE "
            f"{fit['validation_ece_before']:.4f} -> {fit['validation_ece_after']:.4f}"
        )


if __name__ == "__main__":
    run_stage("calibrate", run)
