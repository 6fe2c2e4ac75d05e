"""Orbax checkpoints: the latest step for exact resume, and the best N by a validation metric.

A single ``max_to_keep`` with ``best_fn`` deletes the latest checkpoint whenever it is not
among the best (orbax issue 526), which makes resuming after a crash restart from an older
epoch. A preservation policy that keeps "latest 1 OR best N" avoids that trap.

Checkpoints are resumed only by the run that wrote them: a folder carries the fingerprint
of its run (the caller's digest of config, inputs and code, see :func:`tree_digest`), and
a run with another fingerprint starts afresh instead of continuing someone else's training.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tlflax.distributed import is_writer, wait_for_all
from tlflax.errors import InputError, MissingInputError

PyTree = Any
# The metrics checkpoints can be ranked by, and whether higher values are better.
HIGHER_IS_BETTER = {"validation_loss": False, "validation_accuracy": True}
# Beside the step folders; Orbax ignores files that are not steps.
FINGERPRINT_FILE = "run_fingerprint.txt"
# Orbax writes this file last into a single-tree checkpoint folder.
_TREE_METADATA = "_METADATA"


def score(metrics: dict[str, float], monitor: str = "validation_loss") -> float:
    """``metrics[monitor]`` as a score where higher is better (a loss is negated)."""
    value = float(metrics[monitor])
    return value if HIGHER_IS_BETTER[monitor] else -value


def tree_digest(*trees: PyTree) -> str:
    """SHA-256 of the structure, dtypes, shapes and values of ``trees`` (any pytrees of arrays)."""
    digest = hashlib.sha256()
    for tree in trees:
        leaves, structure = jax.tree_util.tree_flatten(tree)
        digest.update(str(structure).encode())
        for leaf in leaves:
            if hasattr(leaf, "hash_into"):
                # A column read on demand (tlflax.data.streaming): hashed a chunk at a time.
                leaf.hash_into(digest)
                continue
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)  # dropout RNG state: keys have no array form
            array = np.asarray(leaf)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class TrainingCheckpoints:
    """Checkpoints of one training run under ``directory`` (one sub-folder per epoch).

    Args:
      directory: where the step folders live (created if missing).
      keep_best: how many of the best epochs (by ``monitor``) to keep besides the latest.
      fingerprint: identifies the run; checkpoints written under another fingerprint (or
        none) are deleted first, and :attr:`discarded` says whether there were any.
      monitor: the metric (one of :data:`HIGHER_IS_BETTER`) that ranks the epochs.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_best: int,
        fingerprint: str | None = None,
        monitor: str = "validation_loss",
    ):
        if monitor not in HIGHER_IS_BETTER:
            raise ValueError(f"monitor must be one of {sorted(HIGHER_IS_BETTER)}, got {monitor!r}")
        self.directory = Path(directory).absolute()
        self.discarded = False
        self.monitor = monitor
        # Stable for equal scores (Orbax sorts), so ties rank as run_finetuning ranks them.
        rank = functools.partial(score, monitor=monitor)
        if fingerprint is not None:
            if is_writer():
                self._claim(fingerprint)
            wait_for_all(f"tlflax claim {self.directory}")
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(n=1), policies.BestN(get_metric_fn=rank, n=keep_best)]
            ),
            # Without best_fn Orbax neither writes the metrics nor reads them back, and after
            # a restart BestN could not rank the epochs run before it.
            best_fn=rank,
            create=True,
            # What a killed save left half-written is deleted, never restored.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _claim(self, fingerprint: str) -> None:
        marker = self.directory / FINGERPRINT_FILE
        if self.directory.exists() and (
            not marker.is_file() or marker.read_text().strip() != fingerprint
        ):
            self.discarded = any(self.directory.iterdir())
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            temporary = marker.with_name(f".{marker.name}.tmp")
            temporary.write_text(fingerprint + "\n")
            temporary.replace(marker)

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
        """The kept step with the best ``monitor`` score; the earliest of equal ones."""
        scored = [
            (step, metrics)
            for step in sorted(self.manager.all_steps())
            if (metrics := self.manager.metrics(step)) and self.monitor in metrics
        ]
        if not scored:
            return None
        return max(scored, key=lambda item: score(item[1], self.monitor))[0]

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

    def delete(self) -> None:
        """Delete the folder (after :meth:`close`): :func:`delete_checkpoints`."""
        delete_checkpoints(self.directory)


def delete_checkpoints(directory: str | Path) -> None:
    """Delete a checkpoint folder, its fingerprint first: a deletion cut short leaves steps
    that no run will resume from, never a half-deleted one to resume."""
    (Path(directory) / FINGERPRINT_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def save_tree(path: str | Path, tree: PyTree) -> None:
    """Save one pytree synchronously; Orbax writes to a temporary folder, then renames.

    Where several processes train together (:mod:`tlflax.distributed`), the writing process
    alone calls this: the tree's replicated arrays are saved from its own copy.
    """
    options = {}
    if jax.process_count() > 1:
        tree = jax.tree_util.tree_map(np.asarray, tree)
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}
        )
    checkpointer = ocp.StandardCheckpointer(**options)
    checkpointer.save(Path(path).absolute(), tree, force=True)
    checkpointer.wait_until_finished()


class CheckpointError(InputError):
    """A checkpoint that cannot be restored into the model asked for; names its folder."""


def restore_tree(path: str | Path, abstract_tree: PyTree) -> PyTree:
    """Restore a pytree saved by :func:`save_tree` into ``abstract_tree``'s structure.

    Raises:
      MissingInputError: naming ``path`` when it does not exist.
      CheckpointError: naming ``path`` when it is damaged, or was written for another
        structure (another backbone, head or number of classes).
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"checkpoint not found: {path}")
    if not (path / _TREE_METADATA).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (it has no {_TREE_METADATA})")
    try:
        return ocp.StandardCheckpointer().restore(path.absolute(), abstract_tree)
    except ValueError as error:
        # Orbax's own messages run to many lines of TensorStore specs: keep the first.
        lines = str(error).strip().splitlines() or [repr(error)]
        detail = lines[0].split(". Truncating/padding")[0][:300]
        if "not compatible with the stored shape" in detail or "structure" in detail:
            problem = (
                "checkpoint does not fit the model built from params (was it written for "
                f"another backbone, head or number of classes?): {detail}"
            )
        else:
            problem = f"checkpoint is damaged or incomplete: {detail}"
        raise CheckpointError(f"{path}: {problem}") from None
