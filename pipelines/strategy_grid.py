"""The strategy grid: does the advisor pick the best way to transfer? (issue #9)

Every strategy - feature extraction, fine-tuning the top k layer groups, full fine-tuning,
training from scratch - is trained on two datasets (Fashion-MNIST with EfficientNet-Lite0,
fine-food reviews with MiniLM-L6) at two training-set sizes, each cell under one step
budget; the advisor (:mod:`tlflax.advisor`) measures the same data, and its pick is compared
with the best strategy found on the test subset. The library is called directly (no DVC),
through the same code the pipeline runs (``apply_advice``, ``Finetuner``, the prefix cache),
seeded end to end::

    python -m pipelines.strategy_grid                 # the README's grid, ~30 min on 2 cores
    python -m pipelines.strategy_grid --sizes 10 --datasets vision --steps 40   # a quick look

Writes ``metrics/strategy_grid.json``, ``plots/strategy_grid.png`` and
``reports/strategy_grid.md`` (the README table).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from pipelines.stages.common import ExperimentPaths, enable_compilation_cache
from tlflax.advisor import Advice, measure, recommend
from tlflax.checkpoint import TrainingCheckpoints
from tlflax.config import Params, parse_params
from tlflax.data.fashion_mnist import read_fashion_mnist
from tlflax.data.fine_foods import FINE_FOODS_CLASSES, read_fine_foods
from tlflax.data.manifest import duplicate_records, text_content_hash
from tlflax.data.pipeline import num_batches
from tlflax.data.subsets import stratified_subset
from tlflax.finetuner import Finetuner, run_finetuning
from tlflax.fit import build_scratch_classifier, cache_frozen_prefix
from tlflax.io import atomic_path, write_json
from tlflax.plan import resolve_plan
from tlflax.tasks import Task, class_probabilities, task_for
from tlflax.train import create_head, train_head

STRATEGIES = ("feature_extraction", "top_k", "full", "scratch")
SEED = 0
# Tiny training sets are repeated so an epoch holds at least this many examples: early
# stopping, validation and checkpoints then happen every ~50 steps, not every 4.
MIN_EPOCH_EXAMPLES = 1600
# The advisor's pick counts as right when it is this close to the best strategy's accuracy.
TARGET_GAP = 0.01
# Steps per strategy: BiT-HyperRule's 500 for < 20k examples where the CPU allows it; a
# text step costs ~10x an image step here (MiniLM at 64 tokens, EfficientNet at 32 px).
DEFAULT_STEPS = {"vision": 500, "text": 150}


@dataclass(frozen=True)
class GridDataset:
    """One dataset of the grid: its pipeline params and its fixed evaluation subsets."""

    name: str
    params: dict[str, Any]
    validation_per_class: int
    test_examples: int


DATASETS = {
    "vision": GridDataset(
        "vision",
        {
            "experiment": "grid-vision",
            "prepare": {"dataset": "fashion_mnist", "raw_dir": "data/raw/fashion-mnist"},
            "extract": {"backbone": "efficientnet_lite0", "image_size": 32, "batch_size": 256},
            # No augmentation (fair to every strategy, and it lets frozen prefixes be cached).
            "finetune": {
                "learning_rate": 1e-3,
                "augment": {"random_crop": False, "flip": False},
                "cache_frozen_prefix": True,
                "keep_best_checkpoints": 1,
            },
            "train_scratch": {"learning_rate": 3e-3},
        },
        validation_per_class=50,
        test_examples=2000,
    ),
    "text": GridDataset(
        "text",
        {
            "experiment": "grid-text",
            "prepare": {"dataset": "fine_foods", "raw_dir": "data/raw/modeldata"},
            "extract": {"backbone": "minilm_l6", "max_length": 64, "batch_size": 64},
            "train_head": {"dropout": 0.1},
            # Batches of 16: a MiniLM step costs ~1 s here, the budget below is 150 of them.
            "finetune": {
                "learning_rate": 3e-4,
                "batch_size": 16,
                "weight_decay": 0.01,
                "cache_frozen_prefix": True,
                "keep_best_checkpoints": 1,
            },
            "train_scratch": {"learning_rate": 5e-4, "batch_size": 16, "weight_decay": 0.01},
        },
        validation_per_class=100,
        test_examples=1000,
    ),
}


# --------------------------------------------------------------------------------------------
# Data: the raw training pool, validation and a fixed test subset
# --------------------------------------------------------------------------------------------


def _raw_splits(dataset: GridDataset) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """(pool records, pool labels, test records, test labels) straight from the raw files."""
    raw_dir = Path(dataset.params["prepare"]["raw_dir"])
    if dataset.name == "vision":
        raw = read_fashion_mnist(raw_dir)
        return (*raw["train"], *raw["test"])
    frames = read_fine_foods(raw_dir)

    def split(frame):
        labels = frame["label"].map(FINE_FOODS_CLASSES.index).to_numpy(np.int64)
        return frame["review"].to_numpy(dtype=object), labels

    pool, pool_labels = split(frames["train"])
    test, test_labels = split(frames["test"])
    # As prepare's `deduplicate`: no repeated review in the pool, none that test also holds.
    drop = duplicate_records(
        [text_content_hash(t) for t in pool], [text_content_hash(t) for t in test]
    )
    return pool[~drop], pool_labels[~drop], test, test_labels


@dataclass
class CellData:
    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


def cell_data(task: Task, dataset: GridDataset, per_class: int, raw) -> CellData:
    pool, pool_labels, test, test_labels = raw
    validation_index = stratified_subset(
        pool_labels, per_class=dataset.validation_per_class, seed=SEED
    )
    train_index = stratified_subset(
        pool_labels, per_class=per_class, seed=SEED, exclude=validation_index
    )
    test_index = np.arange(len(test_labels))
    if dataset.test_examples < len(test_labels):
        fraction = dataset.test_examples / len(test_labels)
        test_index = stratified_subset(test_labels, fraction=fraction, seed=SEED)

    def inputs(records, labels, index):
        return {**task.model_inputs(records[index]), "label": labels[index]}

    return CellData(
        inputs(pool, pool_labels, train_index),
        inputs(pool, pool_labels, validation_index),
        inputs(test, test_labels, test_index),
    )


# --------------------------------------------------------------------------------------------
# The advisor, and one training run per strategy
# --------------------------------------------------------------------------------------------


def run_advisor(task: Task, params: Params, data: CellData, num_classes: int):
    """The advise stage's measurements and advice on this cell, and the top features."""
    evidence, features = measure(
        task.build_classifier(num_classes, pretrained=True, seed=SEED).backbone,
        task.pooled_after_each_group,
        data.train,
        data.validation,
        num_classes=num_classes,
        batch_size=params.extract.batch_size,
    )
    top = {name: by_depth[-1] for name, by_depth in features.items()}
    return recommend(evidence, params.advise), top


