"""The strategy grid: does the advisor pick the best way to transfer?

Every strategy - feature extraction, fine-tuning the top k layer groups, full fine-tuning,
training from scratch - is trained on two datasets (Fashion-MNIST with EfficientNet-Lite0,
fine-food reviews with MiniLM-L6) at two training-set sizes, each cell under one step
budget and under every seed (the seed draws the training and validation examples and seeds
every initialisation and order). Per seed, the advisor (:mod:`tlflax.advisor`) measures the
same data as the advise stage does - depth probes, then the taps the head reads - and every
strategy runs as the pipeline's models do with ``extract.taps: auto``: the head on the
joined taps, the network cut after the highest. The advisor's picks, one per seed, are
scored by their mean test accuracy against the best strategy's mean. The library is called
directly (no DVC), through the same code the pipeline runs (``apply_advice``,
``resolve_plan``, ``Finetuner``, the prefix cache), seeded end to end::

    python -m pipelines.strategy_grid                 # the README's grid: 4 cells, 3 seeds
    python -m pipelines.strategy_grid --sizes 10 --datasets vision --seeds 0 --steps 40
    python -m pipelines.strategy_grid --resume        # go on where a stopped grid ended

Writes ``metrics/strategy_grid.json``, ``plots/strategy_grid.png`` and
``reports/strategy_grid.md`` (the README table). Each (cell, seed) run is kept in
``metrics/strategy_grid_runs/`` as it ends, and the summary rewritten (``"complete":
false`` until the last): a stopped grid keeps what it measured, and ``--resume`` runs only
what is missing - reusing a run only where this very code made it (a hash of every file
the grid imports), so a grid can be run a part at a time and come out whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from pipelines.seed_statistics import mean_and_spread
from pipelines.stage_deps import ROOT, import_closure
from pipelines.stages.common import ExperimentPaths, enable_compilation_cache

# LABELS stays importable from here, as before the outputs had a module of their own.
from pipelines.strategy_grid_report import LABELS, markdown_table, plot_grid  # noqa: F401
from pipelines.strategy_grid_setup import (
    DATASETS,
    STRATEGIES,
    CellData,
    GridDataset,
    cell_data,
    raw_splits,
)
from tlflax.advisor import Advice
from tlflax.api import advise_on_inputs, extract_features
from tlflax.checkpoint import TrainingCheckpoints
from tlflax.config import Params, parse_params
from tlflax.data.pipeline import num_batches
from tlflax.finetuner import Finetuner, FinetuneState, run_finetuning
from tlflax.fit import build_scratch_classifier, cache_frozen_prefix
from tlflax.io import atomic_path, write_json
from tlflax.loop import History
from tlflax.plan import TrainingPlan, resolve_plan
from tlflax.taps import joined_numpy
from tlflax.tasks import Task, class_probabilities, task_for
from tlflax.train import create_head, train_head

# Tiny training sets are repeated so an epoch holds at least this many examples: early
# stopping, validation and checkpoints then happen every ~50 steps, not every 4.
MIN_EPOCH_EXAMPLES = 1600
# The advisor's pick counts as right when it is this close to the best strategy's accuracy.
TARGET_GAP = 0.01
# Steps per strategy: BiT-HyperRule's 500 for < 20k examples where the CPU allows it; a
# text step costs ~10x an image step here (MiniLM at 64 tokens, EfficientNet at 32 px).
DEFAULT_STEPS = {"vision": 500, "text": 150}
DEFAULT_SEEDS = (0, 1, 2)
# The params sections whose `seed` a grid seed sets (as pipelines.seeds sets every one).
SEEDED_SECTIONS = ("prepare", "train_head", "finetune", "train_scratch")


# --------------------------------------------------------------------------------------------
# The advisor, and one training run per strategy
# --------------------------------------------------------------------------------------------


def run_advisor(
    task: Task, params: Params, data: CellData, num_classes: int
) -> tuple[Advice, dict[str, np.ndarray]]:
    """The advise stage's measurements, advice and taps on this cell (the same function,
    probing at most ``advise.max_train_examples``), and the head's features of train and
    validation: the joined pooled outputs of the advised taps, every training example's."""
    backbone = task.build_classifier(
        num_classes, pretrained=True, seed=params.prepare.seed
    ).backbone
    train_labels = data.train["label"]
    advice, probed_features = advise_on_inputs(
        task,
        backbone,
        train_labels,
        lambda probed: {key: value[probed] for key, value in data.train.items() if key != "label"},
        data.validation,
        num_classes=num_classes,
    )
    taps = advised_taps(advice)
    if advice.evidence.probed_train_examples == len(train_labels):
        # The probes saw every training example, in order: their features are the head's.
        train_features = joined_numpy(probed_features["train"], taps)
    else:
        # They saw a subset (train is larger than advise.max_train_examples); the head
        # trains on all of it, as the extract stage's features give it.
        train_features = extract_features(task, backbone, taps, data.train)
    head_features = {
        "train": train_features,
        "validation": joined_numpy(probed_features["validation"], taps),
    }
    return advice, head_features


