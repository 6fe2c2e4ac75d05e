"""Stage ``export``: the fine-tuned classifier as files a server runs without JAX.

Writes ``models/<experiment>/export/``: ``model.stablehlo`` (serialized ``jax.export``),
``model.onnx``, a text model's ``tokenizer.json``, and ``export.json`` (inputs, class names,
preprocessing, and the temperature of ``models/<experiment>/calibration.json`` when the
calibrate stage wrote one). ``python -m tlflax.serving models/<experiment>/export ...``
serves it with numpy and onnxruntime alone (:mod:`tlflax.export_classifier`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.config import Params
from tlflax.data.errors import DataError
from tlflax.export_classifier import export_classifier
from tlflax.tasks import task_for

# Written by the calibrate stage: {"finetune": {"temperature": T, ...}, ...}.
CALIBRATION_FILE = "calibration.json"


def export_dir(paths: ExperimentPaths) -> Path:
    return Path("models") / paths.experiment / "export"


def finetune_temperature(calibration_file: Path) -> float | None:
    """The fine-tuned model's fitted temperature, or None when there is no calibration.

    Raises:
      DataError: naming the file when it is not JSON or its temperature is not positive.
    """
    if not calibration_file.exists():
        return None
    try:
        entry = json.loads(calibration_file.read_text(encoding="utf-8")).get("finetune")
    except (json.JSONDecodeError, AttributeError) as error:
        raise DataError(calibration_file, f"not a JSON object ({error})") from None
    if entry is None:
        return None
    temperature = entry.get("temperature") if isinstance(entry, dict) else None
    if not isinstance(temperature, int | float) or not temperature > 0:
        raise DataError(
            calibration_file, f"'finetune.temperature' must be > 0, got {temperature!r}"
        )
    return float(temperature)


def run(params: Params, paths: ExperimentPaths) -> None:
    temperature = finetune_temperature(Path("models") / paths.experiment / CALIBRATION_FILE)
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
