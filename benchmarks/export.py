"""Export benchmark: the exported forms of the vision job's fine-tuned model against Flax.

    .venv/bin/python -m benchmarks.export

Exports ``models/vision/finetune/model`` (EfficientNet-Lite0 cut at its taps + head, the
preprocessing from stored uint8 28x28 images included) the way the export stage does -
StableHLO bytes deserialized with ``jax.export``, ONNX bytes run by onnxruntime on the CPU -
and runs every form over the whole test split (10,000 images), 64 at a time:

  * argmax_agreement - fraction of test images whose predicted class equals Flax's;
  * max_abs_logit_diff - largest |logit - Flax logit| over every image and class;
  * batch1_p50_ms, batch64_p50_ms - median latency of one call on 1 and on 64 images
    (the forms take turns, see benchmarks.common.time_interleaved), Flax's too.

Results go to benchmarks/results/export.json. Needs the vision pipeline's outputs
(``make run``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import onnxruntime
from flax import nnx

from benchmarks.common import print_table, time_interleaved, write_results
from tlflax.advice_rules import load_advice
from tlflax.api import chosen_params
from tlflax.config import load_params
from tlflax.export import (
    export_onnx_program,
    export_stablehlo,
    inference_program,
    load_stablehlo,
)
from tlflax.tasks import task_for

PARAMS_FILE = Path("params.yaml")
BATCH_SIZE = 64
BATCH1_REPEATS = 50
BATCH64_REPEATS = 10

Predictor = Callable[[np.ndarray], np.ndarray]


def _flax_predictor(model: nnx.Module, forward) -> Predictor:
    """Flax logits as tlflax predicts (weights an argument of the jitted function)."""
    graphdef, state = nnx.split(model)
    jitted = jax.jit(
        lambda state, images: forward(nnx.merge(graphdef, state), {"image": images}, False, None)
    )
    return lambda images: np.asarray(jitted(state, images))


def _stablehlo_predictor(serialized: bytes) -> Predictor:
    call = load_stablehlo(serialized)
    return lambda images: np.asarray(call(images))


def _onnx_predictor(serialized: bytes) -> Predictor:
    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"image": images})[0]


def _all_logits(predict: Predictor, images: np.ndarray) -> np.ndarray:
    """Logits of every image, in fixed batches (the last padded): one shape, one compile."""
    rows = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = images[start : start + BATCH_SIZE]
        padded = np.concatenate(
            [batch, np.zeros((BATCH_SIZE - len(batch), *batch.shape[1:]), batch.dtype)]
        )
        rows.append(predict(padded)[: len(batch)])
    return np.concatenate(rows)


def _latencies(predictors: dict[str, Predictor], images: np.ndarray) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {name: {} for name in predictors}
    for size, repeats in ((1, BATCH1_REPEATS), (BATCH_SIZE, BATCH64_REPEATS)):
        batch = images[:size]
        timings = time_interleaved(
            {name: (lambda p=predict, b=batch: p(b)) for name, predict in predictors.items()},
            warmup=2,
            repeats=repeats,
        )
        for name, timing in timings.items():
            results[name][f"batch{size}_p50_ms"] = timing["median_s"] * 1000
    return results


def main() -> None:
    params = load_params(PARAMS_FILE)
    # extract.backbone: auto -> the backbone the advise stage chose (the one fine-tuned).
    params = chosen_params(params, load_advice(Path("metrics") / params.experiment / "advice.json"))
    task = task_for(params, Path("data") / params.experiment / "tfds")
    model_path = Path("models") / params.experiment / "finetune" / "model"
    model, forward = task.load_classifier(len(task.class_names()), model_path)
    images, _ = task.read_split("test")
    program = inference_program(model, forward, {"image": images[:1]})
    started = time.perf_counter()
    stablehlo = export_stablehlo(program)
    onnx_bytes = export_onnx_program(program).SerializeToString()
    export_s = time.perf_counter() - started
    predictors = {
        "flax": _flax_predictor(model, forward),
        "stablehlo": _stablehlo_predictor(stablehlo),
        "onnx": _onnx_predictor(onnx_bytes),
    }
    logits = {name: _all_logits(predict, images) for name, predict in predictors.items()}
    latencies = _latencies(predictors, images)
    reference = logits["flax"]
    results: dict[str, object] = {"flax": latencies["flax"]}
    for name in ("stablehlo", "onnx"):
        results[name] = {
            "argmax_agreement": float(np.mean(logits[name].argmax(1) == reference.argmax(1))),
            "max_abs_logit_diff": float(np.abs(logits[name] - reference).max()),
            **latencies[name],
        }
    results |= {
        "test_examples": len(images),
        "model": str(model_path),
        "stablehlo_bytes": len(stablehlo),
        "onnx_bytes": len(onnx_bytes),
        "export_s": export_s,
        "onnxruntime": onnxruntime.__version__,
        "jax": jax.__version__,
    }
    rows = [
        {"form": name, **{key: results[name].get(key, "") for key in _COLUMNS}}
        for name in ("flax", "stablehlo", "onnx")
    ]
    print_table(rows)
    print(f"wrote {write_results('export', results)}")


_COLUMNS = ("argmax_agreement", "max_abs_logit_diff", "batch1_p50_ms", "batch64_p50_ms")


if __name__ == "__main__":
    main()