def advised_taps(advice: Advice) -> list[int]:
    """The depths every model of the cell reads (``extract.taps: auto``)."""
    assert advice.taps is not None, "run_advisor sets the taps"
    return list(advice.taps.taps)


def _repeat(arrays: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
    if times == 1:
        return arrays
    return {key: np.concatenate([value] * times) for key, value in arrays.items()}


def _strategy_plan(
    task: Task,
    params: Params,
    advice: Advice,
    strategy: str,
    train_examples: int,
    *,
    steps: int,
    num_classes: int,
) -> tuple[TrainingPlan, int, list[str]]:
    """The finetune settings of ``strategy`` under the cell's step budget, how many times an
    epoch repeats the training set, and the backbone's layer-group patterns."""
    repeats = max(1, math.ceil(MIN_EPOCH_EXAMPLES / train_examples))
    epoch_examples = repeats * train_examples
    # The cell's step budget replaces the advised schedule's length (written settings win).
    epochs = max(1, math.ceil(steps / num_batches(epoch_examples, params.finetune.batch_size)))
    requested = params.finetune.model_copy(update={"strategy": strategy, "epochs": epochs})
    # The network cut after the highest tap: its groups are the ones a strategy can train.
    abstract = task.abstract_classifier(num_classes, advised_taps(advice))
    group_patterns = abstract.backbone.group_patterns()
    plan = resolve_plan(
        requested,
        params.train_scratch,
        advice,
        model=abstract,
        num_train_examples=epoch_examples,
        taps=advised_taps(advice),
    )
    return plan.finetune, repeats, group_patterns


def _starting_model(
    task: Task, cfg: TrainingPlan, head_state: nnx.State, num_classes: int, taps: list[int]
) -> nnx.Module:
    """The model ``cfg``'s strategy starts from, reading ``taps``: untrained for scratch,
    else pretrained with the cell's trained head."""
    if cfg.strategy == "scratch":
        return build_scratch_classifier(task, num_classes, cfg.seed, taps)
    model = task.build_classifier(num_classes, pretrained=True, seed=cfg.seed, taps=taps)
    nnx.update(model.head, head_state)
    return model


def _training_inputs(
    task: Task, model: nnx.Module, cfg: TrainingPlan, data: CellData, repeats: int, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]:
    """Train (repeated ``repeats`` times) and validation inputs, past the frozen prefix when
    ``cfg`` caches it, and the forward pass that reads them."""
    inputs = cache_frozen_prefix(
        task,
        model,
        cfg,
        data.train,
        data.validation,
        batch_size=batch_size,
        name="strategy grid",
    )
    train, validation, forward = inputs.train, inputs.validation, inputs.forward
    train = _repeat(train, repeats)
    return train, validation, forward


def _finetune(
    finetuner: Finetuner,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    monitor: str,
    eval_batch_size: int,
) -> tuple[FinetuneState, History]:
    """``run_finetuning`` with checkpoints in a temporary directory, gone once it returns."""
    with tempfile.TemporaryDirectory(prefix="strategy-grid-") as directory:
        checkpoints = TrainingCheckpoints(directory, keep_best=1, monitor=monitor)
        state, history = run_finetuning(
            finetuner, train, validation, checkpoints, eval_batch_size=eval_batch_size
        )
        checkpoints.close()
    return state, history


def _test_accuracy(
    task: Task, cfg: TrainingPlan, model: nnx.Module, test: dict[str, np.ndarray], batch_size: int
) -> float:
    probabilities = class_probabilities(
        model,
        task.forward(test_time_flip=cfg.augment.test_time_flip),
        test,
        batch_size,
    )
    return float(np.mean(probabilities.argmax(axis=1) == test["label"]))


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
    cfg, repeats, group_patterns = _strategy_plan(
        task,
        params,
        advice,
        strategy,
        len(data.train["label"]),
        steps=steps,
        num_classes=num_classes,
    )
    model = _starting_model(task, cfg, head_state, num_classes, advised_taps(advice))
    train, validation, forward = _training_inputs(
        task, model, cfg, data, repeats, params.extract.batch_size
    )
    finetuner = Finetuner(
        model,
        forward,
        cfg,
        num_train_examples=len(train["label"]),
        group_patterns=group_patterns,
    )
    state, history = _finetune(
        finetuner, train, validation, cfg.monitor, params.evaluate.batch_size
    )
    trained = finetuner.model(state)
    test_accuracy = _test_accuracy(task, cfg, trained, data.test, params.evaluate.batch_size)
    best = history.summary()
    result = {
        "test_accuracy": test_accuracy,
        "validation_accuracy": best["validation_accuracy"],
        "kept_start": history.kept_start is not None,
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


def _train_shared_head(
    params: Params, features: dict[str, np.ndarray], data: CellData, num_classes: int
) -> nnx.State:
    """A head trained on the cell's frozen features (the advised taps joined); its
    parameters, as host arrays."""
    head = create_head(features["train"].shape[1], num_classes, params.train_head)
    train_head(
        head,
        {"features": features["train"], "label": data.train["label"]},
        {"features": features["validation"], "label": data.validation["label"]},
        params.train_head,
    )
    # Host copies: fine-tuning donates its device buffers, and every strategy starts here.
    return jax.tree.map(np.array, nnx.state(head, nnx.Param))


def _advice_record(advice: Advice, seconds: float) -> dict[str, Any]:
    """The advisor's pick and the evidence behind it, as a cell of the grid records them."""
    return {
        "strategy": advice.strategy,
        "unfreeze_groups": advice.unfreeze_groups,
        "num_groups": advice.evidence.num_groups,
        "taps": advised_taps(advice),
        "taps_probe_accuracy": advice.taps.validation_accuracy,
        "size_regime": advice.size_regime,
        "similarity": advice.similarity,
        "reasons": list(advice.reasons),
        "probe_accuracy_by_depth": [p.validation_accuracy for p in advice.evidence.pretrained],
        "seconds": round(seconds, 1),
    }


def cell_params(dataset: GridDataset, per_class: int, seed: int) -> Params:
    """The cell's params under ``seed``: its size, and ``seed`` in every seeded section."""
    sections = {
        name: dict(values) for name, values in dataset.params.items() if name != "experiment"
    }
    sections["prepare"]["train_per_class"] = per_class
    for name in SEEDED_SECTIONS:
        sections[name] = {**sections.get(name, {}), "seed": seed}
    return parse_params(
        {"experiment": dataset.params["experiment"], **sections},
        source=f"strategy grid ({dataset.name}, seed {seed})",
    )


def run_cell_seed(
    dataset: GridDataset, per_class: int, raw, *, seed: int, steps: int
) -> dict[str, Any]:
    """Advisor + every strategy on one (dataset, training size) cell under one seed."""
    started = time.perf_counter()
    params = cell_params(dataset, per_class, seed)
    task = task_for(params, ExperimentPaths(params.experiment).dataset_dir)
    num_classes = int(raw[1].max()) + 1
    data = cell_data(task, dataset, per_class, raw, seed=seed)
    advice, head_features = run_advisor(task, params, data, num_classes)
    advised_seconds = time.perf_counter() - started
    print(
        f"{dataset.name} {per_class}/class, seed {seed}: advisor picks {advice.strategy} "
        f"(top {advice.unfreeze_groups} of {advice.evidence.num_groups} groups), taps "
        f"{advised_taps(advice)}, in {advised_seconds:.0f} s",
        flush=True,
    )
    # Every pretrained strategy starts from the same head, trained on the frozen features
    # (the pipeline's train_head).
    head_state = _train_shared_head(params, head_features, data, num_classes)
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
    return {
        "seed": seed,
        "backbone": params.extract.backbone,
        "train_examples": len(data.train["label"]),
        "validation_examples": len(data.validation["label"]),
        "test_examples": len(data.test["label"]),
        "advice": _advice_record(advice, advised_seconds),
        "results": results,
    }


def summarize_cell(dataset: str, per_class: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell over its seeds' runs (:func:`run_cell_seed`): each strategy's mean and sample
    spread, the advisor's picks and the mean test accuracy of what it picked, against the
    strategy with the best mean test accuracy."""
    results = {
        strategy: {
            **mean_and_spread(
                [run["results"][strategy] for run in runs],
                ("test_accuracy", "validation_accuracy"),
            ),
            "unfreeze_groups": [run["results"][strategy]["unfreeze_groups"] for run in runs],
        }
        for strategy in STRATEGIES
    }
    picks = [run["advice"]["strategy"] for run in runs]
    advised = mean_and_spread(
        [
            {"test_accuracy": run["results"][run["advice"]["strategy"]]["test_accuracy"]}
            for run in runs
        ],
        ("test_accuracy",),
    )
    best_test = max(STRATEGIES, key=lambda s: results[s]["test_accuracy_mean"])
    best_validation = max(STRATEGIES, key=lambda s: results[s]["validation_accuracy_mean"])
    gap = results[best_test]["test_accuracy_mean"] - advised["test_accuracy_mean"]
    first = runs[0]
    return {
        "dataset": dataset,
        "backbone": first["backbone"],
        "train_per_class": per_class,
        "train_examples": first["train_examples"],
        "validation_examples": first["validation_examples"],
        "test_examples": first["test_examples"],
        "seeds": [run["seed"] for run in runs],
        "advisor": {"picks": picks, **advised},
        "results": results,
        "best_by_test": best_test,
        "best_by_validation": best_validation,
        "advisor_gap": gap,
        "within_target": gap <= TARGET_GAP,
        "runs": {str(run["seed"]): run for run in runs},
    }


def code_fingerprint() -> str:
    """A hash of every project file this grid can execute (its import closure): a run is
    reused by ``--resume`` only when it was made by exactly this code."""
    digest = hashlib.sha256()
    for relative in import_closure("pipelines.strategy_grid"):
        digest.update(relative.encode())
        digest.update((ROOT / relative).read_bytes())
    return digest.hexdigest()[:16]


def run_path(runs_dir: Path, dataset: str, per_class: int, seed: int, steps: int) -> Path:
    """Where one (cell, seed) run of the grid is kept."""
    return runs_dir / f"{dataset}-{per_class}-seed{seed}-steps{steps}.json"


def earlier_run(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The run kept in ``path`` where the code of ``fingerprint`` made it; else None."""
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"strategy grid: {path} is not JSON ({error}); delete it to run that seed again"
        ) from None
    return run if isinstance(run, dict) and run.get("code") == fingerprint else None


def grid_summary(
    cells: list[dict[str, Any]], *, seeds: list[int], steps: dict[str, int], complete: bool
) -> dict[str, Any]:
    """``metrics/strategy_grid.json``: the cells, the target and how many cells meet it.
    ``complete`` is false while a run is under way (the file is rewritten after every
    seed of every cell, so a stopped grid keeps what it measured); ``seconds`` adds up the
    runs' own times, reused ones included."""
    return {
        "seeds": seeds,
        "std_ddof": 1,
        "complete": complete,
        "cells": cells,
        "steps": steps,
        "target_gap": TARGET_GAP,
        "cells_within_target": sum(cell["within_target"] for cell in cells),
        "seconds": round(sum(run["seconds"] for cell in cells for run in cell["runs"].values()), 1),
    }


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
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=list(DEFAULT_SEEDS),
        help="every cell runs under each (default: 0 1 2)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs kept in --runs-dir that this very code made (same files, same "
        "steps); run only the (cell, seed) pairs missing",
    )
    parser.add_argument("--output", default="metrics/strategy_grid.json")
    parser.add_argument("--runs-dir", default="metrics/strategy_grid_runs", type=Path)
    parser.add_argument("--plot", default="plots/strategy_grid.png")
    parser.add_argument("--table", default="reports/strategy_grid.md")
    arguments = parser.parse_args()
    enable_compilation_cache()
    fingerprint = code_fingerprint()
    steps = {name: arguments.steps or DEFAULT_STEPS[name] for name in arguments.datasets}
    cells: list[dict[str, Any]] = []
    for name in arguments.datasets:
        dataset = DATASETS[name]
        raw = raw_splits(dataset)
        for per_class in arguments.sizes:
            runs: list[dict[str, Any]] = []
            for seed in arguments.seeds:
                path = run_path(arguments.runs_dir, name, per_class, seed, steps[name])
                run = earlier_run(path, fingerprint) if arguments.resume else None
                if run is None:
                    started = time.perf_counter()
                    run = run_cell_seed(dataset, per_class, raw, seed=seed, steps=steps[name])
                    run.update(
                        code=fingerprint,
                        steps=steps[name],
                        seconds=round(time.perf_counter() - started, 1),
                    )
                    write_json(path, run)
                else:
                    print(f"{name} {per_class}/class, seed {seed}: reused {path}")
                runs.append(run)
                cell = summarize_cell(name, per_class, runs)
                write_json(
                    arguments.output,
                    grid_summary(
                        [*cells, cell], seeds=arguments.seeds, steps=steps, complete=False
                    ),
                )
            cells.append(cell)
    summary = grid_summary(cells, seeds=arguments.seeds, steps=steps, complete=True)
    write_json(arguments.output, summary)
    plot_grid(cells, Path(arguments.plot))
    table = markdown_table(cells)
    with atomic_path(arguments.table) as temporary:
        temporary.write_text(table, encoding="utf-8")
    print(table)
    print(
        f"{summary['cells_within_target']} of {len(cells)} cells within {TARGET_GAP} of the "
        f"best; {summary['seconds']:.0f} s of runs"
    )


if __name__ == "__main__":
    main()
