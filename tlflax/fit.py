"""A training run of a whole classifier - fine-tuning or from scratch: fit, save, load.

:func:`fit_classifier` runs :func:`tlflax.finetuner.run_finetuning` with its checkpoints (resume
after a kill) and returns the best epoch's model; :func:`save_classifier` writes the folder
that :meth:`tlflax.tasks.Task.load_classifier` reads back. Both serve the Python API and the
pipeline's finetune and train_scratch stages alike.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flax import nnx
from pydantic import BaseModel

from tlflax.balance import NO_REMEDY, ClassBalance
from tlflax.checkpoint import TrainingCheckpoints, save_tree, tree_digest
from tlflax.config import FinetuneParams
from tlflax.finetuner import Finetuner, run_finetuning
from tlflax.io import atomic_path, write_json
from tlflax.loop import EpochCallback, History
from tlflax.prefix_cache import cache_prefix, frozen_prefix_groups
from tlflax.tasks import ARCHITECTURE_FILE, Task
from tlflax.train import Forward
from tlflax.transfer import summarize


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem (.cache linked elsewhere): copy instead
        shutil.copy2(source, destination)


@dataclass
class FitResult:
    """A finished training run: its best epoch's model, history and summary."""

    # The best epoch's weights (their moving average where finetune.ema_decay is set), in
    # inference mode: what is saved and evaluated.
    model: nnx.Module
    history: History
    # best_epoch, epochs_run, stopped_early, the best epoch's validation accuracy and loss,
    # and the trainable / frozen parameter counts.
    summary: dict


def open_checkpoints(
    checkpoint_dir: Path, cfg: FinetuneParams, fingerprint: str | None, name: str
) -> TrainingCheckpoints:
    """The run's checkpoints: resumed when they are this run's (same ``fingerprint``),
    discarded otherwise; says which."""
    checkpoints = TrainingCheckpoints(
        checkpoint_dir,
        keep_best=cfg.keep_best_checkpoints,
        fingerprint=fingerprint,
        monitor=cfg.monitor,
    )
    if checkpoints.discarded:
        print(
            f"{name}: {checkpoint_dir} held checkpoints of another run (other params, data or "
            "code); starting afresh"
        )
    elif checkpoints.latest_step() is not None:
        print(f"{name}: resuming after epoch {checkpoints.latest_step()} from {checkpoint_dir}")

    return checkpoints


def fit_classifier(
    model: nnx.Module,
    forward: Forward,
    cfg: FinetuneParams,
    train: dict,
    validation: dict,
    *,
    checkpoint_dir: Path,
    eval_batch_size: int,
    fingerprint: str | None = None,
    on_epoch_end: EpochCallback | None = None,
    on_history: Callable[[History], None] | None = None,
    name: str = "finetune",
    balance: ClassBalance = NO_REMEDY,
) -> FitResult:
    """Train ``model`` by ``cfg`` (a plan: fine-tuning, or from scratch) with early stopping.

    Every epoch is checkpointed in ``checkpoint_dir`` (latest + best N): a killed run started
    again with the same ``fingerprint`` (what the run starts from: settings, data, initial
    weights, code) continues from its last finished epoch; checkpoints of another run are
    discarded. ``on_epoch_end(epoch, metrics)`` sees each epoch's metrics as it ends, and
    ``on_history(history)`` the whole history so far (a resumed run's earlier epochs too).
    The checkpoints stay for the caller (:func:`save_classifier` keeps them beside the model).
    ``balance`` is the remedy for imbalanced training data (the plan's ``class_balance``).
    """
    finetuner = Finetuner(
        model,
        forward,
        cfg,
        num_train_examples=len(train["label"]),
        group_patterns=model.backbone.group_patterns(),
        balance=balance,
    )
    counts = summarize(finetuner.settings, finetuner.sizes)
    print(
        f"{name}: {counts['trainable_parameters']:,} trainable / "
        f"{counts['frozen_parameters']:,} frozen parameters"
    )
    checkpoints = open_checkpoints(checkpoint_dir, cfg, fingerprint, name)
    state, history = run_finetuning(
        finetuner,
        train,
        validation,
        checkpoints,
        eval_batch_size=eval_batch_size,
        on_epoch_end=on_epoch_end,
        on_history=on_history,
        name=name,
    )
    checkpoints.close()
    return FitResult(finetuner.model(state), history, {**history.summary(), **counts})


