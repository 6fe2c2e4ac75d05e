"""Remedies for imbalanced training data (tlflax/balance.py): weights, sampler, logit
adjustment, auto, none.

The ``none`` path must train exactly as the code did before remedies existed: the
published metrics and seeds.json of the balanced jobs (which resolve ``auto`` to ``none``)
stay valid. The tests here check that bit for bit on the head and fine-tuning steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from sklearn.datasets import load_digits

from tlflax.balance import (
    NO_REMEDY,
    class_counts,
    class_weights,
    imbalance_ratio,
    logit_offsets,
    resolve_class_balance,
)
from tlflax.config import ClassBalanceParams, ParamsError, TrainHeadParams, parse_params
from tlflax.data.errors import DataError
from tlflax.data.pipeline import balanced_order, epoch_order, iterate_batches
from tlflax.data.subsets import long_tail_sizes, require_every_class, stratified_subset
from tlflax.metrics import classification_report
from tlflax.train import create_head, masked_cross_entropy, train_head

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ weights


def test_inverse_frequency_weights_have_mean_one_over_the_training_examples() -> None:
    counts = np.array([60, 30, 10])
    weights = class_weights(counts)
    # Inverse frequency: every class carries the same total weight, N / C each.
    np.testing.assert_allclose(weights * counts, [100 / 3] * 3)
    assert np.dot(weights, counts) / counts.sum() == pytest.approx(1.0)


def test_effective_number_weights_follow_cui_et_al() -> None:
    counts = np.array([100, 10])
    beta = 0.9
    effective = (1 - beta**counts) / (1 - beta)  # 9.99997..., 6.5132...
    expected = (1 / effective) * counts.sum() / np.dot(1 / effective, counts)
    np.testing.assert_allclose(class_weights(counts, beta), expected)
    # Between equal weights and inverse frequency: the large class is discounted less.
    ratio = class_weights(counts, beta)[1] / class_weights(counts, beta)[0]
    assert 1.0 < ratio < class_weights(counts)[1] / class_weights(counts)[0]


# ------------------------------------------------------------------------------ auto


def test_auto_is_none_within_the_gate_ratio_and_logit_adjustment_beyond_it() -> None:
    auto = ClassBalanceParams()
    within = resolve_class_balance(auto, [15, 10], max_class_ratio=1.5)
    assert within.remedy == "none" and within.loss_weights() is None
    assert within.loss_logit_offsets() is None
    assert "1.50 <= validate.max_class_ratio 1.5" in within.describe()
    beyond = resolve_class_balance(auto, [100, 10], max_class_ratio=1.5)
    assert beyond.remedy == "logit_adjustment" and beyond.loss_weights() is None
    assert beyond.class_counts == [100, 10]
    np.testing.assert_allclose(
        beyond.loss_logit_offsets(), np.log([100 / 110, 10 / 110]), rtol=1e-6
    )
    assert "auto: largest/smallest 10.00 > validate.max_class_ratio 1.5; tau 1" in (
        beyond.describe()
    )


def test_a_written_remedy_wins_over_the_measurement() -> None:
    sampler = resolve_class_balance(
        ClassBalanceParams(remedy="sampler"), [10, 10], max_class_ratio=1.5
    )
    assert sampler.remedy == "sampler" and sampler.balanced_sampling
    assert sampler.loss_weights() is None
    none = resolve_class_balance(ClassBalanceParams(remedy="none"), [90, 10], max_class_ratio=1.5)
    assert none.remedy == "none" and "class_balance.remedy: none" in none.reason
    assert imbalance_ratio([90, 10]) == 9.0
    assert list(class_counts(np.array([0, 2, 2]), 4)) == [1, 0, 2, 0]


# ------------------------------------------------------------------------------ sampler


def test_the_sampler_draws_balanced_epochs_of_the_same_length() -> None:
    labels = np.repeat(np.arange(4), [70, 20, 7, 3])
    order = balanced_order(labels, seed=3, epoch=0)
    assert len(order) == len(labels)
    np.testing.assert_array_equal(np.sort(np.bincount(labels[order])), [25, 25, 25, 25])
    # A large class is sub-sampled without repeats; a small one repeated as evenly as it can.
    large = order[labels[order] == 0]
    assert len(np.unique(large)) == 25
    smallest = np.bincount(order[labels[order] == 3])[-3:]
    assert sorted(smallest) == [8, 8, 9]
    # Deterministic by (seed, epoch); another epoch draws another order.
    np.testing.assert_array_equal(order, balanced_order(labels, seed=3, epoch=0))
    assert not np.array_equal(order, balanced_order(labels, seed=3, epoch=1))
    uneven = balanced_order(np.repeat(np.arange(3), [6, 3, 2]), seed=0, epoch=0)
    assert sorted(np.bincount(np.repeat(np.arange(3), [6, 3, 2])[uneven])) == [3, 4, 4]


def test_balanced_batches_keep_the_batch_count_and_plain_ones_their_order() -> None:
    arrays = {"x": np.arange(50), "label": np.repeat([0, 1], [45, 5])}
    balanced = list(iterate_batches(arrays, 16, shuffle=True, seed=0, epoch=2, balanced=True))
    plain = list(iterate_batches(arrays, 16, shuffle=True, seed=0, epoch=2))
    assert len(balanced) == len(plain) == 4
    assert sum(batch["mask"].sum() for batch in balanced) == 50
    drawn = np.concatenate([batch["label"][batch["mask"] > 0] for batch in balanced])
    assert list(np.bincount(drawn)) == [25, 25]
    # Without the sampler, the epoch is the same seeded permutation as before remedies.
    expected = np.random.Generator(np.random.PCG64([0, 2])).permutation(50)
    np.testing.assert_array_equal(epoch_order(50, shuffle=True, seed=0, epoch=2), expected)
    visited = np.concatenate([batch["x"][batch["mask"] > 0] for batch in plain])
    np.testing.assert_array_equal(visited, expected)


# ------------------------------------------------------------------------------ logit adjustment


def test_logit_offsets_are_tau_times_the_log_prior() -> None:
    counts = np.array([60, 30, 10])
    np.testing.assert_allclose(logit_offsets(counts), np.log(counts / 100))
    np.testing.assert_allclose(logit_offsets(counts, tau=1.5), 1.5 * np.log(counts / 100))
    # Only differences between classes matter to the softmax: tau * log of the count ratio.
    offsets = logit_offsets(counts, tau=2.0)
    assert offsets[0] - offsets[2] == pytest.approx(2.0 * np.log(6.0))


def test_the_logit_adjustment_remedy_holds_the_offsets_and_no_weights() -> None:
    params = ClassBalanceParams(remedy="logit_adjustment", tau=0.5)
    balance = resolve_class_balance(params, [90, 30, 10], max_class_ratio=1.5)
    assert balance.remedy == "logit_adjustment" and not balance.balanced_sampling
    assert balance.loss_weights() is None
    offsets = balance.loss_logit_offsets()
    assert offsets is not None and offsets.dtype == np.float32
    np.testing.assert_allclose(offsets, 0.5 * np.log(np.array([90, 30, 10]) / 130), rtol=1e-6)
    assert "class_balance.remedy: logit_adjustment; largest/smallest 9.00; tau 0.5" in (
        balance.describe()
    )
    # Every other remedy adds nothing to the logits.
    for remedy in ("none", "weights", "sampler"):
        other = resolve_class_balance(
            ClassBalanceParams(remedy=remedy), [90, 30, 10], max_class_ratio=1.5
        )
        assert other.loss_logit_offsets() is None and other.logit_offsets == []
    assert NO_REMEDY.loss_logit_offsets() is None


def test_the_adjusted_loss_is_cross_entropy_on_shifted_logits() -> None:
    logits = jax.random.normal(jax.random.key(1), (6, 3))
    labels = jnp.array([0, 1, 2, 2, 0, 1])
    mask = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
    offsets = jnp.asarray(logit_offsets([60, 30, 10]), jnp.float32)
    adjusted = masked_cross_entropy(logits, labels, mask, logit_offsets=offsets)
    shifted = optax.softmax_cross_entropy_with_integer_labels(logits + offsets, labels)
    assert float(adjusted) == pytest.approx(float(jnp.sum(shifted * mask) / 5.0), rel=1e-6)
    plain = masked_cross_entropy(logits, labels, mask)
    assert abs(float(adjusted) - float(plain)) > 1e-3
    # With label smoothing, the smoothed targets meet the same shifted logits.
    smoothed = masked_cross_entropy(logits, labels, mask, 0.1, logit_offsets=offsets)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.1)
    expected = jnp.sum(optax.softmax_cross_entropy(logits + offsets, targets) * mask) / 5.0
    assert float(smoothed) == pytest.approx(float(expected), rel=1e-6)
    # Equal offsets shift every logit alike: the softmax, and so the loss, do not change.
    uniform = masked_cross_entropy(logits, labels, mask, logit_offsets=jnp.full(3, -2.0))
    assert float(uniform) == pytest.approx(float(plain), rel=1e-5)


@pytest.mark.parametrize("tau", [0.0, -1.0, 10.5])
def test_tau_out_of_range_names_the_key(tau: float) -> None:
    raw = {"class_balance": {"remedy": "logit_adjustment", "tau": tau}}
    with pytest.raises(ParamsError) as error:
        parse_params(raw, source="params.yaml")
    message = str(error.value)
    assert message.startswith("params.yaml: ") and "'class_balance.tau'" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------ none path


def _old_masked_cross_entropy(logits, labels, mask):
    """The loss as it was before class weights (git history), for the bit-for-bit check."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def test_the_unweighted_loss_and_its_gradient_are_bit_identical_to_before() -> None:
    logits = jax.random.normal(jax.random.key(0), (8, 5))
    labels = jnp.array([0, 1, 2, 3, 4, 0, 1, 1])
    mask = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
    new = jax.jit(jax.value_and_grad(lambda z: masked_cross_entropy(z, labels, mask)))(logits)
    old = jax.jit(jax.value_and_grad(lambda z: _old_masked_cross_entropy(z, labels, mask)))(logits)
    assert np.asarray(new[0]).tobytes() == np.asarray(old[0]).tobytes()
    assert np.asarray(new[1]).tobytes() == np.asarray(old[1]).tobytes()
    # Weighted: each real row's loss times its class weight, over the real row count.
    weights = jnp.array([2.0, 1.0, 1.0, 1.0, 0.5])
    weighted = masked_cross_entropy(logits, labels, mask, class_weights=weights)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    expected = jnp.sum(losses * weights[labels] * mask) / 6.0
    assert float(weighted) == pytest.approx(float(expected), rel=1e-6)


