"""Heads on several depths (tlflax.taps): choosing the depths, joining them, cutting the network.

The classifier cut at its taps must compute exactly what feature extraction stores for the
head (the head-only model and the fine-tuned one start from the same input), and the
selection must find the depth that carries the signal, on training data alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tlflax import vision
from tlflax.config import ExtractParams, ParamsError, TrainHeadParams
from tlflax.plan import resolve_taps
from tlflax.taps import join_taps, joined_numpy, probe_taps, select_taps


def _depths_with_signal_at(depth: int, *, examples: int = 240, seed: int = 0):
    """Four depths of noise features; one of them also carries the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=examples)
    by_depth = [rng.normal(size=(examples, width)) for width in (8, 16, 32, 64)]
    # The informative depth: class means 1.5 apart in 4 of its dimensions, at a scale far
    # below the loudest noise depth (normalisation must not let loudness decide).
    by_depth[depth - 1][:, :4] += 1.5 * np.eye(3)[labels] @ rng.normal(size=(3, 4))
    by_depth[3] *= 100.0
    return by_depth, labels


def test_selection_finds_the_depth_that_carries_the_label_using_train_only() -> None:
    by_depth, labels = _depths_with_signal_at(2)
    selection = select_taps(by_depth, labels, num_classes=3, max_taps=4, min_gain=0.01)
    assert selection.taps[0] == 2 or 2 in selection.taps
    assert selection.steps[0][0] == 2
    # Leave-one-out accuracy never falls along the greedy path, and the first step is far
    # above chance (1/3).
    accuracies = [accuracy for _, accuracy in selection.steps]
    assert accuracies == sorted(accuracies)
    assert accuracies[0] > 0.6


def test_selection_stops_when_no_depth_adds_enough() -> None:
    by_depth, labels = _depths_with_signal_at(3)
    # Nothing but depth 3 holds signal: at a gain threshold of 0.2 no second depth joins.
    selection = select_taps(by_depth, labels, num_classes=3, max_taps=4, min_gain=0.2)
    assert selection.taps == (3,)
    assert len(selection.steps) == 1


def test_probe_of_the_chosen_taps_scores_on_validation() -> None:
    by_depth, labels = _depths_with_signal_at(2, examples=300)
    train = [features[:200] for features in by_depth]
    validation = [features[200:] for features in by_depth]
    probe = probe_taps(
        train, labels[:200], validation, labels[200:], num_classes=3, max_taps=2, min_gain=0.0
    )
    assert 2 in probe.taps and len(probe.taps) <= 2
    assert probe.validation_accuracy > 0.6


def test_joined_taps_have_equal_length_and_unit_mean_square() -> None:
    rng = np.random.default_rng(1)
    pooled = [rng.normal(size=(5, 16)) * 1000.0, rng.normal(size=(5, 48)) * 0.001]
    joined = np.asarray(join_taps([jnp.asarray(p, jnp.float32) for p in pooled]))
    assert joined.shape == (5, 64)
    np.testing.assert_allclose(np.mean(joined**2, axis=1), 1.0, rtol=1e-4)
    # Each tap carries half of the row's length, whatever its width or scale.
    np.testing.assert_allclose(
        np.sum(joined[:, :16] ** 2, axis=1), np.sum(joined[:, 16:] ** 2, axis=1), rtol=1e-4
    )


def test_cut_classifier_computes_what_extraction_stores_for_its_head() -> None:
    taps = (1, 2)
    model = vision.build_image_classifier(
        "small_cnn", 4, TrainHeadParams(head="linear"), pretrained=False, seed=0, taps=taps
    )
    uncut = vision.build_image_classifier(
        "small_cnn", 4, TrainHeadParams(head="linear"), pretrained=False, seed=0
    )
    # The cut network has only the groups up to its highest tap.
    assert len(model.backbone.group_patterns()) == 2 < len(uncut.backbone.group_patterns())
    images = jax.random.uniform(jax.random.key(0), (6, 32, 32, 3))
    pooled = vision.pooled_after_each_group(uncut.backbone, images)
    stored = joined_numpy([np.asarray(p) for p in pooled], taps)
    assert model.head.output.kernel.shape == (stored.shape[1], 4)
    # A non-zero head, so the logits depend on every feature.
    model.head.output.kernel.value = jax.random.normal(jax.random.key(1), (stored.shape[1], 4))
    expected = np.asarray(model.head(jnp.asarray(stored)))
    np.testing.assert_allclose(np.asarray(model(images)), expected, rtol=1e-4, atol=1e-4)
    # From a cached prefix (at or below the lowest tap) the logits are the same.
    for start in (0, 1):
        from_prefix = model.from_prefix(model.run_prefix(images, start), start)
        np.testing.assert_allclose(np.asarray(from_prefix), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot give tap 1"):
        model.from_prefix(model.run_prefix(images, 2), 2)


def test_abstract_cut_classifier_has_the_same_structure() -> None:
    taps = (1, 3)
    built = vision.build_image_classifier(
        "small_cnn", 3, TrainHeadParams(), pretrained=False, taps=taps
    )
    abstract = vision.abstract_image_classifier("small_cnn", 3, TrainHeadParams(), taps)
    assert jax.tree.structure(nnx.state(built)) == jax.tree.structure(nnx.state(abstract))


def test_taps_resolve_from_advice_params_or_last() -> None:
    advised = (4, 9)
    assert resolve_taps("auto", advised, num_groups=10) == [4, 9]
    assert resolve_taps("auto", None, num_groups=10) is None
    assert resolve_taps("last", advised, num_groups=10) is None
    assert resolve_taps([2, 10], advised, num_groups=10) == [2, 10]
    with pytest.raises(ParamsError, match=r"'extract.taps': depth 11 is beyond .* 10 layer"):
        resolve_taps([3, 11], advised, num_groups=10)


@pytest.mark.parametrize("taps", [[3, 3], [5, 2], []])
def test_params_reject_taps_out_of_order_or_empty(taps: list[int]) -> None:
    with pytest.raises(ValueError, match="taps"):
        ExtractParams(taps=taps)