def run_fingerprint(
    settings: Sequence[BaseModel], *trees: object, code: Sequence[Path] = ()
) -> str:
    """What checkpoints must match to be resumed: settings, code, and the starting ``trees``.

    ``settings`` are the run's params and plan; ``trees`` what the run starts from (the
    arrays it trains and validates on, the initial model state). The code is every Python
    file of ``tlflax`` and of the ``code`` folders, so a run never continues checkpoints
    that other code wrote.
    """
    digest = hashlib.sha256()
    for model in settings:
        digest.update(model.model_dump_json().encode())
    for package in (Path(__file__).parent, *code):
        for source in sorted(Path(package).rglob("*.py")):
            digest.update(source.relative_to(package).as_posix().encode())
            digest.update(source.read_bytes())
    digest.update(tree_digest(*trees).encode())
    return digest.hexdigest()


def save_classifier(
    model: nnx.Module,
    directory: Path,
    *,
    test_time_flip: bool = False,
    checkpoint_dir: Path | None = None,
) -> None:
    """Write ``directory`` at once: ``model/`` (the whole state), :data:`ARCHITECTURE_FILE`
    (the taps its head reads, its test-time augmentation) and, from ``checkpoint_dir``, the
    run's ``checkpoints/``. :meth:`tlflax.tasks.Task.load_classifier` reads it back."""
    with atomic_path(Path(directory), directory=True) as staging:
        save_tree(staging / "model", nnx.state(model))
        # The weights alone do not say which depths the head reads: the folder does.
        architecture = {
            "taps": model.taps and list(model.taps),
            "test_time_flip": test_time_flip,
        }
        write_json(staging / ARCHITECTURE_FILE, architecture)
        if checkpoint_dir is not None:
            # Hard links: the checkpoint folder stays whole until every output is in place,
            # so a kill before the end still resumes instead of training again.
            shutil.copytree(checkpoint_dir, staging / "checkpoints", copy_function=_link_or_copy)


def build_scratch_classifier(
    task: Task, num_classes: int, seed: int, taps: Sequence[int] | None = None
) -> nnx.Module:
    """The task's classifier from random weights (its plan trains BatchNorm too), reading
    the plan's ``taps``: the same network as the fine-tuned one."""

    # One compiled program initialises every parameter (eagerly, each shape compiles alone).
    @nnx.jit
    def create():
        return task.build_classifier(num_classes, pretrained=False, seed=seed, taps=taps)

    return create()


@dataclass
class TrainingInputs:
    """What a fine-tuning run steps over: its train and validation arrays and its forward."""

    train: dict
    validation: dict
    forward: Forward


def cache_frozen_prefix(
    task: Task,
    model: nnx.Module,
    cfg: FinetuneParams,
    train: dict,
    validation: dict,
    *,
    batch_size: int,
    name: str = "finetune",
) -> TrainingInputs:
    """Train and validation inputs, through the frozen bottom layer groups once if ``cfg`` asks.

    With ``cfg.cache_frozen_prefix`` and rules that freeze whole groups at the bottom of the
    backbone, those groups run once (inference mode, ``batch_size`` at a time) and the
    returned forward starts from their cached outputs (:mod:`tlflax.prefix_cache`);
    otherwise the inputs and the task's forward come back unchanged.
    """
    groups = frozen_prefix_groups(model, cfg.rules) if cfg.cache_frozen_prefix else 0
    if model.taps is not None:
        # A tap below the cut would read activations the cache no longer has.
        groups = min(groups, model.taps[0])
    if not groups:
        return TrainingInputs(train, validation, task.forward(cfg))
    started = time.perf_counter()
    cut = task.prefix_cut(groups)
    train, validation = (
        cache_prefix(model, cut, split, batch_size=batch_size, description=f"cache {split_name}")
        for split_name, split in (("train", train), ("validation", validation))
    )
    print(
        f"{name}: cached the outputs of the {groups} frozen bottom layer groups "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return TrainingInputs(train, validation, cut.forward)