@pytest.fixture(scope="module")
def digit_features() -> tuple[dict, dict]:
    data = load_digits()
    features = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    return (
        {"features": features[:300], "label": labels[:300]},
        {"features": features[300:400], "label": labels[300:400]},
    )


def _trained_head(train, validation, **balance):
    cfg = TrainHeadParams(max_epochs=4, patience=4, batch_size=64)
    head = create_head(64, 10, cfg)
    history = train_head(head, train, validation, cfg, **balance)
    return nnx.state(head, nnx.Param), history


def test_a_head_trains_bit_identically_without_a_remedy(digit_features) -> None:
    train, validation = digit_features
    balanced = resolve_class_balance(
        ClassBalanceParams(), class_counts(train["label"], 10), max_class_ratio=1.5
    )
    assert balanced.remedy == "none"  # 300 digits: auto leaves them as they are
    reference, reference_history = _trained_head(train, validation)
    for balance in (NO_REMEDY, balanced):
        params, history = _trained_head(train, validation, balance=balance)
        for old, new in zip(
            jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(params), strict=True
        ):
            assert np.asarray(old).tobytes() == np.asarray(new).tobytes()
        assert history.epochs == reference_history.epochs
    weighted = resolve_class_balance(
        ClassBalanceParams(remedy="weights"), class_counts(train["label"], 10), max_class_ratio=1.5
    )
    params, _ = _trained_head(train, validation, balance=weighted)
    assert any(
        np.asarray(old).tobytes() != np.asarray(new).tobytes()
        for old, new in zip(
            jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(params), strict=True
        )
    )


