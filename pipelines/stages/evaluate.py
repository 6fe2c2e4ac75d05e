"""Stage ``evaluate``: every model against the classical baseline, on the full test split.

The baseline's probabilities come from the baseline stage; the head-only, fine-tuned (and,
where the pipeline trains one, from-scratch) models are run here (:mod:`tlflax.evaluation`),
scaled by the temperatures of ``models/<experiment>/calibration.json`` (the calibrate
stage's; without it, unscaled). Each model's entry in ``evaluate.json`` carries its accuracy
gain over the baseline, and a scaled model's its temperature and ECE before scaling;
``plots/<experiment>/reliability.json`` holds their reliability diagrams.
"""

from __future__ import annotations

from pipelines.stages.common import ExperimentPaths, run_stage
from pipelines.stages.learning_curves import plot_experiment_learning_curves
from tlflax.calibration import CALIBRATED_MODELS, CALIBRATION_FILE_NAME, read_temperatures
from tlflax.config import Params
from tlflax.evaluation import evaluate_saved_models, write_confusion
from tlflax.io import write_json
from tlflax.tasks import task_for


def run(params: Params, paths: ExperimentPaths) -> None:
    # The from-scratch model needs a temperature only where the pipeline trained one.
    has_scratch = (paths.scratch / "model").exists()
    trained = [name for name in CALIBRATED_MODELS if name != "scratch" or has_scratch]
    temperatures = read_temperatures(paths.finetune.parent / CALIBRATION_FILE_NAME, trained)
    evaluation = evaluate_saved_models(
        task_for(params, paths.dataset_dir),
        test_features=paths.features / "test.npz",
        head_dir=paths.head,
        finetune_dir=paths.finetune,
        scratch_dir=paths.scratch,
        baseline_dir=paths.baseline,
        temperatures=temperatures,
    )
    write_json(paths.metrics("evaluate"), evaluation.metrics)
    write_json(paths.plots / "classification_report.json", evaluation.reports)
    write_json(paths.plots / "reliability.json", evaluation.reliability)
    write_confusion(
        paths.plots / "confusion.csv",
        evaluation.labels,
        evaluation.probabilities["finetune"].argmax(axis=1),
        evaluation.class_names,
    )
    plot_experiment_learning_curves(
        paths, evaluation.baseline_model, evaluation.baseline_validation_accuracy()
    )
    for name, report in evaluation.reports.items():
        print(
            f"evaluate: {name:9s} accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}"
        )


if __name__ == "__main__":
    run_stage("evaluate", run)
