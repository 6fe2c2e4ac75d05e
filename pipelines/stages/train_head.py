"""Stage ``train_head``: feature extraction's second half - a new head on cached features."""

from __future__ import annotations

from flax import nnx

from dvclive import Live
from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.checkpoint import save_tree
from tlflax.config import Params
from tlflax.data.tfds_store import read_class_names
from tlflax.io import read_arrays, write_json
from tlflax.train import create_head, train_head


def _split(paths: ExperimentPaths, split: str) -> dict:
    arrays = read_arrays(paths.features / f"{split}.npz")
    return {"features": arrays["features"], "label": arrays["label"]}


def run(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.train_head
    train, validation = _split(paths, "train"), _split(paths, "validation")
    class_names = read_class_names(paths.dataset_dir, params.prepare.dataset)
    head = create_head(train["features"].shape[1], len(class_names), cfg)
    with Live(str(paths.live("train_head")), save_dvc_exp=False, dvcyaml=None) as live:

        def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()

        history = train_head(head, train, validation, cfg, on_epoch_end=log_epoch)
    save_tree(paths.head, nnx.state(head, nnx.Param))
    best = history.epochs[history.best_epoch]
    summary = {
        "best_epoch": history.best_epoch,
        "epochs_run": len(history.epochs),
        "stopped_early": history.stopped_early,
        "validation_accuracy": best["validation_accuracy"],
        "validation_loss": best["validation_loss"],
    }
    write_json(paths.metrics("train_head"), summary)
    print(
        f"train_head: best epoch {history.best_epoch} of {len(history.epochs)}, "
        f"validation accuracy {best['validation_accuracy']:.4f}"
    )


if __name__ == "__main__":
    run_stage("train_head", run)
