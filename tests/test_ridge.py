"""The ridge classifier (tlflax/ridge.py) and the head fitted with it (train_head.head: ridge)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tlflax.balance import resolve_class_balance
from tlflax.config import ClassBalanceParams, TrainHeadParams
from tlflax.probes import ridge_probe
from tlflax.ridge import fit_ridge, fit_temperature, mean_cross_entropy
from tlflax.train import create_head, train_head

NUM_CLASSES = 3


def _blobs(counts, dims=6, seed=0, spread=1.6):
    """Gaussian classes around random centres: ``counts[k]`` examples of class k."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(counts), dims)) * 1.5
    labels = np.repeat(np.arange(len(counts)), counts)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dims))
    return features.astype(np.float32), labels


def _refit_without(features, labels, index, penalty, scale):
    """The ridge solution on every example but ``index``: the normal equations, solved."""
    keep = np.arange(len(labels)) != index
    design = np.concatenate([features / scale, np.ones((len(labels), 1))], axis=1)
    targets = np.eye(NUM_CLASSES)[labels]
    kept = design[keep]
    solution = np.linalg.solve(
        kept.T @ kept + penalty * np.eye(kept.shape[1]), kept.T @ targets[keep]
    )
    return design[index] @ solution


@pytest.mark.parametrize("weighted", [False, True])
def test_leave_one_out_scores_are_the_refits_without_each_example(weighted) -> None:
    features, labels = _blobs([12, 8, 5])
    weights = np.where(labels == 2, 3.0, 1.0) if weighted else None
    fit = fit_ridge(features, labels, NUM_CLASSES, weights)
    features64 = features.astype(np.float64)
    scale = np.sqrt(np.mean(np.square(features64)))
    design = np.concatenate([features64 / scale, np.ones((len(labels), 1))], axis=1)
    if weighted:
        design = design * np.sqrt(weights)[:, None]
    singular = np.linalg.svd(design, compute_uv=False)
    penalty = fit.relative_penalty * np.mean(singular**2)
    for index in (0, 13, 24):
        if weighted:
            # The weighted fit without an example: scale the other rows by sqrt(weight).
            root = np.sqrt(weights)
            keep = np.arange(len(labels)) != index
            plain = np.concatenate([features64 / scale, np.ones((len(labels), 1))], axis=1)
            rows, targets = plain[keep] * root[keep, None], np.eye(NUM_CLASSES)[labels][keep]
            solution = np.linalg.solve(
                rows.T @ rows + penalty * np.eye(rows.shape[1]),
                rows.T @ (targets * root[keep, None]),
            )
            expected = plain[index] @ solution
        else:
            expected = _refit_without(features64, labels, index, penalty, scale)
        np.testing.assert_allclose(fit.leave_one_out_scores[index], expected, atol=1e-8)
    # And the final fit solves the normal equations on every example, in the features' units.
    plain = np.concatenate([features64 / scale, np.ones((len(labels), 1))], axis=1)
    row_weights = np.ones(len(labels)) if weights is None else weights
    solution = np.linalg.solve(
        plain.T @ (row_weights[:, None] * plain) + penalty * np.eye(plain.shape[1]),
        plain.T @ (row_weights[:, None] * np.eye(NUM_CLASSES)[labels]),
    )
    np.testing.assert_allclose(fit.scores(features[:3]), plain[:3] @ solution, atol=1e-8)


def test_the_probe_is_the_fit_scored_on_validation() -> None:
    features, labels = _blobs([20, 20, 20], seed=1)
    held_out, held_out_labels = _blobs([30, 30, 30], seed=1)
    fit = fit_ridge(features, labels, NUM_CLASSES)
    probe = ridge_probe(features, labels, held_out, held_out_labels, NUM_CLASSES)
    predicted = fit.scores(held_out).argmax(axis=1)
    assert probe.validation_accuracy == pytest.approx(np.mean(predicted == held_out_labels))
    assert probe.relative_penalty == fit.relative_penalty
    assert probe.leave_one_out_accuracy == fit.leave_one_out_accuracy