def test_a_head_with_logit_adjustment_recalls_the_tail_better() -> None:
    # Digits drawn long-tailed, 60 of "0" down to 3 of "9"; validation and the held-out
    # split balanced, as in the long-tail job. (Seeds 0-2 each gained 0.12-0.16 in balanced
    # accuracy and 0.24-0.35 in recall of the 5 rarest classes.)
    train, validation, held_out = _long_tailed_digits()
    counts = class_counts(train["label"], 10)
    scores = {}
    for remedy in ("none", "logit_adjustment"):
        balance = resolve_class_balance(
            ClassBalanceParams(remedy=remedy), counts, max_class_ratio=1.5
        )
        cfg = TrainHeadParams(max_epochs=60, patience=60, batch_size=64)
        head = create_head(64, 10, cfg)
        history = train_head(head, train, validation, cfg, balance=balance)
        logits = head(jnp.asarray(validation["features"]))
        # Validation scores the plain logits: the best epoch's loss is the saved head's.
        plain_loss = optax.softmax_cross_entropy_with_integer_labels(logits, validation["label"])
        best_loss = history.epochs[history.best_epoch]["validation_loss"]
        assert float(plain_loss.mean()) == pytest.approx(best_loss, rel=1e-5)
        probabilities = np.asarray(jax.nn.softmax(head(jnp.asarray(held_out["features"]))))
        scores[remedy] = classification_report(
            probabilities, held_out["label"], [str(digit) for digit in range(10)]
        )
    tail = {
        remedy: np.mean([report["per_class"][str(c)]["recall"] for c in range(5, 10)])
        for remedy, report in scores.items()
    }
    assert tail["logit_adjustment"] > tail["none"] + 0.1
    gain = scores["logit_adjustment"]["balanced_accuracy"] - scores["none"]["balanced_accuracy"]
    assert gain > 0.05


