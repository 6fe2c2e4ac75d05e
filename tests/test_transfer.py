"""Rules → per-parameter settings → multi_transform optimizer; frozen weights stay put."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tlflax.config import TransferRule
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.small_cnn import SmallCNN
from tlflax.optim import make_optimizer, parameter_labels, warmup_cosine
from tlflax.transfer import (
    FROZEN,
    ParamSetting,
    UncoveredParametersError,
    layer_depths,
    parameter_names,
    resolve_settings,
    trainable_filter,
)


def _model() -> ImageClassifier:
    rngs = nnx.Rngs(0)
    return ImageClassifier(SmallCNN(widths=(4, 8, 16), rngs=rngs), Head(16, 3, rngs=rngs))


def _names_and_ndims(model):
    params = nnx.state(model, nnx.Param)
    names = parameter_names(params)
    return names, {n: x.ndim for n, x in zip(names, jax.tree_util.tree_leaves(params), strict=True)}


def test_first_matching_rule_wins_and_every_parameter_is_covered():
    names, ndims = _names_and_ndims(_model())
    rules = [
        TransferRule(pattern="^head/", lr_multiplier=10.0),
        TransferRule(pattern="^backbone/blocks/0/", freeze=True),
        TransferRule(pattern="^backbone/", lr_multiplier=0.1, weight_decay_multiplier=2.0),
        TransferRule(pattern=".*", lr_multiplier=99.0),
    ]
    settings = resolve_settings(names, rules, ndims=ndims)
    assert settings["head/output/kernel"].lr_multiplier == 10.0
    assert settings["backbone/blocks/0/conv/kernel"].frozen
    assert settings["backbone/blocks/1/conv/kernel"].lr_multiplier == pytest.approx(0.1)
    assert settings["backbone/blocks/1/conv/kernel"].weight_decay_multiplier == 2.0
    # Decay never applies to biases or norm scales.
    assert settings["backbone/blocks/1/norm/scale"].weight_decay_multiplier == 0.0
    assert settings["head/output/bias"].weight_decay_multiplier == 0.0


def test_uncovered_parameters_are_listed():
    names, ndims = _names_and_ndims(_model())
    with pytest.raises(UncoveredParametersError) as error:
        resolve_settings(names, [TransferRule(pattern="^head/")], ndims=ndims)
    assert "backbone/blocks/0/conv/kernel" in str(error.value)
    assert "match no rule" in str(error.value)


def test_layer_wise_decay_scales_by_depth_from_top():
    model = _model()
    names, ndims = _names_and_ndims(model)
    depths = layer_depths(names, model.backbone.group_patterns(), "backbone/")
    assert depths["head/output/kernel"] == 0
    assert depths["backbone/blocks/2/conv/kernel"] == 1
    assert depths["backbone/blocks/0/conv/kernel"] == 3
    settings = resolve_settings(
        names, [TransferRule(pattern=".*")], ndims=ndims, depths=depths, layer_lr_decay=0.5
    )
    assert settings["head/output/kernel"].lr_multiplier == 1.0
    assert settings["backbone/blocks/2/conv/kernel"].lr_multiplier == 0.5
    assert settings["backbone/blocks/0/conv/kernel"].lr_multiplier == 0.125


def test_frozen_parameters_never_change_and_groups_use_their_rates():
    model = _model()
    names, ndims = _names_and_ndims(model)
    rules = [
        TransferRule(pattern="^backbone/blocks/0/", freeze=True),
        TransferRule(pattern="^backbone/", lr_multiplier=0.01),
        TransferRule(pattern=".*"),
    ]
    settings = resolve_settings(names, rules, ndims=ndims)
    params = nnx.state(model, nnx.Param)
    labels = parameter_labels(params, settings)
    assert FROZEN in jax.tree_util.tree_leaves(labels)
    # The same optimizer also works over the full tree: frozen groups get set_to_zero.
    tx = make_optimizer(
        params, settings, lambda step: 1e-2, weight_decay=0.0, gradient_clip_norm=None
    )
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = dict(zip(parameter_names(updates), jax.tree_util.tree_leaves(updates), strict=True))
    assert not np.any(flat["backbone/blocks/0/conv/kernel"])
    # Adam's first step moves each weight by ~lr * multiplier.
    assert np.allclose(np.abs(flat["head/output/kernel"]), 1e-2, rtol=1e-3)
    assert np.allclose(np.abs(flat["backbone/blocks/1/conv/kernel"]), 1e-4, rtol=1e-3)


def test_trainable_filter_splits_only_unfrozen_params():
    model = _model()
    names, ndims = _names_and_ndims(model)
    settings = resolve_settings(
        names,
        [TransferRule(pattern="^head/"), TransferRule(pattern=".*", freeze=True)],
        ndims=ndims,
    )
    _, trainable, frozen, rest = nnx.split(model, trainable_filter(settings), nnx.Param, ...)
    assert parameter_names(trainable) == ["head/output/bias", "head/output/kernel"]
    assert all(name.startswith("backbone/") for name in parameter_names(frozen))
    assert all(name.endswith(("mean", "var")) for name in parameter_names(rest))


def test_warmup_cosine_shape():
    schedule = warmup_cosine(1.0, 100, 0.1)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
    assert float(warmup_cosine(1.0, 100, 0.0)(0)) == 1.0


def test_clipping_sees_only_the_optimized_tree():
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    settings = {"a": ParamSetting(False, 1.0, 0.0), "b": ParamSetting(False, 1.0, 0.0)}
    tx = make_optimizer(params, settings, lambda s: 1.0, weight_decay=0.0, gradient_clip_norm=1.0)
    huge = {"a": jnp.full(3, 1e6), "b": jnp.zeros(3)}
    state = tx.init(params)
    # The clipped gradient has global norm 1, so Adam's first step is still ±lr.
    updates, _ = tx.update(huge, state, params)
    assert np.allclose(np.abs(updates["a"]), 1.0, rtol=1e-3)
    assert isinstance(tx, optax.GradientTransformation)


def test_gradual_unfreezing_clips_only_what_trains_in_the_step():
    """A group still waiting for its epoch neither shrinks the clip nor fills Adam's moments."""
    params = {"head": jnp.ones(3), "waiting": jnp.ones(3)}
    settings = {
        "head": ParamSetting(False, 1.0, 0.0),
        "waiting": ParamSetting(False, 1.0, 0.0, unfreeze_epoch=1),
    }
    tx = make_optimizer(
        params,
        settings,
        lambda step: 1.0,
        weight_decay=0.0,
        gradient_clip_norm=1.0,
        steps_per_epoch=1,
    )
    gradients = {"head": jnp.full(3, 0.1), "waiting": jnp.full(3, 1e6)}
    _, state = tx.update(gradients, tx.init(params), params)
    # multi_transform keeps one AdamW state per group; each holds its own parameters' mu.
    first_moments = {}
    for _, mu in optax.tree_utils.tree_get_all_with_path(state, "mu"):
        first_moments.update(
            {name: value for name, value in mu.items() if isinstance(value, jax.Array)}
        )
    # Step 0: only the head's gradient (norm 0.17 < 1) counts, unclipped; mu = 0.1 * g.
    np.testing.assert_allclose(np.asarray(first_moments["head"]), 0.01, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(first_moments["waiting"]), 0.0)