def test_the_temperature_minimises_the_cross_entropy() -> None:
    features, labels = _blobs([15, 15, 15], seed=2)
    scores = fit_ridge(features, labels, NUM_CLASSES).leave_one_out_scores
    factor = fit_temperature(scores, labels)
    best = mean_cross_entropy(factor * scores, labels)
    for other in (1.0, factor * 0.8, factor * 1.25):
        assert best <= mean_cross_entropy(other * scores, labels) + 1e-9
    # Ridge scores sit on a 0-1 scale: as logits they need sharpening, not flattening.
    assert factor > 1.0


def _head_cfg(**changes) -> TrainHeadParams:
    return TrainHeadParams(head="ridge", **changes)


def test_ridge_head_predicts_as_the_fit_and_reports_one_epoch() -> None:
    features, labels = _blobs([25, 25, 25], seed=3)
    val_features, val_labels = _blobs([10, 10, 10], seed=3)
    head = create_head(features.shape[1], NUM_CLASSES, _head_cfg())
    seen = []
    history = train_head(
        head,
        {"features": features, "label": labels},
        {"features": val_features, "label": val_labels},
        _head_cfg(),
        on_epoch_end=lambda epoch, metrics: seen.append((epoch, metrics)),
    )
    fit = fit_ridge(features, labels, NUM_CLASSES)
    logits = np.asarray(head(jnp.asarray(val_features)))
    np.testing.assert_array_equal(logits.argmax(axis=1), fit.scores(val_features).argmax(axis=1))
    assert len(history.epochs) == 1 and history.best_epoch == 0 and seen[0][0] == 0
    summary = history.summary()
    assert summary["validation_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == val_labels))
    assert summary["validation_loss"] == pytest.approx(
        mean_cross_entropy(logits.astype(np.float64), val_labels), rel=1e-5
    )


def test_remedies_shift_the_ridge_head_towards_the_rare_class() -> None:
    features, labels = _blobs([60, 30, 6], seed=4, spread=2.2)
    test_features, test_labels = _blobs([400, 400, 400], seed=4, spread=2.2)
    counts = np.bincount(labels)
    recalls = {}
    for remedy in ("none", "weights", "sampler", "logit_adjustment"):
        balance = resolve_class_balance(
            ClassBalanceParams(remedy=remedy), counts, max_class_ratio=1.5
        )
        head = create_head(features.shape[1], NUM_CLASSES, _head_cfg())
        train_head(
            head,
            {"features": features, "label": labels},
            {"features": test_features[:30], "label": test_labels[:30]},
            _head_cfg(),
            balance=balance,
        )
        predicted = np.asarray(head(jnp.asarray(test_features))).argmax(axis=1)
        recalls[remedy] = np.mean(predicted[test_labels == 2] == 2)
        if remedy == "logit_adjustment":
            plain = create_head(features.shape[1], NUM_CLASSES, _head_cfg())
            train_head(
                plain,
                {"features": features, "label": labels},
                {"features": test_features[:30], "label": test_labels[:30]},
                _head_cfg(),
            )
            # The post-hoc adjustment: same kernel, bias lowered by tau * log(prior).
            np.testing.assert_allclose(head.output.kernel.value, plain.output.kernel.value)
            np.testing.assert_allclose(
                plain.output.bias.value - head.output.bias.value,
                np.log(counts / counts.sum()),
                rtol=1e-5,
            )
    for remedy in ("weights", "sampler", "logit_adjustment"):
        assert recalls[remedy] > recalls["none"] + 0.05, recalls


def test_a_ridge_fit_needs_a_linear_head() -> None:
    features, labels = _blobs([5, 5, 5])
    mlp = create_head(features.shape[1], NUM_CLASSES, TrainHeadParams(head="mlp", hidden_dim=4))
    with pytest.raises(ValueError, match="linear head"):
        train_head(
            mlp,
            {"features": features, "label": labels},
            {"features": features, "label": labels},
            _head_cfg(),
        )
