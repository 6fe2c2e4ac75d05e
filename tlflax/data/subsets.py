"""Reproducible, class-stratified subsets of a labelled dataset.

Randomness comes only from ``np.random.Generator(np.random.PCG64(seed))`` — never from
global state or ``hash()`` (which is salted per process) — and classes are visited in
sorted order, so the same seed selects the same examples on every machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tlflax.data.errors import DataError


def stratified_subset(
    labels: np.ndarray,
    *,
    per_class: int | Mapping[int, int] | None = None,
    fraction: float | None = None,
    seed: int,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Pick the same number (or the same fraction) of examples from every class.

    Give exactly one of ``per_class`` and ``fraction``.

    Args:
        labels: integer class label per example, shape (N,).
        per_class: how many examples to take from each class, or a count per class label
            (:func:`long_tail_sizes`).
        fraction: share of each class's available examples to take (rounded per class).
        seed: selects the examples; same seed, same subset.
        exclude: indices into ``labels`` that must not be picked (e.g. a validation set).

    Returns:
        The chosen indices into ``labels``, sorted ascending (int64).

    Raises:
        DataError: naming the class that has fewer available examples than asked, or
            the argument that is invalid.

    Example:
        >>> stratified_subset(np.array([0, 0, 1, 1, 1]), per_class=1, seed=0)
        array([1, 3])
    """
    _check_subset_size(per_class, fraction)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError("labels", f"must be one-dimensional, got shape {labels.shape}")
    available = _available_mask(len(labels), exclude)

    generator = np.random.Generator(np.random.PCG64(seed))
    chosen: list[np.ndarray] = []
    for class_label in np.unique(labels):
        candidates = np.flatnonzero((labels == class_label) & available)
        if isinstance(per_class, Mapping):
            wanted = per_class[int(class_label)]
        else:
            wanted = per_class if per_class is not None else round(fraction * len(candidates))
        if wanted > len(candidates):
            excluded_note = " after exclusions" if exclude is not None else ""
            raise DataError(
                f"class {class_label}",
                f"has {len(candidates)} examples{excluded_note}, {wanted} requested",
            )
        chosen.append(generator.choice(candidates, size=wanted, replace=False))
    if not chosen:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def at_most(labels: np.ndarray, max_examples: int, *, seed: int) -> np.ndarray:
    """Every index of ``labels``, or, when there are more than ``max_examples``, a stratified
    subset of about that many (the same fraction of each class), sorted."""
    if len(labels) <= max_examples:
        return np.arange(len(labels))
    return stratified_subset(labels, fraction=max_examples / len(labels), seed=seed)


def take(records: np.ndarray | Sequence, indices: np.ndarray) -> np.ndarray | list:
    """``records[indices]``: an array indexed, any other sequence (texts) as a list."""
    return records[indices] if isinstance(records, np.ndarray) else [records[i] for i in indices]


def _check_subset_size(per_class: int | None, fraction: float | None) -> None:
    """Refuse all but exactly one of ``per_class`` (>= 0) and ``fraction`` (in [0, 1])."""
    if (per_class is None) == (fraction is None):
        raise DataError("per_class/fraction", "give exactly one of per_class and fraction")
    sizes = per_class.values() if isinstance(per_class, Mapping) else [per_class]
    if per_class is not None and min(sizes, default=0) < 0:
        raise DataError("per_class", f"must be >= 0, got {per_class}")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise DataError("fraction", f"must be in [0, 1], got {fraction}")


def require_every_class(
    train_labels: np.ndarray, class_names: Sequence[str], *, size_keys: str
) -> None:
    """Refuse a training subset without an example of some class: nothing could learn it.

    Raises:
        DataError: naming the first empty class and ``size_keys``, the params that drew it.
    """
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=len(class_names))
    if counts.min() == 0:
        raise DataError(
            f"train class '{class_names[int(np.argmin(counts))]}'",
            "has no training examples after the subset draw",
            f"raise {size_keys}, or give the class examples in the source",
        )


def long_tail_sizes(num_classes: int, largest: int, ratio: float) -> dict[int, int]:
    """Per-class sizes falling geometrically over the labels: ``largest`` for label 0 down
    to ``largest / ratio`` for the last, rounded (CIFAR-10-LT's profile, Cui et al. 2019).

    Example:
        >>> long_tail_sizes(3, 100, 4.0)
        {0: 100, 1: 50, 2: 25}
    """
    if num_classes == 1:
        return {0: largest}
    return {
        label: round(largest * ratio ** (-label / (num_classes - 1)))
        for label in range(num_classes)
    }


def _available_mask(count: int, exclude: np.ndarray | None) -> np.ndarray:
    """True for each of ``count`` examples that ``exclude`` (indices, checked) leaves free."""
    available = np.ones(count, dtype=bool)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.size and (exclude.min() < 0 or exclude.max() >= count):
            raise DataError("exclude", f"indices must lie in [0, {count})")
        available[exclude] = False
    return available


def split_train_validation(
    labels: np.ndarray,
    *,
    train_per_class: int | None,
    validation_per_class: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw disjoint, class-balanced training and validation subsets.

    The validation set is drawn first and depends only on ``(labels, validation_per_class,
    seed)``, so runs that vary the training-set size are compared on the same
    validation examples.

    Args:
        labels: integer class label per example, shape (N,).
        train_per_class: training examples per class; ``None`` takes every example not
            in the validation set.
        validation_per_class: validation examples per class.
        seed: selects both subsets.

    Returns:
        ``(train_indices, validation_indices)``, each sorted, with no index in both.

    Raises:
        DataError: naming a class too small for the requested sizes.
    """
    validation = stratified_subset(labels, per_class=validation_per_class, seed=seed)
    if train_per_class is None:
        train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), validation)
    else:
        train = stratified_subset(labels, per_class=train_per_class, seed=seed, exclude=validation)
    return train, validation
