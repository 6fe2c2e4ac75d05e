"""Orbax checkpoints: the latest step for exact resume, and the best N by validation loss.

A single ``max_to_keep`` with ``best_fn`` deletes the latest checkpoint whenever it is not
among the best (orbax issue 526), which makes resuming after a crash restart from an older
epoch. A preservation policy that keeps "latest 1 OR best N" avoids that trap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

PyTree = Any
METRIC = "validation_loss"


def _score(metrics: dict[str, float]) -> float:
    # BestN keeps the highest scores; a lower validation loss is better.
    return -float(metrics[METRIC])


class TrainingCheckpoints:
    """Checkpoints of one training run under ``directory`` (one sub-folder per epoch)."""

    def __init__(self, directory: str | Path, *, keep_best: int):
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(n=1), policies.BestN(get_metric_fn=_score, n=keep_best)]
            ),
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: dict[str, PyTree], progress: dict, metrics: dict) -> None:
        """Save ``state`` (pytrees) and ``progress`` (JSON) asynchronously.

        An error of the previous asynchronous save is raised here rather than lost.
        """
        self.manager.check_for_errors()
        items = {name: ocp.args.StandardSave(tree) for name, tree in state.items()}
        items["progress"] = ocp.args.JsonSave(progress)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        scored = [
            (step, metrics)
            for step in self.manager.all_steps()
            if (metrics := self.manager.metrics(step)) and METRIC in metrics
        ]
        if not scored:
            return None
        return max(scored, key=lambda item: _score(item[1]))[0]

    def restore(self, step: int, abstract_state: dict[str, PyTree]) -> tuple[dict, dict]:
        """Restore ``step`` into the structure of ``abstract_state``; returns (state, progress)."""
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_state.items()}
        items["progress"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        progress = restored["progress"]
        return {name: restored[name] for name in abstract_state}, progress

    def close(self) -> None:
        """Wait for pending saves (raising their errors) and release the manager."""
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
        self.manager.close()


def save_tree(path: str | Path, tree: PyTree) -> None:
    """Save one pytree synchronously; Orbax writes to a temporary folder, then renames."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), tree, force=True)
    checkpointer.wait_until_finished()


def restore_tree(path: str | Path, abstract_tree: PyTree) -> PyTree:
    """Restore a pytree saved by :func:`save_tree` into ``abstract_tree``'s structure."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return ocp.StandardCheckpointer().restore(path, abstract_tree)
