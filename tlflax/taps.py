"""Features from several depths of a frozen backbone: which depths, and how they are joined.

The pooled output of the last layer group is the weakest place to read some tasks from: on
a task far from the pretraining data the top groups are the most specialised to the
original labels (Yosinski et al. 2014), and a linear head on features from several depths
matches or beats fine-tuning there (Head2Toe, Evci et al. 2022). A *tap* is the pooled
output after ``g`` layer groups (``g`` counts from 1, like the advisor's depth probes); a
head reads the taps' outputs side by side.

Each tap is normalised per example to the same length before the concatenation: depths
differ in width and in activation scale by orders of magnitude, and without it the widest or
loudest depth would dominate any penalised head. The joined vector is then scaled to unit
mean square, the scale a head's initialisation and learning rate expect. The normalisation
has no parameters, so the same function serves feature extraction, training and inference.

:func:`select_taps` picks the depths: greedy forward selection by the exact leave-one-out
accuracy of a ridge classifier on the training examples, so validation stays untouched for
scoring the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from tlflax.probes import ridge_probe, unpack_correct
from tlflax.ridge import RELATIVE_PENALTIES

# Every depth's pooled output after normalisation has unit mean square; the epsilon only
# guards an all-zero vector (e.g. a ReLU depth that is silent for one example).
_EPSILON = 1e-12


def rms_normalize(features: jax.Array) -> jax.Array:
    """Each row scaled to unit mean square (no centring, no parameters)."""
    mean_square = jnp.mean(jnp.square(features.astype(jnp.float32)), axis=-1, keepdims=True)
    return (features * jax.lax.rsqrt(mean_square + _EPSILON)).astype(features.dtype)


def join_taps(pooled: Sequence[jax.Array]) -> jax.Array:
    """The head's input: the taps' pooled outputs, each scaled to equal length, side by side.

    Args:
      pooled: the pooled output (B, D_t) after each tap, in increasing depth.

    Returns:
      (B, sum of the widths), unit mean square per row.
    """
    total_width = sum(features.shape[-1] for features in pooled)
    # rms_normalize gives a row of length sqrt(width); rescaled, every tap has length
    # sqrt(total_width / taps), and the whole row unit mean square.
    return jnp.concatenate(
        [
            rms_normalize(features) * np.sqrt(total_width / (len(pooled) * features.shape[-1]))
            for features in pooled
        ],
        axis=-1,
    )


def tap_widths(pooled_after_each_group: Sequence[jax.ShapeDtypeStruct | jax.Array]) -> list[int]:
    """The width of every depth's pooled output (from one example, or its shapes)."""
    return [int(features.shape[-1]) for features in pooled_after_each_group]


def _rms_normalize_numpy(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float64)
    return features / np.sqrt(np.mean(np.square(features), axis=1, keepdims=True) + _EPSILON)


