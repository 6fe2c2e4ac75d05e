"""Training pieces shared by every phase, and the new head on cached features.

Read top to bottom:
  1. losses and metrics shared by every phase;
  2. head training on cached backbone features (feature extraction), through the one epoch
     loop of :mod:`tlflax.loop`; fine-tuning of backbone + head lives in :mod:`tlflax.finetuner`.

Steps are plain ``jax.jit`` functions over (graphdef, state) rather than ``nnx.jit``: the split
happens once per run, so the per-step Python overhead is that of a pure function call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlflax.balance import NO_REMEDY, ClassBalance
from tlflax.balance import class_weights as inverse_frequency_weights
from tlflax.config import TrainHeadParams, TransferRule
from tlflax.data.pipeline import iterate_batches, num_batches
from tlflax.loop import (
    EarlyStopping,
    EpochCallback,
    History,
    KeepBestInMemory,
    ReportEpochs,
    check_finite_loss,
    fit_epochs,
)
from tlflax.models.heads import Head
from tlflax.optim import make_optimizer, warmup_cosine
from tlflax.ridge import fit_ridge, fit_temperature, mean_cross_entropy
from tlflax.transfer import parameter_names, resolve_settings

Batch = dict[str, jax.Array]
# forward(model, batch, train, key) -> logits. It holds the input handling of one modality
# (image resize and augmentation, or token ids and masks), so the loop below serves both.
Forward = Callable[[nnx.Module, Batch, bool, jax.Array | None], jax.Array]


# --------------------------------------------------------------------------------------------
# 1. Losses and metrics
# --------------------------------------------------------------------------------------------


def masked_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
    class_weights: jax.Array | None = None,
    logit_offsets: jax.Array | None = None,
) -> jax.Array:
    """Mean cross-entropy over the real rows of a padded batch.

    ``label_smoothing`` moves that much of each target's mass evenly onto all classes
    (Szegedy et al., 2016): the loss stops rewarding ever larger logits, which on a few
    hundred examples is one way a network memorises them. ``class_weights`` (one per class,
    mean 1 over the training examples: :func:`tlflax.balance.class_weights`) scale each
    example's loss by its class's weight; the mean still divides by the example count, so
    the loss keeps its scale. ``logit_offsets`` (one per class, ``tau * log(prior)``:
    :func:`tlflax.balance.logit_offsets`) are added to every row's logits before the loss,
    the logit-adjusted loss of Menon et al. (2021); predictions keep the plain logits. None
    for either leaves the arithmetic exactly as without it.
    """
    losses = _example_losses(logits, labels, label_smoothing, class_weights, logit_offsets)
    return _mean_over_real_rows(losses, mask)


def mixed_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    partner_labels: jax.Array,
    partner_share: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
    class_weights: jax.Array | None = None,
    logit_offsets: jax.Array | None = None,
) -> jax.Array:
    """:func:`masked_cross_entropy` for mixed examples (CutMix): row i's target is
    ``(1 - partner_share[i])`` of its label and ``partner_share[i]`` of its partner's. Cross-
    entropy is linear in the target, so this is the same mix of the two labels' losses, each
    with its own class weight."""
    own = _example_losses(logits, labels, label_smoothing, class_weights, logit_offsets)
    other = _example_losses(logits, partner_labels, label_smoothing, class_weights, logit_offsets)
    losses = (1.0 - partner_share) * own + partner_share * other
    return _mean_over_real_rows(losses, mask)


def _mean_over_real_rows(losses: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _example_losses(logits, labels, label_smoothing, class_weights, logit_offsets) -> jax.Array:
    if logit_offsets is not None:
        logits = logits + jnp.asarray(logit_offsets, dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if class_weights is not None:
        losses = losses * jnp.asarray(class_weights)[labels]
    return losses


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The EMA's decay at ``step`` (0-based): TensorFlow's ExponentialMovingAverage warm-up,
    ``min(decay, (1 + step) / (10 + step))``, so the average of a run of a few hundred steps
    is not dominated by the starting weights."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def batch_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Summed loss, correct predictions and example count; padding rows contribute nothing."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(losses * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def finish_counts(counts: dict[str, float]) -> dict[str, float]:
    count = max(counts["count"], 1.0)
    return {"loss": counts["loss_sum"] / count, "accuracy": counts["correct"] / count}


def add_counts(total: dict[str, float], counts: dict[str, jax.Array]) -> dict[str, float]:
    for key, value in counts.items():
        total[key] = total.get(key, 0.0) + float(value)
    return total


# --------------------------------------------------------------------------------------------
# 2. Head training on cached features
# --------------------------------------------------------------------------------------------


def create_head(in_features: int, num_classes: int, cfg: TrainHeadParams) -> Head:
    return Head(
        in_features,
        num_classes,
        kind=cfg.head,
        hidden_dim=cfg.hidden_dim,
        dropout_rate=cfg.dropout,
        rngs=nnx.Rngs(cfg.seed),
    )


def head_forward(head: Head, batch: Batch, train: bool, key: jax.Array | None) -> jax.Array:
    """A :data:`Forward` of a head on cached features (``batch["features"]``), for
    prediction: dropout off."""
    return head(batch["features"])


class HeadTrainer:
    """The steps of head training on cached features: one jitted train and eval step over
    the head's parameters, and an epoch / a validation pass built from them."""

    def __init__(
        self,
        head: Head,
        cfg: TrainHeadParams,
        num_train_examples: int,
        balance: ClassBalance = NO_REMEDY,
    ):
        self.cfg = cfg
        self.balance = balance
        self.class_weights = balance.loss_weights()
        self.logit_offsets = balance.loss_logit_offsets()
        self.graphdef, params = nnx.split(head, nnx.Param)
        names = parameter_names(params)
        leaves = jax.tree_util.tree_leaves(params)
        ndims = {name: leaf.ndim for name, leaf in zip(names, leaves, strict=True)}
        settings = resolve_settings(names, [TransferRule(pattern=".*")], ndims=ndims)
        self.steps_per_epoch = num_batches(num_train_examples, cfg.batch_size, drop_remainder=False)
        schedule = warmup_cosine(cfg.learning_rate, self.steps_per_epoch * cfg.max_epochs, 0.0)
        self.tx = make_optimizer(
            params, settings, schedule, weight_decay=cfg.weight_decay, gradient_clip_norm=None
        )
        # The run's state: (parameters, optimizer state, random key for dropout).
        self.initial = (params, self.tx.init(params), jax.random.key(cfg.seed))
        self.train_step = jax.jit(self._train_step)
        self.eval_step = jax.jit(self._eval_step)

    def _train_step(self, params, opt_state, batch, key):
        def loss_fn(params):
            logits = nnx.merge(self.graphdef, params)(batch["features"], dropout_key=key)
            # The epoch's reported train_loss is this loss: on adjusted logits under
            # logit_adjustment. Validation (eval_step) scores the plain logits.
            return masked_cross_entropy(
                logits,
                batch["label"],
                batch["mask"],
                class_weights=self.class_weights,
                logit_offsets=self.logit_offsets,
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def _eval_step(self, params, batch):
        logits = nnx.merge(self.graphdef, params)(batch["features"])
        return batch_counts(logits, batch["label"], batch["mask"])

    def run_epoch(self, state, train: dict[str, np.ndarray], epoch: int):
        """One shuffled pass over ``train``; returns the new state and the mean training loss."""
        params, opt_state, key = state
        loss_sum, count = 0.0, 0.0
        batches = iterate_batches(
            train,
            self.cfg.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            epoch=epoch,
            balanced=self.balance.balanced_sampling,
        )
        for step, batch in enumerate(batches):
            key, step_key = jax.random.split(key)
            params, opt_state, loss = self.train_step(params, opt_state, batch, step_key)
            check_finite_loss(float(loss), "train_head", epoch, step)
            loss_sum += float(loss * batch["mask"].sum())
            count += float(batch["mask"].sum())
        return (params, opt_state, key), loss_sum / count

    def evaluate(self, state, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in iterate_batches(arrays, self.cfg.batch_size, shuffle=False, seed=0):
            add_counts(totals, self.eval_step(state[0], batch))
        return finish_counts(totals)


def train_head(
    head: Head,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    cfg: TrainHeadParams,
    *,
    balance: ClassBalance = NO_REMEDY,
    on_epoch_end: EpochCallback | None = None,
) -> History:
    """Train ``head`` in place on cached features, keeping the weights of the best epoch.

    Args:
      head: a freshly created head; updated in place to the best validation epoch.
      train, validation: ``{"features": (N, D) float32, "label": (N,) int}``.
      cfg: the ``train_head`` section of params.yaml.
      balance: the remedy for imbalanced training data (:mod:`tlflax.balance`).
      on_epoch_end: called with (epoch, metrics) after each epoch (e.g. dvclive logging).

    Returns:
      The per-epoch history; early stopping watches the validation loss. ``head: ridge``
      is fitted in closed form (:func:`fit_ridge_head`): a history of one epoch.
    """
    if cfg.head == "ridge":
        return fit_ridge_head(head, train, validation, balance=balance, on_epoch_end=on_epoch_end)
    trainer = HeadTrainer(head, cfg, len(train["label"]), balance)
    (best_params, _, _), history = fit_epochs(
        trainer.initial,
        train_epoch=lambda state, epoch: trainer.run_epoch(state, train, epoch),
        validate=lambda state: trainer.evaluate(state, validation),
        epochs=cfg.max_epochs,
        monitor="validation_loss",
        phase="train_head",
        steps_per_epoch=trainer.steps_per_epoch,
        # A head is small: the best epoch's parameters are held in memory, not checkpointed.
        callbacks=[
            EarlyStopping(cfg.patience),
            KeepBestInMemory(),
            ReportEpochs(on_epoch=on_epoch_end),
        ],
    )
    nnx.update(head, best_params)
    return history


def _ridge_sample_weights(balance: ClassBalance, labels: np.ndarray) -> np.ndarray | None:
    """Per-example weights of the ridge fit: the class weights of ``weights``, and for
    ``sampler`` inverse class frequencies (what a class-balanced draw amounts to when
    every example is seen at once); None otherwise."""
    weights = balance.loss_weights()
    if weights is None and balance.balanced_sampling:
        weights = inverse_frequency_weights(balance.class_counts)
    return None if weights is None else np.asarray(weights, np.float64)[labels]


def fit_ridge_head(
    head: Head,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    *,
    balance: ClassBalance = NO_REMEDY,
    on_epoch_end: EpochCallback | None = None,
) -> History:
    """``train_head.head: ridge``: the linear ``head`` fitted in closed form, in place.

    Ridge regression onto one-hot labels, its penalty chosen by exact leave-one-out on
    train (:func:`tlflax.ridge.fit_ridge`, the advisor's probe), its scores scaled into
    logits by the factor that fits the leave-one-out scores best (:func:`fit_temperature`).
    Validation only scores. Remedies for imbalance: ``weights`` and ``sampler`` weigh the
    examples in the fit; ``logit_adjustment`` subtracts ``tau * log(prior)`` from the
    logits afterwards (the post-hoc form of Menon et al., 2021).

    Returns:
      A history of one epoch: cross-entropy on train and validation, validation accuracy.
    """
    if head.kind == "mlp":
        raise ValueError("a ridge fit needs a linear head")
    labels = np.asarray(train["label"])
    num_classes = head.output.kernel.value.shape[1]
    sample_weights = _ridge_sample_weights(balance, labels)
    fit = fit_ridge(train["features"], labels, num_classes, sample_weights)
    factor = fit_temperature(fit.leave_one_out_scores, labels, sample_weights)
    offsets = balance.loss_logit_offsets()
    bias = factor * fit.bias - (0.0 if offsets is None else offsets)
    kernel = head.output.kernel.value
    head.output.kernel.value = jnp.asarray(factor * fit.weights, kernel.dtype)
    head.output.bias.value = jnp.asarray(bias, kernel.dtype)

    def logits(features: np.ndarray) -> np.ndarray:
        return np.asarray(head(jnp.asarray(features, kernel.dtype)), np.float64)

    validation_logits = logits(validation["features"])
    metrics = {
        "train_loss": mean_cross_entropy(logits(train["features"]), labels),
        "validation_loss": mean_cross_entropy(validation_logits, validation["label"]),
        "validation_accuracy": float(
            np.mean(validation_logits.argmax(axis=1) == validation["label"])
        ),
    }
    history = History(epochs=[metrics])
    history.improves(metrics, "validation_loss", 0)
    if on_epoch_end is not None:
        on_epoch_end(0, metrics)
    return history
