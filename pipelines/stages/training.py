"""The training run of the finetune and train_scratch stages, with the stage's outputs.

The run itself is the library's (:func:`tlflax.fit.fit_classifier`); this adds where the
pipeline keeps its files: checkpoints under :func:`~pipelines.stages.common.resume_dir`, the
model folder, the dvclive log and the metrics JSON. Not in ``common``: every stage imports
that, and DVC would re-run ``prepare`` after a change to the training code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flax import nnx
from pydantic import BaseModel

from pipelines.stages.common import ExperimentPaths, LiveLog, resume_dir
from tlflax import fit
from tlflax.balance import ClassBalance
from tlflax.checkpoint import delete_checkpoints
from tlflax.config import FinetuneParams
from tlflax.distributed import is_writer
from tlflax.io import write_json


def run_fingerprint(settings: Sequence[BaseModel], *trees: object) -> str:
    """:func:`tlflax.fit.run_fingerprint` with the stages' code hashed too."""
    return fit.run_fingerprint(settings, *trees, code=[Path(__file__).parent])


def fit_and_save(
    stage: str,
    model: nnx.Module,
    forward: Callable,
    cfg: FinetuneParams,
    train: dict,
    validation: dict,
    *,
    paths: ExperimentPaths,
    eval_batch_size: int,
    fingerprint: str,
    balance: ClassBalance,
    extra_metrics: dict | None = None,
) -> dict:
    """The training run of ``stage`` (finetune, train_scratch) with the stage's outputs:
    :func:`tlflax.fit.fit_classifier`, checkpointing under :func:`resume_dir` (outside the
    outputs DVC deletes before a run, so a killed run resumes), then the model folder, the
    dvclive log (as epochs end, :class:`LiveLog`) and the metrics JSON; ``balance`` is the
    plan's remedy for imbalanced training data; ``extra_metrics`` join the metrics JSON (what
    happened before the run, such as the contrastive stage). Returns the summary."""
    output_dir = paths.model_dir(stage)
    resume = resume_dir(output_dir)
    live = LiveLog(paths.live(stage))
    result = fit.fit_classifier(
        model,
        forward,
        cfg,
        train,
        validation,
        checkpoint_dir=resume,
        eval_batch_size=eval_batch_size,
        fingerprint=fingerprint,
        # The dvclive log as epochs end, so `dvc plots` shows progress during training:
        # rewritten whole (atomically) from the run's history, which a resumed run
        # restores, so a kill never leaves a log with a gap.
        on_history=(lambda history: live.update(history.epochs)) if is_writer() else None,
        name=stage,
        balance=balance,
    )
    if not is_writer():
        # Several processes trained together (tlflax.distributed): process 0 writes.
        return result.summary
    live.update(result.history.epochs, final=True)
    fit.save_classifier(
        result.model,
        output_dir,
        test_time_flip=cfg.augment.test_time_flip,
        checkpoint_dir=resume,
    )
    write_json(paths.metrics(stage), {**result.summary, **(extra_metrics or {})})
    delete_checkpoints(resume)
    return result.summary
