"""Linear probes of a frozen backbone at every depth: how task-relevant each layer group is.

The backbone runs once, group by group (``run_groups``, the machinery the prefix cache cuts
at), and the pooled output after every group is kept; each depth then gets a closed-form
ridge-regression probe onto one-hot labels, its penalty chosen by exact leave-one-out on the
training examples, so the validation split is only used to score. :mod:`tlflax.advisor`
turns the probes into a recommendation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlflax.data.pipeline import map_batches

# batch -> pooled activations (B, D_g) after each layer group g, in forward order.
PooledAfterEachGroup = Callable[[nnx.Module, dict[str, jax.Array]], list[jax.Array]]

# Ridge penalties tried by the probe, relative to the mean squared singular value of the
# features: from nearly unregularised to strongly shrunk.
RELATIVE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def features_by_depth(
    backbone: nnx.Module,
    pooled_after_each_group: PooledAfterEachGroup,
    splits: Mapping[str, dict[str, np.ndarray]],
    *,
    batch_size: int,
) -> dict[str, list[np.ndarray]]:
    """Pooled features after every layer group, for each split, in one pass per batch.

    Args:
      backbone: the backbone, in inference mode.
      pooled_after_each_group: (backbone, batch) -> one pooled array per group, e.g.
        :func:`tlflax.vision.pooled_after_each_group` after image preparation.
      splits: split name -> model inputs (one row per example).
      batch_size: examples per call; every split reuses one compilation.

    Returns:
      split name -> one float32 array (N, D_g) per layer group, in forward order.
    """
    graphdef, state = nnx.split(backbone)

    def all_depths(state: nnx.State, batch: dict[str, jax.Array]) -> list[jax.Array]:
        return pooled_after_each_group(nnx.merge(graphdef, state), batch)

    # One output array per batch (map_batches' contract); split back by width afterwards.
    step = jax.jit(lambda state, batch: jnp.concatenate(all_depths(state, batch), axis=1))
    first = next(iter(splits.values()))
    one_example = {key: value[:1] for key, value in first.items()}
    widths = [leaf.shape[-1] for leaf in jax.eval_shape(all_depths, state, one_example)]
    boundaries = np.cumsum(widths)[:-1]
    return {
        name: np.split(
            map_batches(
                functools.partial(step, state),
                arrays,
                batch_size=batch_size,
                description=f"probe {name}",
            ).astype(np.float32),
            boundaries,
            axis=1,
        )
        for name, arrays in splits.items()
    }


@dataclass(frozen=True)
class ProbeResult:
    """A linear probe of one depth: its validation accuracy, and what chose its penalty."""

    validation_accuracy: float
    leave_one_out_accuracy: float
    relative_penalty: float


def ridge_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    validation_features: np.ndarray,
    validation_labels: np.ndarray,
    num_classes: int,
) -> ProbeResult:
    """Ridge regression onto one-hot labels (a least-squares linear classifier).

    The penalty is the one of :data:`RELATIVE_PENALTIES` with the best exact leave-one-out
    accuracy on the training examples (from one SVD; ties go to the stronger penalty), so
    validation only scores. Features are not centred - a centring mean would leak each
    left-out example into the others - but scaled to unit mean square, with a bias column.
    """
    scale = math.sqrt(float(np.mean(np.square(train_features, dtype=np.float64)))) or 1.0

    def design(features: np.ndarray) -> np.ndarray:
        scaled = features.astype(np.float64) / scale
        return np.concatenate([scaled, np.ones((len(features), 1))], axis=1)

    train, validation = design(train_features), design(validation_features)
    targets = np.eye(num_classes)[train_labels]
    left, singular, right_t = np.linalg.svd(train, full_matrices=False)
    projected = left.T @ targets
    best: tuple[float, float] | None = None
    for relative in RELATIVE_PENALTIES:
        penalty = relative * float(np.mean(singular**2))
        shrink = singular**2 / (singular**2 + penalty)
        fitted = left @ (shrink[:, None] * projected)
        leverage = np.einsum("ij,j,ij->i", left, shrink, left)[:, None]
        # Leave-one-out prediction of a linear smoother: (fit - h*y) / (1 - h), exactly.
        left_out = (fitted - leverage * targets) / (1.0 - leverage)
        accuracy = float(np.mean(left_out.argmax(axis=1) == train_labels))
        if best is None or accuracy >= best[0]:
            best = (accuracy, relative)
    loo_accuracy, relative = best
    penalty = relative * float(np.mean(singular**2))
    weights = right_t.T @ ((singular / (singular**2 + penalty))[:, None] * projected)
    predictions = (validation @ weights).argmax(axis=1)
    return ProbeResult(
        validation_accuracy=float(np.mean(predictions == validation_labels)),
        leave_one_out_accuracy=loo_accuracy,
        relative_penalty=relative,
    )


@dataclass(frozen=True)
class DepthProbe:
    """The probe of the pooled output after ``groups`` layer groups (the last one named)."""

    groups: int
    group_name: str
    feature_dim: int
    validation_accuracy: float
    leave_one_out_accuracy: float
    relative_penalty: float


def group_name(pattern: str) -> str:
    """A layer group's readable name from its regex: '^blocks/3/' -> 'blocks/3'."""
    return pattern.removeprefix("^").removesuffix("/")


def probe_depths(
    train_by_depth: Sequence[np.ndarray],
    train_labels: np.ndarray,
    validation_by_depth: Sequence[np.ndarray],
    validation_labels: np.ndarray,
    *,
    num_classes: int,
    group_patterns: Sequence[str],
) -> tuple[DepthProbe, ...]:
    """A :func:`ridge_probe` per depth; the arrays are those of :func:`features_by_depth`."""
    if not len(train_by_depth) == len(validation_by_depth) == len(group_patterns):
        raise ValueError(
            f"{len(train_by_depth)} train and {len(validation_by_depth)} validation depths "
            f"for {len(group_patterns)} layer groups"
        )
    probes = []
    for depth, (train, validation, pattern) in enumerate(
        zip(train_by_depth, validation_by_depth, group_patterns, strict=True), start=1
    ):
        result = ridge_probe(train, train_labels, validation, validation_labels, num_classes)
        probes.append(DepthProbe(depth, group_name(pattern), train.shape[1], **asdict(result)))
    return tuple(probes)
