"""The training run shared by ``finetune`` and ``train_scratch``: fit, checkpoint, log, save."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from dvclive import Live
from tlflax.checkpoint import TrainingCheckpoints, save_tree
from tlflax.config import FinetuneParams
from tlflax.data.pipeline import num_batches
from tlflax.io import write_json
from tlflax.train import Finetuner, Forward, run_finetuning
from tlflax.transfer import summarize


def fit_and_save(
    stage: str,
    model: nnx.Module,
    forward: Forward,
    cfg: FinetuneParams,
    train: dict,
    validation: dict,
    *,
    output_dir: Path,
    live_dir: Path,
    metrics_path: Path,
    eval_batch_size: int,
) -> dict:
    """Train ``model`` by ``cfg`` with checkpoints under ``output_dir``; save the best model.

    Writes ``output_dir/model`` (the best epoch's full state), per-epoch metrics through
    dvclive in ``live_dir``, and a summary JSON at ``metrics_path``, which it also returns.
    """
    finetuner = Finetuner(
        model,
        forward,
        cfg,
        steps_per_epoch=num_batches(len(train["label"]), cfg.batch_size),
        group_patterns=model.backbone.group_patterns(),
    )
    counts = summarize(finetuner.settings, finetuner.sizes)
    print(
        f"{stage}: {counts['trainable_parameters']:,} trainable / "
        f"{counts['frozen_parameters']:,} frozen parameters"
    )
    checkpoints = TrainingCheckpoints(
        output_dir / "checkpoints", keep_best=cfg.keep_best_checkpoints
    )
    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) as live:

        def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
            print(
                f"{stage}: epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            )

        state, history = run_finetuning(
            finetuner,
            train,
            validation,
            checkpoints,
            eval_batch_size=eval_batch_size,
            on_epoch_end=log_epoch,
        )
    checkpoints.close()
    save_tree(output_dir / "model", nnx.state(finetuner.model(state)))
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
    return summary
