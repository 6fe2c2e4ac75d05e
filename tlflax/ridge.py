"""Ridge regression onto one-hot labels: the advisor's probe, and a head fitted in closed form.

On a few dozen examples per class and thousands of pooled features, a least-squares linear
classifier whose penalty is chosen by exact leave-one-out on the training examples is both
the cheapest head and a hard one to beat: nothing is left to a learning rate, an epoch count
or a validation split. The advisor scores every depth with it (:mod:`tlflax.probes`), and
``train_head.head: ridge`` makes it the head the pipeline trains
(:func:`tlflax.train.fit_ridge_head`), so what the advice measured is what the head gets.

Features are not centred - a centring mean would leak each left-out example into the
others - but scaled to unit mean square, with a bias column (penalised like the rest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

# Ridge penalties tried, relative to the mean squared singular value of the features: from
# nearly unregularised to strongly shrunk.
RELATIVE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass(frozen=True)
class RidgeFit:
    """A fitted ridge classifier: ``features @ weights + bias`` scores each class."""

    weights: np.ndarray  # (D, C), in the units of the features given
    bias: np.ndarray  # (C,)
    relative_penalty: float
    # Accuracy of the leave-one-out predictions (weighted by the sample weights, if any).
    leave_one_out_accuracy: float
    # (N, C): each training example scored by the fit on all the others, exactly.
    leave_one_out_scores: np.ndarray

    def scores(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float64) @ self.weights + self.bias


def fit_ridge(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    sample_weights: np.ndarray | None = None,
) -> RidgeFit:
    """Ridge regression of one-hot ``labels`` on ``features``, penalty chosen by leave-one-out.

    The penalty is the one of :data:`RELATIVE_PENALTIES` with the best exact leave-one-out
    accuracy on the training examples (from one SVD; ties go to the stronger penalty).
    ``sample_weights`` (one per example) make it weighted least squares, and weight the
    leave-one-out accuracy the same way: e.g. inverse class frequencies for a class-balanced
    fit. None weighs every example 1, the arithmetic of an unweighted fit exactly.
    """
    scale = math.sqrt(float(np.mean(np.square(features, dtype=np.float64)))) or 1.0
    design = np.concatenate(
        [features.astype(np.float64) / scale, np.ones((len(features), 1))], axis=1
    )
    targets = np.eye(num_classes)[labels]
    # Weighted least squares is plain least squares on rows scaled by sqrt(weight); removing
    # a row of the scaled problem removes that example, so leave-one-out carries over.
    root = None if sample_weights is None else np.sqrt(np.asarray(sample_weights, np.float64))
    if root is not None:
        design, targets = design * root[:, None], targets * root[:, None]
    left, singular, right_t = np.linalg.svd(design, full_matrices=False)
    projected = left.T @ targets
    best: tuple[float, float, np.ndarray] | None = None
    for relative in RELATIVE_PENALTIES:
        penalty = relative * float(np.mean(singular**2))
        shrink = singular**2 / (singular**2 + penalty)
        fitted = left @ (shrink[:, None] * projected)
        leverage = np.einsum("ij,j,ij->i", left, shrink, left)[:, None]
        # Leave-one-out prediction of a linear smoother: (fit - h*y) / (1 - h), exactly.
        left_out = (fitted - leverage * targets) / (1.0 - leverage)
        if root is not None:
            left_out = left_out / root[:, None]
        correct = left_out.argmax(axis=1) == labels
        accuracy = float(np.mean(correct) if root is None else np.average(correct, weights=root**2))
        if best is None or accuracy >= best[0]:
            best = (accuracy, relative, left_out)
    loo_accuracy, relative, left_out = best
    penalty = relative * float(np.mean(singular**2))
    solution = right_t.T @ ((singular / (singular**2 + penalty))[:, None] * projected)
    return RidgeFit(
        weights=solution[:-1] / scale,
        bias=solution[-1],
        relative_penalty=relative,
        leave_one_out_accuracy=loo_accuracy,
        leave_one_out_scores=left_out,
    )


def mean_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray | None = None
) -> float:
    """Mean softmax cross-entropy of ``logits`` (N, C) (weighted by ``sample_weights``)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    losses = -log_probabilities[np.arange(len(labels)), labels]
    return float(np.average(losses, weights=sample_weights))


def fit_temperature(
    scores: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray | None = None
) -> float:
    """The factor that turns ridge scores into logits: the one minimising the cross-entropy
    of ``factor * scores`` (convex in the factor), searched over 1e-2 to 1e4.

    Ridge scores regress one-hot targets, so they live on a 0-1 scale; as logits they would
    predict nearly uniform probabilities, however right their argmax. Fitted on the
    leave-one-out scores, the factor uses no validation example and does not reward the
    fit for having seen the example it scores.
    """
    result = minimize_scalar(
        lambda log_factor: mean_cross_entropy(np.exp(log_factor) * scores, labels, sample_weights),
        bounds=(math.log(1e-2), math.log(1e4)),
        method="bounded",
    )
    return float(np.exp(result.x))
