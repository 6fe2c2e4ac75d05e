"""The training run shared by ``finetune`` and ``train_scratch``: fit, checkpoint, log, save."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flax import nnx

from pipelines.stages.common import ExperimentPaths, resume_dir, write_live_log
from pipelines.stages.tasks import ARCHITECTURE_FILE, Task
from tlflax.checkpoint import TrainingCheckpoints, save_tree
from tlflax.config import FinetuneParams
from tlflax.io import atomic_path, write_json
from tlflax.prefix_cache import cache_prefix, frozen_prefix_groups
from tlflax.train import Finetuner, Forward, run_finetuning
from tlflax.transfer import summarize


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem (.cache linked elsewhere): copy instead
        shutil.copy2(source, destination)


def fit_and_save(
    stage: str,
    model: nnx.Module,
    forward: Forward,
    cfg: FinetuneParams,
    train: dict,
    validation: dict,
    *,
    paths: ExperimentPaths,
    eval_batch_size: int,
    fingerprint: str,
) -> dict:
    """Train ``model`` by ``cfg``; save the best model and the checkpoints in the stage's folder.

    Every epoch is checkpointed under :func:`~pipelines.stages.common.resume_dir`, outside
    the stage's outputs, which DVC deletes before running the stage again: a killed run
    started again continues from its last finished epoch, provided its ``fingerprint``
    (:func:`~pipelines.stages.common.run_fingerprint`) is the same, and starts afresh
    otherwise. At the end ``output_dir`` is written at once (``model``: the best epoch's
    full state; ``checkpoints``: latest + best N), with per-epoch metrics through dvclive in
    ``live_dir`` and a summary JSON at ``metrics_path``, which it also returns; the three
    paths are the ``stage``'s in ``paths``.
    """
    output_dir = paths.model_dir(stage)
    live_dir, metrics_path = paths.live(stage), paths.metrics(stage)
    finetuner = Finetuner(
        model,
        forward,
        cfg,
        num_train_examples=len(train["label"]),
        group_patterns=model.backbone.group_patterns(),
    )
    counts = summarize(finetuner.settings, finetuner.sizes)
    print(
        f"{stage}: {counts['trainable_parameters']:,} trainable / "
        f"{counts['frozen_parameters']:,} frozen parameters"
    )
    resume = resume_dir(output_dir)
    checkpoints = TrainingCheckpoints(
        resume, keep_best=cfg.keep_best_checkpoints, fingerprint=fingerprint, monitor=cfg.monitor
    )
    if checkpoints.discarded:
        print(
            f"{stage}: {resume} held checkpoints of another run (other params, data or "
            "code); starting afresh"
        )
    elif checkpoints.latest_step() is not None:
        print(f"{stage}: resuming after epoch {checkpoints.latest_step()} from {resume}")

    def report_epoch(epoch: int, metrics: dict[str, float]) -> None:
        print(f"{stage}: epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    state, history = run_finetuning(
        finetuner,
        train,
        validation,
        checkpoints,
        eval_batch_size=eval_batch_size,
        on_epoch_end=report_epoch,
    )
    checkpoints.close()
    with atomic_path(output_dir, directory=True) as staging:
        save_tree(staging / "model", nnx.state(finetuner.model(state)))
        # The weights alone do not say which depths the head reads: the folder does.
        architecture = {
            "taps": model.taps and list(model.taps),
            "test_time_flip": cfg.augment.test_time_flip,
        }
        write_json(staging / ARCHITECTURE_FILE, architecture)
        # Hard links: the resume folder stays whole until every output is in place, so a
        # kill before the end still resumes instead of training again.
        shutil.copytree(resume, staging / "checkpoints", copy_function=_link_or_copy)
    write_live_log(live_dir, history.epochs)
    best = history.epochs[history.best_epoch]
    summary = {
        "best_epoch": history.best_epoch,
        "epochs_run": len(history.epochs),
        "stopped_early": history.stopped_early,
        "validation_accuracy": best["validation_accuracy"],
        "validation_loss": best["validation_loss"],
        **counts,
    }
    write_json(metrics_path, summary)
    checkpoints.delete()
    return summary


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
    stage: str,
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
        cache_prefix(model, cut, split, batch_size=batch_size, description=f"cache {name}")
        for name, split in (("train", train), ("validation", validation))
    )
    print(
        f"{stage}: cached the outputs of the {groups} frozen bottom layer groups "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return TrainingInputs(train, validation, cut.forward)
