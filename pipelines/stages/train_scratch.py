"""Stage ``train_scratch``: the baseline - the same network from random weights, same budget."""

from __future__ import annotations

from flax import nnx

from pipelines.stages.advise import applied_strategy
from pipelines.stages.common import ExperimentPaths, run_fingerprint, run_stage
from pipelines.stages.tasks import task_for
from pipelines.stages.training import build_scratch_classifier, fit_and_save, scratch_settings
from tlflax.config import Params


def run(params: Params, paths: ExperimentPaths) -> None:
    task = task_for(params, paths)
    num_classes = len(task.class_names())
    train, validation = task.read_inputs("train"), task.read_inputs("validation")
    # The same epochs and schedule as fine-tuning: written in params.yaml, or advised (the
    # resolved values are in params from here on, so the resume fingerprint sees them).
    finetune = applied_strategy(
        params, paths, task, num_classes=num_classes, num_train_examples=len(train["label"])
    ).finetune
    params = params.model_copy(update={"finetune": finetune})
    cfg = scratch_settings(finetune, params.train_scratch)
    model = build_scratch_classifier(task, num_classes, params.train_scratch.seed)
    fit_and_save(
        "train_scratch",
        model,
        task.forward(),
        cfg,
        train,
        validation,
        paths=paths,
        eval_batch_size=params.evaluate.batch_size,
        fingerprint=run_fingerprint(params, train, validation, nnx.state(model)),
    )


if __name__ == "__main__":
    run_stage("train_scratch", run)