def _long_tailed_digits() -> tuple[dict, dict, dict]:
    data = load_digits()
    features = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    pool = np.arange(900)
    chosen = stratified_subset(labels[pool], per_class=long_tail_sizes(10, 60, 20.0), seed=0)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    validation = rest[stratified_subset(labels[rest], per_class=10, seed=0)]
    rest = np.setdiff1d(rest, validation)
    held_out = rest[stratified_subset(labels[rest], per_class=60, seed=0)]
    return tuple(
        {"features": features[rows], "label": labels[rows]}
        for rows in (chosen, validation, held_out)
    )


# ------------------------------------------------------------------------------ metrics


def test_balanced_accuracy_and_per_class_recall_on_a_known_confusion() -> None:
    # 6 of class 0 (all right), 2 of class 1 (one right), 2 of class 2 (none right).
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 0, 0, 0, 0, 0, 1, 0, 0, 1])
    probabilities = np.eye(3)[predictions]
    report = classification_report(probabilities, labels, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.7)
    assert [report["per_class"][c]["recall"] for c in "abc"] == [1.0, 0.5, 0.0]
    assert report["balanced_accuracy"] == pytest.approx(0.5)
    assert report["min_recall"] == 0.0
    # macro-F1: class a P 6/8 R 1, class b P 1/2 R 1/2, class c 0.
    assert report["macro_f1"] == pytest.approx((2 * 0.75 / 1.75 + 0.5 + 0.0) / 3)


# ------------------------------------------------------------------------------ long tail


def test_long_tail_sizes_fall_geometrically_and_draw_exactly() -> None:
    sizes = long_tail_sizes(10, 100, 10.0)
    assert list(sizes.values()) == [100, 77, 60, 46, 36, 28, 22, 17, 13, 10]
    labels = np.repeat(np.arange(10), 150)
    chosen = stratified_subset(labels, per_class=sizes, seed=0)
    assert list(np.bincount(labels[chosen])) == list(sizes.values())
    # An int keeps the draw it always made (the balanced jobs' subsets are unchanged).
    np.testing.assert_array_equal(
        stratified_subset(labels, per_class=5, seed=1),
        stratified_subset(labels, per_class=dict.fromkeys(range(10), 5), seed=1),
    )


def test_a_class_without_training_examples_is_named_with_the_key() -> None:
    with pytest.raises(DataError, match="train class 'cat'.*prepare.train_fraction"):
        require_every_class(
            np.array([0, 0, 2]), ["dog", "cat", "bird"], size_keys="prepare.train_fraction"
        )
    with pytest.raises(DataError, match="train class 'cat': has no training examples"):
        resolve_class_balance(
            ClassBalanceParams(), [5, 0], max_class_ratio=1.5, class_names=["dog", "cat"]
        )


def test_the_prepare_stage_refuses_an_empty_training_class_with_exit_2(tmp_path: Path) -> None:
    # 40 "dog" and 3 "cat" reviews; a tenth of each class trains: round(0.3) = 0 cats.
    rows = ["text,label"] + [f"dog text {i},dog" for i in range(40)]
    rows += [f"cat text {i},cat" for i in range(3)]
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n")
    params = {
        "experiment": "pets",
        "prepare": {
            "dataset": "text_file",
            "raw_dir": str(tmp_path / "pets.csv"),
            "train_per_class": None,
            "train_fraction": 0.1,
            "validation_per_class": None,
            "validation_fraction": 0.1,
            "test_fraction": 0.3,
        },
        "extract": {"backbone": "minilm_l6"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.stages.prepare", "--params", "params.yaml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "train class 'cat'" in lines[0] and "prepare.train_fraction" in lines[0]
    assert not (tmp_path / "data" / "pets" / "tfds").exists()
