"""Stage ``finetune``: backbone + trained head, unfrozen by rules, per-group learning rates."""

from __future__ import annotations

from flax import nnx

from dvclive import Live
from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.checkpoint import TrainingCheckpoints, restore_tree, save_tree
from tlflax.config import Params
from tlflax.data.pipeline import num_batches
from tlflax.data.tfds_store import read_class_names, read_image_split
from tlflax.io import write_json
from tlflax.models.efficientnet import set_batchnorm_training
from tlflax.train import Finetuner, run_finetuning
from tlflax.transfer import summarize
from tlflax.vision import build_image_classifier, image_forward


def _split(params: Params, paths: ExperimentPaths, split: str) -> dict:
    images, labels = read_image_split(paths.dataset_dir, params.prepare.dataset, split)
    return {"image": images, "label": labels}


def run(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.finetune
    train, validation = _split(params, paths, "train"), _split(params, paths, "validation")
    class_names = read_class_names(paths.dataset_dir, params.prepare.dataset)
    model = build_image_classifier(
        params.extract.backbone,
        len(class_names),
        params.train_head,
        pretrained=params.extract.pretrained,
        seed=cfg.seed,
    )
    nnx.update(model.head, restore_tree(paths.head, nnx.state(model.head, nnx.Param)))
    # Keras' fine-tuning advice: BatchNorm keeps its running statistics unless asked otherwise.
    set_batchnorm_training(model.backbone, cfg.batchnorm == "train")
    finetuner = Finetuner(
        model,
        image_forward(params.extract.image_size, cfg.augment),
        cfg,
        steps_per_epoch=num_batches(len(train["label"]), cfg.batch_size, drop_remainder=False),
        group_patterns=model.backbone.group_patterns(),
    )
    counts = summarize(finetuner.settings, finetuner.sizes)
    print(
        f"finetune: {counts['trainable_parameters']:,} trainable / "
        f"{counts['frozen_parameters']:,} frozen parameters"
    )
    checkpoints = TrainingCheckpoints(
        paths.finetune / "checkpoints", keep_best=cfg.keep_best_checkpoints
    )
    with Live(str(paths.live("finetune")), save_dvc_exp=False, dvcyaml=None) as live:

        def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
            print(
                f"finetune: epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            )

        state, history = run_finetuning(
            finetuner,
            train,
            validation,
            checkpoints,
            eval_batch_size=params.evaluate.batch_size,
            on_epoch_end=log_epoch,
        )
    checkpoints.close()
    save_tree(paths.finetune / "model", nnx.state(finetuner.model(state)))
    best = history.epochs[history.best_epoch]
    write_json(
        paths.metrics("finetune"),
        {
            "best_epoch": history.best_epoch,
            "epochs_run": len(history.epochs),
            "stopped_early": history.stopped_early,
            "validation_accuracy": best["validation_accuracy"],
            "validation_loss": best["validation_loss"],
            **counts,
        },
    )


if __name__ == "__main__":
    run_stage("finetune", run)
