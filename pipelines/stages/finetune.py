"""Stage ``finetune``: backbone + trained head, unfrozen by rules, per-group learning rates.

With ``finetune.cache_frozen_prefix``, the backbone's fully frozen bottom layer groups run
once over train and validation (inference mode) and the steps train the layers above from
their cached outputs (:mod:`tlflax.prefix_cache`); the saved model is still the whole one.
"""

from __future__ import annotations

import time

from flax import nnx

from pipelines.stages.common import ExperimentPaths, run_stage
from pipelines.stages.tasks import task_for
from pipelines.stages.training import fit_and_save
from tlflax.checkpoint import restore_tree
from tlflax.config import Params
from tlflax.models.layers import set_batchnorm_training
from tlflax.prefix_cache import cache_prefix, frozen_prefix_groups


def run(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.finetune
    task = task_for(params, paths)
    train, validation = task.read_inputs("train"), task.read_inputs("validation")
    model = task.build_classifier(
        len(task.class_names()), pretrained=params.extract.pretrained, seed=cfg.seed
    )
    nnx.update(model.head, restore_tree(paths.head, nnx.state(model.head, nnx.Param)))
    # Keras' fine-tuning advice: BatchNorm keeps its running statistics unless asked otherwise.
    set_batchnorm_training(model.backbone, cfg.batchnorm == "train")
    forward = task.forward()
    groups = frozen_prefix_groups(model, cfg.rules) if cfg.cache_frozen_prefix else 0
    if groups:
        started = time.perf_counter()
        cut = task.prefix_cut(groups)
        batch_size = params.extract.batch_size
        train = cache_prefix(model, cut, train, batch_size=batch_size, description="cache train")
        validation = cache_prefix(
            model, cut, validation, batch_size=batch_size, description="cache validation"
        )
        forward = cut.forward
        print(
            f"finetune: cached the outputs of the {groups} frozen bottom layer groups "
            f"in {time.perf_counter() - started:.1f} s"
        )
    fit_and_save(
        "finetune",
        model,
        forward,
        cfg,
        train,
        validation,
        output_dir=paths.finetune,
        live_dir=paths.live("finetune"),
        metrics_path=paths.metrics("finetune"),
        eval_batch_size=params.evaluate.batch_size,
    )


if __name__ == "__main__":
    run_stage("finetune", run)
