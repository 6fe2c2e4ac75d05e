"""Stage ``export``: the fine-tuned classifier as files a server runs without JAX.

Writes ``models/<experiment>/export/``: ``model.stablehlo`` (serialized ``jax.export``),
``model.onnx``, a text model's ``tokenizer.json``, and ``export.json`` (inputs, class names,
preprocessing, and the temperature of ``models/<experiment>/calibration.json`` when the
calibrate stage wrote one). ``python -m tlflax.serving models/<experiment>/export ...``
serves it with numpy and onnxruntime alone (:mod:`tlflax.export_classifier`).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.calibration import CALIBRATION_FILE_NAME, read_temperatures
from tlflax.config import Params
from tlflax.export_classifier import export_classifier
from tlflax.tasks import task_for


def export_dir(paths: ExperimentPaths) -> Path:
    return Path("models") / paths.experiment / "export"


def run(params: Params, paths: ExperimentPaths) -> None:
    # The calibrate stage's fit, read as evaluate and predict read it (1 without the stage).
    calibration = paths.finetune.parent / CALIBRATION_FILE_NAME
    temperature = read_temperatures(calibration, ["finetune"])["finetune"]
    description = export_classifier(
        task_for(params, paths.dataset_dir),
        paths.finetune / "model",
        export_dir(paths),
        temperature=temperature,
    )
    inputs = ", ".join(
        f"{entry['name']} {entry['shape']} {entry['dtype']}" for entry in description["inputs"]
    )
    print(
        f"export: {export_dir(paths)}: {', '.join(description['files'])}; inputs {inputs}; "
        f"{len(description['class_names'])} classes; temperature {description['temperature']:.3f}"
    )


if __name__ == "__main__":
    run_stage("export", run)
