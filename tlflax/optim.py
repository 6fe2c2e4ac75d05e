"""Optimizers: AdamW per parameter group through ``optax.multi_transform``.

Every distinct (learning-rate multiplier, weight-decay multiplier) pair is one group with its
own AdamW; frozen parameters get ``optax.set_to_zero`` and so carry no optimizer state.
Gradient clipping runs first, over exactly the gradients of the parameters that train in
that step: under gradual unfreezing, the groups still waiting for their epoch have their
gradients zeroed before the clip (else they would shrink the step of the groups that train).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from tlflax.transfer import FROZEN, ParamSetting, path_to_name

PyTree = object
Schedule = Callable[[jax.Array], jax.Array]


def warmup_cosine(peak_learning_rate: float, total_steps: int, warmup_fraction: float) -> Schedule:
    """Linear warmup from 0 to ``peak_learning_rate`` then cosine decay to 0."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = int(round(total_steps * warmup_fraction))
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(peak_learning_rate, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
    )


def _scaled(schedule: Schedule, multiplier: float, start_step: int = 0) -> Schedule:
    if start_step == 0:
        return lambda step: multiplier * schedule(step)
    # Before its unfreezing step a group's rate is zero: its gradients flow (the step function
    # is compiled once for the whole run) but its weights do not move.
    return lambda step: jnp.where(step >= start_step, multiplier * schedule(step), 0.0)


class HoldState(NamedTuple):
    """Steps taken so far (to know which groups have started)."""

    count: jax.Array


def hold_until_unfrozen(start_steps: PyTree) -> optax.GradientTransformation:
    """Zero each gradient until its parameter's start step (gradual unfreezing).

    Args:
      start_steps: a pytree of ints with the structure of the parameters: the step from which
        each parameter trains.

    The gradients of waiting groups still flow (the step compiles once for the whole run);
    zeroing them here keeps them out of the global-norm clip and out of Adam's moments.
    """

    def init(params: PyTree) -> HoldState:
        del params
        return HoldState(count=jnp.zeros([], jnp.int32))

    def update(updates: PyTree, state: HoldState, params: PyTree = None):
        del params
        held = jax.tree_util.tree_map(
            lambda gradient, start: jnp.where(state.count >= start, gradient, 0.0),
            updates,
            start_steps,
        )
        return held, HoldState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def parameter_labels(params: PyTree, settings: dict[str, ParamSetting]) -> PyTree:
    """A pytree of group labels with the structure of ``params``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: settings[path_to_name(path)].label, params
    )


def make_optimizer(
    params: PyTree,
    settings: dict[str, ParamSetting],
    schedule: Schedule,
    *,
    weight_decay: float,
    gradient_clip_norm: float | None,
    steps_per_epoch: int = 0,
) -> optax.GradientTransformation:
    """AdamW with per-group learning rates and decay, built on ``optax.multi_transform``.

    Args:
      params: the tree the optimizer will update (the trainable subtree, or the full tree).
      settings: per-parameter settings from :func:`tlflax.transfer.resolve_settings`.
      schedule: the base learning-rate schedule; each group scales it by its multiplier.
      weight_decay: base decoupled weight decay; each group scales it by its multiplier.
      gradient_clip_norm: global-norm clipping over the gradients given to the optimizer.
      steps_per_epoch: turns each group's ``unfreeze_epoch`` into the step it starts at.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> tx = make_optimizer(params, settings, warmup_cosine(1e-3, 100, 0.1),
      ...                     weight_decay=1e-4, gradient_clip_norm=1.0)
    """
    labels = parameter_labels(params, settings)
    transforms: dict[str, optax.GradientTransformation] = {}
    for setting in {s for s in settings.values()}:
        if setting.label in transforms:
            continue
        if setting.frozen:
            transforms[FROZEN] = optax.set_to_zero()
            continue
        transforms[setting.label] = optax.adamw(
            _scaled(schedule, setting.lr_multiplier, setting.unfreeze_epoch * steps_per_epoch),
            weight_decay=weight_decay * setting.weight_decay_multiplier,
        )
    used = set(jax.tree_util.tree_leaves(labels))
    transforms = {label: t for label, t in transforms.items() if label in used}
    stages: list[optax.GradientTransformation] = []
    start_steps = jax.tree_util.tree_map_with_path(
        lambda path, _: settings[path_to_name(path)].unfreeze_epoch * steps_per_epoch, params
    )
    if any(jax.tree_util.tree_leaves(start_steps)):
        stages.append(hold_until_unfrozen(start_steps))
    if gradient_clip_norm is not None:
        stages.append(optax.clip_by_global_norm(gradient_clip_norm))
    stages.append(optax.multi_transform(transforms, labels))
    return stages[0] if len(stages) == 1 else optax.chain(*stages)
