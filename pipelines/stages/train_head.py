"""Stage ``train_head``: feature extraction's second half - a new head on cached features."""

from __future__ import annotations

from flax import nnx

from pipelines.stages.common import ExperimentPaths, LiveLog, check_batch_fits, run_stage
from tlflax.balance import training_class_balance
from tlflax.checkpoint import save_tree
from tlflax.config import Params
from tlflax.data.tfds_store import read_class_names
from tlflax.features_io import read_training_features
from tlflax.io import atomic_path, write_json
from tlflax.train import create_head, train_head


def run(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.train_head
    class_names = read_class_names(paths.dataset_dir, params.prepare.stored_name)
    train, validation = read_training_features(
        paths.features / "train.npz", paths.features / "validation.npz", len(class_names)
    )
    check_batch_fits("train_head.batch_size", cfg.batch_size, train)
    balance = training_class_balance(params, train["label"], class_names)
    print(f"train_head: class balance: {balance.describe()}")
    head = create_head(train["features"].shape[1], len(class_names), cfg)
    epochs: list[dict[str, float]] = []
    live = LiveLog(paths.live("train_head"))

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        epochs.append(metrics)  # the log as epochs end: progress shows while it trains
        live.update(epochs)

    history = train_head(head, train, validation, cfg, balance=balance, on_epoch_end=log_epoch)
    live.update(history.epochs, final=True)
    with atomic_path(paths.head, directory=True) as temporary:
        save_tree(temporary, nnx.state(head, nnx.Param))
    summary = history.summary()
    write_json(paths.metrics("train_head"), summary)
    print(
        f"train_head: best epoch {history.best_epoch} of {len(history.epochs)}, "
        f"validation accuracy {summary['validation_accuracy']:.4f}"
    )


if __name__ == "__main__":
    run_stage("train_head", run)
