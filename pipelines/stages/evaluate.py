"""Stage ``evaluate``: head-only vs fine-tuned model on the full test split."""

from __future__ import annotations

import csv
import functools

import jax
from flax import nnx

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.checkpoint import restore_tree
from tlflax.config import Params
from tlflax.data.pipeline import prepare_images
from tlflax.data.tfds_store import read_class_names, read_image_split
from tlflax.evaluate import classification_report
from tlflax.io import atomic_path, read_arrays, write_json
from tlflax.train import create_head, predict_probabilities
from tlflax.vision import abstract_image_classifier

HEADLINE = ("accuracy", "macro_f1", "ece")


def _head_only_probabilities(params: Params, paths: ExperimentPaths, num_classes: int):
    test = read_arrays(paths.features / "test.npz")
    head = create_head(test["features"].shape[1], num_classes, params.train_head)
    nnx.update(head, restore_tree(paths.head, nnx.state(head, nnx.Param)))
    graphdef, state = nnx.split(head)

    @jax.jit
    def predict(state, batch):
        return jax.nn.softmax(nnx.merge(graphdef, state)(batch["features"]))

    arrays = {"features": test["features"], "label": test["label"]}
    return predict_probabilities(
        functools.partial(predict, state), arrays, params.evaluate.batch_size
    )


def _finetuned_probabilities(params: Params, paths: ExperimentPaths, images, labels, num_classes):
    model = abstract_image_classifier(params.extract.backbone, num_classes, params.train_head)
    graphdef, abstract_state = nnx.split(model)
    state = restore_tree(paths.finetune / "model", abstract_state)
    image_size = params.extract.image_size

    # Weights are an argument, not a closure: closed-over arrays become compile-time constants.
    @jax.jit
    def predict(state, batch):
        logits = nnx.merge(graphdef, state)(prepare_images(batch["image"], image_size))
        return jax.nn.softmax(logits)

    return predict_probabilities(
        functools.partial(predict, state),
        {"image": images, "label": labels},
        params.evaluate.batch_size,
    )


def _write_confusion(path, labels, predictions, class_names) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (class_names[a], class_names[p]) for a, p in zip(labels, predictions, strict=True)
        )


def run(params: Params, paths: ExperimentPaths) -> None:
    dataset = params.prepare.dataset
    class_names = read_class_names(paths.dataset_dir, dataset)
    images, labels = read_image_split(paths.dataset_dir, dataset, "test")
    _, train_labels = read_image_split(paths.dataset_dir, dataset, "train")
    probabilities = {
        "head_only": _head_only_probabilities(params, paths, len(class_names)),
        "finetune": _finetuned_probabilities(params, paths, images, labels, len(class_names)),
    }
    reports = {
        name: classification_report(
            probs, labels, class_names, calibration_bins=params.evaluate.calibration_bins
        )
        for name, probs in probabilities.items()
    }
    metrics = {name: {k: report[k] for k in HEADLINE} for name, report in reports.items()}
    metrics["n_train"] = int(len(train_labels))
    metrics["n_test"] = int(len(labels))
    write_json(paths.metrics("evaluate"), metrics)
    write_json(paths.plots / "classification_report.json", reports)
    _write_confusion(
        paths.plots / "confusion.csv", labels, probabilities["finetune"].argmax(axis=1), class_names
    )
    for name, report in reports.items():
        print(
            f"evaluate: {name:9s} accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}"
        )


if __name__ == "__main__":
    run_stage("evaluate", run)
