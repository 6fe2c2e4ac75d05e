"""Stage ``train_scratch``: the baseline - the same network from random weights, same budget."""

from __future__ import annotations

from flax import nnx

from pipelines.stages.common import ExperimentPaths, run_stage
from pipelines.stages.tasks import task_for
from pipelines.stages.training import fit_and_save
from tlflax.config import Params, TransferRule
from tlflax.models.layers import set_batchnorm_training


def run(params: Params, paths: ExperimentPaths) -> None:
    scratch = params.train_scratch
    # Same epochs, augmentation, schedule shape and early stopping as fine-tuning; only what
    # must differ for random weights differs: everything trains, at one learning rate.
    cfg = params.finetune.model_copy(
        update={
            "learning_rate": scratch.learning_rate,
            "batch_size": scratch.batch_size,
            "weight_decay": scratch.weight_decay,
            "layer_lr_decay": 1.0,
            "batchnorm": "train",
            "rules": [TransferRule(pattern=".*")],
            "seed": scratch.seed,
        }
    )
    task = task_for(params, paths)
    num_classes = len(task.class_names())

    # One compiled program initialises every parameter (eagerly, each shape compiles alone).
    @nnx.jit
    def create():
        return task.build_classifier(num_classes, pretrained=False, seed=scratch.seed)

    model = create()
    set_batchnorm_training(model.backbone, True)
    fit_and_save(
        "train_scratch",
        model,
        task.forward(),
        cfg,
        task.read_inputs("train"),
        task.read_inputs("validation"),
        output_dir=paths.scratch,
        live_dir=paths.live("train_scratch"),
        metrics_path=paths.metrics("train_scratch"),
        eval_batch_size=params.evaluate.batch_size,
    )


if __name__ == "__main__":
    run_stage("train_scratch", run)
