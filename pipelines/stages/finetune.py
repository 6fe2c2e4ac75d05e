"""Stage ``finetune``: backbone + trained head, unfrozen by rules, per-group learning rates.

What trains follows ``finetune.strategy`` (``auto``: the advise stage's pick):
``feature_extraction`` trains the head alone, from train_head's head, on the frozen backbone;
``top_k`` the top k layer groups and the head; ``full`` everything; ``scratch`` the same
network from random weights, as ``train_scratch`` does. Settings written in params.yaml win
over the advice (``pipelines.stages.advise.applied_strategy``).

With ``finetune.cache_frozen_prefix``, the backbone's fully frozen bottom layer groups run
once over train and validation (inference mode) and the steps train the layers above from
their cached outputs (:mod:`tlflax.prefix_cache`); the saved model is still the whole one.
"""

from __future__ import annotations

from flax import nnx

from pipelines.stages.advise import applied_strategy
from pipelines.stages.common import (
    ExperimentPaths,
    check_batch_fits,
    run_fingerprint,
    run_stage,
)
from pipelines.stages.tasks import task_for
from pipelines.stages.training import (
    build_scratch_classifier,
    cache_frozen_prefix,
    fit_and_save,
    scratch_settings,
)
from tlflax.checkpoint import restore_tree
from tlflax.config import Params
from tlflax.models.layers import set_batchnorm_training


def run(params: Params, paths: ExperimentPaths) -> None:
    task = task_for(params, paths)
    train, validation = task.read_inputs("train"), task.read_inputs("validation")
    num_classes = len(task.class_names())
    # The strategy (under `auto`) and every setting params.yaml leaves unset: from the advice.
    applied = applied_strategy(
        params, paths, task, num_classes=num_classes, num_train_examples=len(train["label"])
    )
    if applied.strategy == "scratch":
        # Pretrained features no better than random ones, and data enough: the same network
        # from random weights, trained as train_scratch trains it.
        cfg = scratch_settings(applied.finetune, params.train_scratch)
        model = build_scratch_classifier(task, num_classes, cfg.seed)
    else:
        cfg = applied.finetune
        model = task.build_classifier(
            num_classes, pretrained=params.extract.pretrained, seed=cfg.seed
        )
        nnx.update(model.head, restore_tree(paths.head, nnx.state(model.head, nnx.Param)))
        # Keras' fine-tuning advice: BatchNorm keeps its running statistics unless asked.
        set_batchnorm_training(model.backbone, cfg.batchnorm == "train")
    # The settings the run uses, so the resume fingerprint below sees them.
    params = params.model_copy(update={"finetune": cfg})
    check_batch_fits("finetune.batch_size", cfg.batch_size, train)
    check_batch_fits("evaluate.batch_size", params.evaluate.batch_size, validation)
    # Before the prefix cache replaces the inputs: what the run starts from, whatever path.
    fingerprint = run_fingerprint(params, train, validation, nnx.state(model))
    inputs = cache_frozen_prefix(
        task, model, cfg, train, validation, batch_size=params.extract.batch_size, stage="finetune"
    )
    fit_and_save(
        "finetune",
        model,
        inputs.forward,
        cfg,
        inputs.train,
        inputs.validation,
        paths=paths,
        eval_batch_size=params.evaluate.batch_size,
        fingerprint=fingerprint,
    )


if __name__ == "__main__":
    run_stage("finetune", run)
