"""Stage ``train_scratch``: the baseline - the same network from random weights, same budget."""

from __future__ import annotations

from flax import nnx

from pipelines.stages.common import ExperimentPaths, run_stage
from pipelines.stages.training import fit_and_save
from tlflax.config import Params, TransferRule
from tlflax.data.tfds_store import read_class_names, read_image_split
from tlflax.models.layers import set_batchnorm_training
from tlflax.vision import build_image_classifier, image_forward


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
    dataset = params.prepare.dataset
    splits = {}
    for split in ("train", "validation"):
        images, labels = read_image_split(paths.dataset_dir, dataset, split)
        splits[split] = {"image": images, "label": labels}
    num_classes = len(read_class_names(paths.dataset_dir, dataset))

    # One compiled program initialises every parameter (eagerly, each shape compiles alone).
    @nnx.jit
    def create():
        return build_image_classifier(
            params.extract.backbone,
            num_classes,
            params.train_head,
            pretrained=False,
            seed=scratch.seed,
        )

    model = create()
    set_batchnorm_training(model.backbone, True)
    fit_and_save(
        "train_scratch",
        model,
        image_forward(params.extract.image_size, cfg.augment),
        cfg,
        splits["train"],
        splits["validation"],
        output_dir=paths.finetune.parent / "scratch",
        live_dir=paths.live("train_scratch"),
        metrics_path=paths.metrics("train_scratch"),
        eval_batch_size=params.evaluate.batch_size,
    )


if __name__ == "__main__":
    run_stage("train_scratch", run)
