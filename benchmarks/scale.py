"""Host memory and time of feature extraction and one fine-tuning epoch as the data grows.

    .venv/bin/python -m benchmarks.scale [--sizes 1000 60000] [--output PATH]

For each training-set size N, the first N images of a seeded shuffle of Fashion-MNIST's
60,000 (taken from train and test, as the full job has only 59,000 training images once its
validation split is out) are written as the pipeline's TFDS store, and two measurements run,
each in a fresh process that reports its own peak resident memory (``ru_maxrss``):

- ``extract``: the frozen EfficientNet-Lite0 (the default job's backbone, at its
  ``extract.image_size``) over the N images, as the extract stage runs it;
- ``epoch``: one epoch of full fine-tuning (every layer group trains, the default job's
  ``finetune.batch_size``), as the finetune stage runs it: batches read from the store on
  demand (:mod:`tlflax.data.streaming`). The time includes the step's compilation.

The peer, measured in the same run at the largest size: the same epoch with the split read
whole into memory first (``epoch_in_memory``), as every stage did before streaming.
Output: ``benchmarks/results/scale.json`` (../shared/MEASURE.md, item 9), with
``epoch_peak_rss_ratio`` = peak of the epoch at the largest size / at the smallest.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, print_table
from tlflax.io import write_json

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ROOT / "params.yaml"
BACKBONE = "efficientnet_lite0"
VALIDATION_SIZE = 1000
SEED = 0
MEASUREMENTS = ("extract", "epoch", "epoch_in_memory")


def write_store(data_dir: Path, size: int) -> None:
    """The first ``size`` images of a seeded shuffle of all 70,000, and 1,000 more for
    validation, as the pipeline's TFDS store."""
    from tlflax.config import load_params
    from tlflax.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
    from tlflax.data.tfds_store import write_image_dataset

    params = load_params(PARAMS_FILE)
    splits = read_fashion_mnist(ROOT / params.prepare.raw_dir)
    images = np.concatenate([splits["train"][0], splits["test"][0]])
    labels = np.concatenate([splits["train"][1], splits["test"][1]])
    order = np.random.default_rng(SEED).permutation(len(labels))
    if size + VALIDATION_SIZE > len(order):
        sys.exit(f"--sizes: at most {len(order) - VALIDATION_SIZE} training images, got {size}")
    train, validation = order[:size], order[size : size + VALIDATION_SIZE]
    write_image_dataset(
        data_dir,
        params.prepare.stored_name,
        {
            "train": (images[train], labels[train]),
            "validation": (images[validation], labels[validation]),
        },
        FASHION_MNIST_CLASSES,
    )


def measure(kind: str, data_dir: Path, image_size: int | None = None) -> dict[str, float]:
    """Run one measurement in this process; returns its seconds and peak RSS (MB)."""
    from flax import nnx

    from benchmarks.gpu_check import full_plan
    from tlflax.api import backbone_for, extract_features
    from tlflax.config import load_params
    from tlflax.finetuner import Finetuner
    from tlflax.tasks import task_for

    params = load_params(PARAMS_FILE).with_backbone(BACKBONE)
    if image_size is not None:
        extract = params.extract.model_copy(update={"image_size": image_size})
        params = params.model_copy(update={"extract": extract})
    task = task_for(params, data_dir)
    train = task.read_inputs("train")
    if kind == "epoch_in_memory":
        train = {key: np.asarray(column) for key, column in train.items()}
    started = time.perf_counter()
    if kind == "extract":
        extract_features(task, backbone_for(params), None, train)
    else:
        model = task.build_classifier(len(task.class_names()), pretrained=True, seed=SEED)
        plan = full_plan(task, model, params.finetune.batch_size)
        finetuner = Finetuner(
            model,
            task.forward(plan),
            plan,
            num_train_examples=len(train["label"]),
            group_patterns=model.backbone.group_patterns(),
        )
        state, _ = finetuner.run_epoch(finetuner.initial, train, progress=False)
        nnx.state(finetuner.model(state))  # the epoch's result, materialised
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1)}


def run_measurement(kind: str, data_dir: Path, image_size: int | None) -> dict[str, float]:
    """:func:`measure` in a fresh process, so each peak is its own."""
    command = [sys.executable, "-m", "benchmarks.scale", "--measure", kind]
    if image_size is not None:
        command += ["--image-size", str(image_size)]
    command += ["--data-dir"]
    result = subprocess.run(
        [*command, str(data_dir)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"benchmarks.scale: {kind} on {data_dir} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(sizes: list[int], image_size: int | None = None) -> dict:
    results: dict = {}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"tlflax-scale-{size}-") as folder:
            write_store(Path(folder), size)
            kinds = MEASUREMENTS if size == max(sizes) else MEASUREMENTS[:2]
            measured = {kind: run_measurement(kind, Path(folder), image_size) for kind in kinds}
        row = {
            "extract_peak_rss_mb": measured["extract"]["peak_rss_mb"],
            "extract_s": measured["extract"]["seconds"],
            "epoch_peak_rss_mb": measured["epoch"]["peak_rss_mb"],
            "epoch_s": measured["epoch"]["seconds"],
        }
        if "epoch_in_memory" in measured:
            row["epoch_in_memory_peak_rss_mb"] = measured["epoch_in_memory"]["peak_rss_mb"]
            row["epoch_in_memory_s"] = measured["epoch_in_memory"]["seconds"]
        results[str(size)] = row
        print(f"scale: {size} training images: {row}", flush=True)
    smallest, largest = str(min(sizes)), str(max(sizes))
    results["epoch_peak_rss_ratio"] = round(
        results[largest]["epoch_peak_rss_mb"] / results[smallest]["epoch_peak_rss_mb"], 3
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 60000])
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "scale.json")
    parser.add_argument(
        "--image-size", type=int, help="extract.image_size to run at (default: params.yaml's)"
    )
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        print(json.dumps(measure(arguments.measure, arguments.data_dir, arguments.image_size)))
        return
    if len(set(arguments.sizes)) < 2 or min(arguments.sizes) < 1:
        parser.error("--sizes: give two or more different positive sizes")
    results = run(sorted(set(arguments.sizes)), arguments.image_size)
    write_json(arguments.output, results)
    print_table([{"n_train": size, **row} for size, row in results.items() if size.isdigit()])
    print(f"epoch peak RSS, largest / smallest: {results['epoch_peak_rss_ratio']}")
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