def _repeat(arrays: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
    if times == 1:
        return arrays
    return {key: np.concatenate([value] * times) for key, value in arrays.items()}


def train_strategy(
    task: Task,
    params: Params,
    advice: Advice,
    strategy: str,
    data: CellData,
    head_state: nnx.State,
    *,
    steps: int,
    num_classes: int,
) -> dict[str, Any]:
    """Train one strategy as the finetune stage would (explicit strategy, the cell's budget)."""
    started = time.perf_counter()
    repeats = max(1, math.ceil(MIN_EPOCH_EXAMPLES / len(data.train["label"])))
    epoch_examples = repeats * len(data.train["label"])
    # The cell's step budget replaces the advised schedule's length (written settings win).
    epochs = max(1, math.ceil(steps / num_batches(epoch_examples, params.finetune.batch_size)))
    requested = params.finetune.model_copy(update={"strategy": strategy, "epochs": epochs})
    abstract = task.abstract_classifier(num_classes)
    group_patterns = abstract.backbone.group_patterns()
    plan = resolve_plan(
        requested,
        params.train_scratch,
        advice,
        model=abstract,
        num_train_examples=epoch_examples,
    )
    cfg = plan.finetune
    if cfg.strategy == "scratch":
        model = build_scratch_classifier(task, num_classes, cfg.seed)
    else:
        model = task.build_classifier(num_classes, pretrained=True, seed=cfg.seed)
        nnx.update(model.head, head_state)
    inputs = cache_frozen_prefix(
        task,
        model,
        cfg,
        data.train,
        data.validation,
        batch_size=params.extract.batch_size,
        stage="strategy grid",
    )
    train, validation, forward = inputs.train, inputs.validation, inputs.forward
    train = _repeat(train, repeats)
    finetuner = Finetuner(
        model,
        forward,
        cfg,
        num_train_examples=len(train["label"]),
        group_patterns=group_patterns,
    )
    with tempfile.TemporaryDirectory(prefix="strategy-grid-") as directory:
        checkpoints = TrainingCheckpoints(directory, keep_best=1, monitor=cfg.monitor)
        state, history = run_finetuning(
            finetuner, train, validation, checkpoints, eval_batch_size=params.evaluate.batch_size
        )
        checkpoints.close()
    trained = finetuner.model(state)
    probabilities = class_probabilities(
        trained,
        task.forward(test_time_flip=cfg.augment.test_time_flip),
        data.test,
        params.evaluate.batch_size,
    )
    test_accuracy = float(np.mean(probabilities.argmax(axis=1) == data.test["label"]))
    best = history.epochs[history.best_epoch]
    result = {
        "test_accuracy": test_accuracy,
        "validation_accuracy": best["validation_accuracy"],
        "unfreeze_groups": cfg.unfreeze_groups,
        "epochs_run": len(history.epochs),
        "steps_run": len(history.epochs) * finetuner.steps_per_epoch(len(train["label"])),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"  {strategy:18s} test {test_accuracy:.4f}  validation "
        f"{best['validation_accuracy']:.4f}  ({result['seconds']:.0f} s, "
        f"{result['epochs_run']} epochs)",
        flush=True,
    )
    return result


def run_cell(dataset: GridDataset, per_class: int, raw, *, steps: int) -> dict[str, Any]:
    """Advisor + every strategy on one (dataset, training size) cell."""
    started = time.perf_counter()
    params = parse_params(
        {**dataset.params, "prepare": {**dataset.params["prepare"], "train_per_class": per_class}},
        source=f"strategy grid ({dataset.name})",
    )
    task = task_for(params, ExperimentPaths(params.experiment).dataset_dir)
    num_classes = int(raw[1].max()) + 1
    data = cell_data(task, dataset, per_class, raw)
    advice, top_features = run_advisor(task, params, data, num_classes)
    advised_seconds = time.perf_counter() - started
    print(
        f"{dataset.name} {per_class}/class: advisor picks {advice.strategy} "
        f"(top {advice.unfreeze_groups} of {advice.evidence.num_groups} groups) "
        f"in {advised_seconds:.0f} s",
        flush=True,
    )
    # Every pretrained strategy starts from the same head, trained on the frozen features
    # (the pipeline's train_head).
    head = create_head(top_features["train"].shape[1], num_classes, params.train_head)
    train_head(
        head,
        {"features": top_features["train"], "label": data.train["label"]},
        {"features": top_features["validation"], "label": data.validation["label"]},
        params.train_head,
    )
    # Host copies: fine-tuning donates its device buffers, and every strategy starts here.
    head_state = jax.tree.map(np.array, nnx.state(head, nnx.Param))
    results = {
        strategy: train_strategy(
            task,
            params,
            advice,
            strategy,
            data,
            head_state,
            steps=steps,
            num_classes=num_classes,
        )
        for strategy in STRATEGIES
    }
    best_test = max(results, key=lambda s: results[s]["test_accuracy"])
    best_validation = max(results, key=lambda s: results[s]["validation_accuracy"])
    gap = results[best_test]["test_accuracy"] - results[advice.strategy]["test_accuracy"]
    return {
        "dataset": dataset.name,
        "backbone": params.extract.backbone,
        "train_per_class": per_class,
        "train_examples": len(data.train["label"]),
        "validation_examples": len(data.validation["label"]),
        "test_examples": len(data.test["label"]),
        "advice": {
            "strategy": advice.strategy,
            "unfreeze_groups": advice.unfreeze_groups,
            "num_groups": advice.evidence.num_groups,
            "size_regime": advice.size_regime,
            "similarity": advice.similarity,
            "reasons": list(advice.reasons),
            "probe_accuracy_by_depth": [p.validation_accuracy for p in advice.evidence.pretrained],
            "seconds": round(advised_seconds, 1),
        },
        "results": results,
        "best_by_test": best_test,
        "best_by_validation": best_validation,
        "advisor_gap": gap,
        "within_target": gap <= TARGET_GAP,
    }


# --------------------------------------------------------------------------------------------
# Outputs: JSON, plot, markdown table
# --------------------------------------------------------------------------------------------

LABELS = {
    "feature_extraction": "feature extraction",
    "top_k": "top-k fine-tune",
    "full": "full fine-tune",
    "scratch": "from scratch",
}


def markdown_table(cells: list[dict[str, Any]]) -> str:
    header = (
        "| dataset | train / class | "
        + " | ".join(LABELS[s] for s in STRATEGIES)
        + " | advisor's pick | best | gap | within 1 pt |"
    )
    lines = [header, "|" + "---|" * (len(STRATEGIES) + 6)]
    for cell in cells:
        results = cell["results"]
        pick = cell["advice"]["strategy"]
        figures = []
        for strategy in STRATEGIES:
            figure = f"{results[strategy]['test_accuracy']:.3f}"
            if strategy == "top_k":
                figure += f" (k={results[strategy]['unfreeze_groups']})"
            if strategy == cell["best_by_test"]:
                figure = f"**{figure}**"
            figures.append(figure)
        lines.append(
            f"| {cell['dataset']} | {cell['train_per_class']} | "
            + " | ".join(figures)
            + f" | {LABELS[pick]} | {LABELS[cell['best_by_test']]} | "
            f"{cell['advisor_gap']:.3f} | {'yes' if cell['within_target'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot_grid(cells: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: test accuracy of each strategy per cell; the advisor's pick hatched."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    width = 0.8 / len(STRATEGIES)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for position, cell in enumerate(cells):
        for index, strategy in enumerate(STRATEGIES):
            picked = strategy == cell["advice"]["strategy"]
            axes.bar(
                position + (index - (len(STRATEGIES) - 1) / 2) * width,
                cell["results"][strategy]["test_accuracy"],
                width,
                color=colours[index],
                hatch="//" if picked else None,
                edgecolor="black" if picked else colours[index],
                label=LABELS[strategy] if position == 0 else None,
            )
    axes.set_xticks(
        range(len(cells)), [f"{c['dataset']}\n{c['train_per_class']}/class" for c in cells]
    )
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.3, 1.0)
    axes.set_title("Strategy grid (hatched: the advisor's pick)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncols=2)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.strategy_grid", description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 500])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per strategy (default: 500 for vision, the BiT-HyperRule budget "
        "for < 20k examples; 150 for text, to fit the CPU budget)",
    )
    parser.add_argument("--output", default="metrics/strategy_grid.json")
    parser.add_argument("--plot", default="plots/strategy_grid.png")
    parser.add_argument("--table", default="reports/strategy_grid.md")
    arguments = parser.parse_args()
    enable_compilation_cache()
    started = time.perf_counter()
    cells = []
    for name in arguments.datasets:
        dataset = DATASETS[name]
        raw = _raw_splits(dataset)
        steps = arguments.steps or DEFAULT_STEPS[name]
        for per_class in arguments.sizes:
            cells.append(run_cell(dataset, per_class, raw, steps=steps))
    summary = {
        "cells": cells,
        "steps": {name: arguments.steps or DEFAULT_STEPS[name] for name in arguments.datasets},
        "target_gap": TARGET_GAP,
        "cells_within_target": sum(cell["within_target"] for cell in cells),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(arguments.output, summary)
    plot_grid(cells, Path(arguments.plot))
    table = markdown_table(cells)
    with atomic_path(arguments.table) as temporary:
        temporary.write_text(table, encoding="utf-8")
    print(table)
    print(
        f"{summary['cells_within_target']} of {len(cells)} cells within {TARGET_GAP} of the "
        f"best; {summary['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
