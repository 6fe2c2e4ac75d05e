"""Imbalanced training data: measure it, decide the remedy, weigh the classes.

Every trained model - the head on cached features, the fine-tuned network, the one from
scratch - meets imbalance the same way, decided once from the training split's class counts
by :func:`resolve_class_balance` (params ``class_balance``):

- ``none``: plain training, exactly as without this module;
- ``weights``: each example's loss weighted by its class's weight (:func:`class_weights`);
- ``sampler``: each epoch drawn class-balanced (:func:`tlflax.data.pipeline.balanced_order`);
- ``logit_adjustment``: the training loss on ``logits + tau * log(prior)``, the prior being
  the training split's class frequencies (Menon et al., 2021, :func:`logit_offsets`). The
  softmax then only has to explain what the prior does not, so the learnt logits estimate
  the balanced (uniform-prior) posterior: its argmax is the Bayes-optimal rule for the
  balanced error, with no per-class reweighting of the gradients (which on a few examples
  per class amplifies their noise) nor repeated examples. Predictions - validation, test,
  calibration, export - use the plain logits;
- ``auto``: ``none`` while the largest / smallest class count is within the validate
  stage's ``max_class_ratio`` (the imbalance the data gate accepts as it is),
  ``logit_adjustment`` above it: on the long-tail job it was the best remedy on validation
  and on test, every seed (README, "Imbalanced data"). Validation and test are never
  re-weighted or re-sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from tlflax.config import ClassBalanceParams, Params
from tlflax.data.errors import DataError

Remedy = Literal["none", "weights", "sampler", "logit_adjustment"]
REMEDY_KEY = "class_balance.remedy"


class ClassBalance(BaseModel):
    """The remedy a run trains with, and why (part of the plan: ``plan.json``)."""

    model_config = ConfigDict(frozen=True)

    requested: Literal["auto", "none", "weights", "sampler", "logit_adjustment"]
    remedy: Remedy
    reason: str
    # Training examples per class, in label order (empty: not measured).
    class_counts: list[int]
    # The loss weight of each class (remedy ``weights`` only; empty otherwise).
    class_weights: list[float] = []
    # What the training loss adds to each class's logit, tau * log(prior) (remedy
    # ``logit_adjustment`` only; empty otherwise).
    logit_offsets: list[float] = []

    def describe(self) -> str:
        """One line: the remedy and why, e.g. for the printed plan."""
        return f"{self.remedy} ({self.reason})"

    def loss_weights(self) -> np.ndarray | None:
        """The class weights the loss multiplies by; None trains unweighted."""
        if not self.class_weights:
            return None
        return np.asarray(self.class_weights, dtype=np.float32)

    def loss_logit_offsets(self) -> np.ndarray | None:
        """The per-class offsets the training loss adds to the logits; None adds nothing."""
        if not self.logit_offsets:
            return None
        return np.asarray(self.logit_offsets, dtype=np.float32)

    @property
    def balanced_sampling(self) -> bool:
        return self.remedy == "sampler"


NO_REMEDY = ClassBalance(requested="none", remedy="none", reason="not requested", class_counts=[])


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Examples per class, in label order (int64, length ``num_classes``)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Largest / smallest class count (inf when a class has none)."""
    counts = np.asarray(counts)
    return float("inf") if counts.min() == 0 else float(counts.max() / counts.min())


def class_weights(counts: Sequence[int], beta: float = 1.0) -> np.ndarray:
    """Per-class loss weights, scaled so the mean weight over the training examples is 1.

    ``beta`` 1: inverse class frequency (every class carries the same total weight). Below 1:
    the inverse of the effective number of examples, ``(1 - beta**n) / (1 - beta)`` (Cui et
    al., 2019), which discounts the repeats of a large class less than linearly; near 0 the
    weights become equal.

    Example:
        >>> class_weights([30, 10]).tolist()
        [0.6666666666666666, 2.0]
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.min() <= 0:
        raise ValueError(f"every class needs training examples to be weighted, got {counts}")
    raw = 1.0 / counts if beta == 1.0 else (1.0 - beta) / (1.0 - np.power(beta, counts))
    return raw * counts.sum() / np.dot(raw, counts)


def logit_offsets(counts: Sequence[int], tau: float = 1.0) -> np.ndarray:
    """Per-class logit offsets of the logit-adjusted loss: ``tau * log(counts / total)``.

    Added to the logits in training only, they ask a rare class's examples for a larger
    margin over a frequent class, ``tau * log(prior_frequent / prior_rare)``, than the other
    way round (Menon et al., 2021, eq. 10); ``tau`` 1 is consistent for the balanced error.

    Example:
        >>> logit_offsets([30, 10]).round(4).tolist()
        [-0.2877, -1.3863]
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.min() <= 0:
        raise ValueError(f"every class needs training examples for a prior, got {counts}")
    return tau * np.log(counts / counts.sum())


def resolve_class_balance(
    params: ClassBalanceParams,
    counts: Sequence[int],
    *,
    max_class_ratio: float,
    class_names: Sequence[str] | None = None,
) -> ClassBalance:
    """The remedy for a training split with ``counts`` examples per class.

    Args:
      params: the ``class_balance`` section.
      counts: training examples per class, in label order.
      max_class_ratio: ``validate.max_class_ratio``: above it, ``auto`` adjusts the logits.
      class_names: to name an empty class in the error.

    Raises:
      DataError: a class without training examples (no remedy can make up for it).
    """
    counts = [int(count) for count in counts]
    empty = [index for index, count in enumerate(counts) if count == 0]
    if empty:
        name = class_names[empty[0]] if class_names is not None else f"class {empty[0]}"
        raise DataError(
            f"train class '{name}'",
            "has no training examples",
            "give it examples, or raise prepare.train_per_class / prepare.train_fraction",
        )
    ratio = imbalance_ratio(counts)
    measured = f"largest/smallest {ratio:.2f}"
    if params.remedy == "auto":
        within = ratio <= max_class_ratio
        remedy: Remedy = "none" if within else "logit_adjustment"
        sign = "<=" if within else ">"
        reason = f"auto: {measured} {sign} validate.max_class_ratio {max_class_ratio:g}"
    else:
        remedy, reason = params.remedy, f"{REMEDY_KEY}: {params.remedy}; {measured}"
    weights = []
    if remedy == "weights":
        weights = class_weights(counts, params.beta).tolist()
        kind = (
            "inverse frequency" if params.beta == 1.0 else f"effective number, beta {params.beta:g}"
        )
        reason += f"; {kind}"
    offsets = []
    if remedy == "logit_adjustment":
        offsets = logit_offsets(counts, params.tau).tolist()
        reason += f"; tau {params.tau:g}"
    return ClassBalance(
        requested=params.remedy,
        remedy=remedy,
        reason=reason,
        class_counts=counts,
        class_weights=weights,
        logit_offsets=offsets,
    )


def training_class_balance(
    params: Params, train_labels: np.ndarray, class_names: Sequence[str]
) -> ClassBalance:
    """The run's remedy: ``params.class_balance`` for the training split's ``train_labels``,
    ``auto`` judged against ``validate.max_class_ratio``."""
    return resolve_class_balance(
        params.class_balance,
        class_counts(train_labels, len(class_names)),
        max_class_ratio=params.validate_params.max_class_ratio,
        class_names=class_names,
    )