def _leave_one_out_accuracy(gram: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Best exact leave-one-out accuracy of kernel ridge onto one-hot labels over the
    penalties of :data:`tlflax.ridge.RELATIVE_PENALTIES` (one eigendecomposition)."""
    eigenvalues, vectors = np.linalg.eigh(gram)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    targets = np.eye(num_classes)[labels]
    projected = vectors.T @ targets
    scale = float(np.mean(eigenvalues)) or 1.0
    best = 0.0
    for relative in RELATIVE_PENALTIES:
        shrink = eigenvalues / (eigenvalues + relative * scale)
        fitted = vectors @ (shrink[:, None] * projected)
        leverage = np.einsum("ij,j,ij->i", vectors, shrink, vectors)[:, None]
        left_out = (fitted - leverage * targets) / (1.0 - leverage)
        best = max(best, float(np.mean(left_out.argmax(axis=1) == labels)))
    return best


@dataclass(frozen=True)
class TapSelection:
    """The chosen depths and the leave-one-out accuracy after each greedy step."""

    taps: tuple[int, ...]
    # (depth added, leave-one-out accuracy of the taps so far) for every step taken.
    steps: tuple[tuple[int, float], ...]


def select_taps(
    train_by_depth: Sequence[np.ndarray],
    train_labels: np.ndarray,
    *,
    num_classes: int,
    max_taps: int,
    min_gain: float,
) -> TapSelection:
    """Greedy forward selection of depths by leave-one-out ridge accuracy on train.

    Starts from the best single depth and adds, one at a time, the depth that raises the
    leave-one-out accuracy of the joined taps most; stops when no depth raises it by at
    least ``min_gain`` or ``max_taps`` are chosen. Works in the dual (an N x N Gram matrix
    per depth, summed), so a step costs one eigendecomposition per candidate, whatever the
    feature widths.
    """
    grams = []
    for features in train_by_depth:
        normalized = _rms_normalize_numpy(features)
        # Each depth's Gram matrix over its width: every depth weighs the same in the sum.
        grams.append(normalized @ normalized.T / normalized.shape[1])
    bias = np.ones_like(grams[0])
    chosen: list[int] = []
    steps: list[tuple[int, float]] = []
    current_gram, current_accuracy = bias, -1.0
    while len(chosen) < max_taps:
        candidates = [depth for depth in range(len(grams)) if depth not in chosen]
        if not candidates:
            break
        scored = [
            (
                _leave_one_out_accuracy(current_gram + grams[depth], train_labels, num_classes),
                -depth,  # ties go to the shallower depth: a lower cut, a cheaper network
            )
            for depth in candidates
        ]
        accuracy, negative_depth = max(scored)
        if chosen and accuracy < current_accuracy + min_gain:
            break
        depth = -negative_depth
        chosen.append(depth)
        current_gram = current_gram + grams[depth]
        current_accuracy = accuracy
        steps.append((depth + 1, accuracy))
    return TapSelection(taps=tuple(sorted(d + 1 for d in chosen)), steps=tuple(steps))


def joined_numpy(pooled_by_depth: Sequence[np.ndarray], taps: Sequence[int]) -> np.ndarray:
    """:func:`join_taps` of stored per-depth features (float32), for probes and extraction."""
    chosen = [jnp.asarray(pooled_by_depth[tap - 1]) for tap in taps]
    return np.asarray(join_taps(chosen), dtype=np.float32)


@dataclass(frozen=True)
class TapsProbe:
    """The chosen taps, how they were chosen, and their joined probe's validation score."""

    taps: tuple[int, ...]
    steps: tuple[tuple[int, float], ...]
    validation_accuracy: float
    leave_one_out_accuracy: float
    # Which validation examples the joined probe gets right (tlflax.probes.pack_correct):
    # what a paired test against another backbone's taps is computed from. Empty in advice
    # written before it was kept.
    validation_correct: str = ""
    validation_examples: int = 0

    def correct(self) -> np.ndarray:
        """Whether the joined probe gets each validation example right (bool, split order)."""
        return unpack_correct(self.validation_correct, self.validation_examples)


def probe_taps(
    train_by_depth: Sequence[np.ndarray],
    train_labels: np.ndarray,
    validation_by_depth: Sequence[np.ndarray],
    validation_labels: np.ndarray,
    *,
    num_classes: int,
    max_taps: int,
    min_gain: float,
) -> TapsProbe:
    """:func:`select_taps` on train, then the ridge probe of the joined taps, scored on
    validation (the same probe as every single depth's, so the two compare directly)."""
    selection = select_taps(
        train_by_depth,
        train_labels,
        num_classes=num_classes,
        max_taps=max_taps,
        min_gain=min_gain,
    )
    result = ridge_probe(
        joined_numpy(train_by_depth, selection.taps),
        train_labels,
        joined_numpy(validation_by_depth, selection.taps),
        validation_labels,
        num_classes,
    )
    return TapsProbe(
        selection.taps,
        selection.steps,
        result.validation_accuracy,
        result.leave_one_out_accuracy,
        result.validation_correct,
        result.validation_examples,
    )
