"""Training: the new head on cached features, then fine-tuning of backbone + head.

Read top to bottom:
  1. losses and metrics shared by every phase;
  2. head training on cached backbone features (feature extraction);
  3. fine-tuning: the model is split once into trainable / frozen / other state, and the jitted
     step differentiates only the trainable part - frozen weights cost no gradient compute;
  4. prediction over a dataset (used by evaluation).

Steps are plain ``jax.jit`` functions over (graphdef, state) rather than ``nnx.jit``: the split
happens once per run, so the per-step Python overhead is that of a pure function call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from tlflax.checkpoint import TrainingCheckpoints, score
from tlflax.config import FinetuneParams, ParamsError, TrainHeadParams, TransferRule
from tlflax.data.pipeline import iterate_batches, num_batches
from tlflax.models.heads import Head
from tlflax.models.layers import set_batchnorm_modes, set_batchnorm_training
from tlflax.optim import make_optimizer, warmup_cosine
from tlflax.transfer import (
    ParamSetting,
    model_settings,
    parameter_names,
    resolve_settings,
    trainable_filter,
)

Batch = dict[str, jax.Array]
# forward(model, batch, train, key) -> logits. It holds the input handling of one modality
# (image resize and augmentation, or token ids and masks), so the loop below serves both.
Forward = Callable[[nnx.Module, Batch, bool, jax.Array | None], jax.Array]
EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The training or validation loss became NaN or Inf; the message names epoch and step.

    A ``FloatingPointError``, so a caller can handle it without importing this module.
    """


# --------------------------------------------------------------------------------------------
# 1. Losses and metrics
# --------------------------------------------------------------------------------------------


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean cross-entropy over the real rows of a padded batch.

    ``label_smoothing`` moves that much of each target's mass evenly onto all classes
    (Szegedy et al., 2016): the loss stops rewarding ever larger logits, which on a few
    hundred examples is one way a network memorises them.
    """
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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


def _finish(counts: dict[str, float]) -> dict[str, float]:
    count = max(counts["count"], 1.0)
    return {"loss": counts["loss_sum"] / count, "accuracy": counts["correct"] / count}


def _add(total: dict[str, float], counts: dict[str, jax.Array]) -> dict[str, float]:
    for key, value in counts.items():
        total[key] = total.get(key, 0.0) + float(value)
    return total


@dataclass
class History:
    """Per-epoch metrics of one training phase, plus where the best epoch was."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    # The best epoch's monitored metric as a score, higher is better (tlflax.checkpoint.score).
    best_score: float = -math.inf
    stopped_early: bool = False

    def summary(self) -> dict[str, float | int | bool]:
        """Where the run ended and its best epoch's validation scores (a metrics file)."""
        best = self.epochs[self.best_epoch]
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.epochs),
            "stopped_early": self.stopped_early,
            "validation_accuracy": best["validation_accuracy"],
            "validation_loss": best["validation_loss"],
        }

    def improves(self, metrics: dict[str, float], monitor: str, epoch: int) -> bool:
        """Record ``metrics`` of ``epoch`` as the best if its ``monitor`` beats the best so far."""
        candidate = score(metrics, monitor)
        if candidate <= self.best_score:
            return False
        self.best_score, self.best_epoch = candidate, epoch
        return True


_DIVERGED_HINT = "lower the learning rate or check the input data"


def _check_finite(loss: float, phase: str, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"{phase}: training loss became {loss} at epoch {epoch}, step {step}; "
            f"stopping ({_DIVERGED_HINT})"
        )


def _check_finite_validation(loss: float, phase: str, epoch: int, steps: int) -> None:
    # The training loss of a step is computed before its update: weights that the last
    # update of an epoch blew up show first in the validation loss.
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"{phase}: validation loss became {loss} after epoch {epoch} (step {steps} of "
            f"training): the weights diverged; stopping ({_DIVERGED_HINT})"
        )


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


def train_head(
    head: Head,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    cfg: TrainHeadParams,
    *,
    on_epoch_end: EpochCallback | None = None,
) -> History:
    """Train ``head`` in place on cached features, keeping the weights of the best epoch.

    Args:
      head: a freshly created head; updated in place to the best validation epoch.
      train, validation: ``{"features": (N, D) float32, "label": (N,) int}``.
      cfg: the ``train_head`` section of params.yaml.
      on_epoch_end: called with (epoch, metrics) after each epoch (e.g. dvclive logging).

    Returns:
      The per-epoch history; early stopping watches the validation loss.
    """
    graphdef, params = nnx.split(head, nnx.Param)
    names = parameter_names(params)
    ndims = {n: leaf.ndim for n, leaf in zip(names, jax.tree_util.tree_leaves(params), strict=True)}
    settings = resolve_settings(names, [TransferRule(pattern=".*")], ndims=ndims)
    steps_per_epoch = num_batches(len(train["label"]), cfg.batch_size, drop_remainder=False)
    schedule = warmup_cosine(cfg.learning_rate, steps_per_epoch * cfg.max_epochs, 0.0)
    tx = make_optimizer(
        params, settings, schedule, weight_decay=cfg.weight_decay, gradient_clip_norm=None
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch, key):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(batch["features"], dropout_key=key)
            return masked_cross_entropy(logits, batch["label"], batch["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_step(params, batch):
        logits = nnx.merge(graphdef, params)(batch["features"])
        return batch_counts(logits, batch["label"], batch["mask"])

    history = History()
    best_params = params
    key = jax.random.key(cfg.seed)
    for epoch in range(cfg.max_epochs):
        totals: dict[str, float] = {}
        for step, batch in enumerate(
            iterate_batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)
        ):
            key, step_key = jax.random.split(key)
            params, opt_state, loss = train_step(params, opt_state, batch, step_key)
            _check_finite(float(loss), "train_head", epoch, step)
            _add(totals, {"loss_sum": loss * batch["mask"].sum(), "count": batch["mask"].sum()})
        validation_counts: dict[str, float] = {}
        for batch in iterate_batches(validation, cfg.batch_size, shuffle=False, seed=0):
            _add(validation_counts, eval_step(params, batch))
        metrics = {"train_loss": totals["loss_sum"] / totals["count"]}
        metrics.update({f"validation_{k}": v for k, v in _finish(validation_counts).items()})
        _check_finite_validation(
            metrics["validation_loss"], "train_head", epoch, (epoch + 1) * steps_per_epoch
        )
        history.epochs.append(metrics)
        if on_epoch_end:
            on_epoch_end(epoch, metrics)
        if history.improves(metrics, "validation_loss", epoch):
            best_params = params
        elif epoch - history.best_epoch >= cfg.patience:
            history.stopped_early = True
            break
    nnx.update(head, best_params)
    return history


# --------------------------------------------------------------------------------------------
# 3. Fine-tuning
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneState:
    """Everything a fine-tuning run needs to continue exactly where it stopped."""

    trainable: nnx.State
    frozen: nnx.State
    rest: nnx.State
    opt_state: Any
    epoch: int
    key: jax.Array
    # Exponential moving average of the trainable weights (``finetune.ema_decay``): what is
    # validated and saved when set; None otherwise.
    ema: nnx.State | None = None


class Finetuner:
    """Fine-tunes a model whose parameters are grouped by ``finetune.rules``.

    The model is split once into (trainable params, frozen params, other state). The train
    step differentiates the trainable tree alone, so XLA never builds the backward pass of
    a frozen layer's weights (Optax masking alone would still compute those gradients).
    """

    def __init__(
        self,
        model: nnx.Module,
        forward: Forward,
        cfg: FinetuneParams,
        *,
        num_train_examples: int,
        group_patterns: list[str],
        backbone_prefix: str = "backbone/",
    ):
        self.cfg = cfg
        resolved = model_settings(
            model,
            cfg.rules,
            group_patterns=group_patterns,
            layer_lr_decay=cfg.layer_lr_decay,
            gradual_unfreezing=cfg.gradual_unfreezing,
            backbone_prefix=backbone_prefix,
        )
        self.sizes = resolved.sizes
        self.settings: dict[str, ParamSetting] = resolved.settings
        self.is_trainable = trainable_filter(self.settings)
        # Two programs over the same state: training normalises with batch statistics in the
        # BatchNorm layers that train (`batchnorm: train`), evaluation always with the running
        # statistics the saved model is evaluated with - so validation, early stopping and the
        # saved-epoch choice judge the model that is saved.
        self.trained_batchnorms = set_batchnorm_modes(model, self.settings, cfg.batchnorm)
        self.graphdef, trainable, frozen, rest = nnx.split(model, self.is_trainable, nnx.Param, ...)
        set_batchnorm_training(model, False)
        self.eval_graphdef = nnx.split(model, self.is_trainable, nnx.Param, ...)[0]
        if not jax.tree_util.tree_leaves(trainable):
            raise ParamsError("'finetune.rules' freeze every parameter: nothing would be trained")
        # Batch statistics of a padded batch would count its padding rows: while BatchNorm
        # trains, the last partial batch of an epoch is dropped instead (a different one each
        # epoch, as the order is shuffled), as timm's and PyTorch's drop_last do.
        self.drop_remainder = bool(self.trained_batchnorms)
        steps_per_epoch = self.steps_per_epoch(num_train_examples)
        if steps_per_epoch == 0:
            raise ParamsError(
                f"'finetune.batch_size' ({cfg.batch_size}; 'train_scratch.batch_size' for the "
                f"from-scratch run) is larger than the {num_train_examples} training examples, "
                "and BatchNorm trains on full batches only; lower it"
            )
        self.schedule = warmup_cosine(
            cfg.learning_rate, steps_per_epoch * cfg.epochs, cfg.warmup_fraction
        )
        self.tx = make_optimizer(
            trainable,
            self.settings,
            self.schedule,
            weight_decay=cfg.weight_decay,
            gradient_clip_norm=cfg.gradient_clip_norm,
            steps_per_epoch=steps_per_epoch,
        )
        # Data parallelism over every local device: weights replicated, batches split on their
        # first axis; jit partitions the step (GSPMD). On one device this changes nothing.
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        if cfg.batch_size % self.mesh.size:
            raise ParamsError(
                f"'finetune.batch_size' ({cfg.batch_size}) must be a multiple of the number of "
                f"devices ({self.mesh.size}) for data parallelism"
            )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split_batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        trainable, frozen, rest, opt_state = jax.device_put(
            (trainable, frozen, rest, self.tx.init(trainable)), self.replicated
        )
        ema = None
        if cfg.ema_decay:
            ema = jax.tree_util.tree_map(jnp.copy, trainable)
        self.initial = FinetuneState(
            trainable, frozen, rest, opt_state, 0, jax.random.key(cfg.seed), ema
        )
        self.train_step = jax.jit(self._train_step, donate_argnums=(0, 1, 3))
        self.eval_step = jax.jit(self._eval_step)
        self.ema_step = jax.jit(self._ema_step, donate_argnums=(0,))
        self.forward = forward

    # The step functions close over graphdef, optimizer and forward: all static per run.
    def _merge(self, trainable, frozen, rest) -> nnx.Module:
        return nnx.merge(self.graphdef, trainable, frozen, rest)

    def _for_compute(self, tree):
        """Floating leaves in the compute dtype (bfloat16 for mixed precision, else as is)."""
        if self.compute_dtype == jnp.float32:
            return tree
        return jax.tree_util.tree_map(
            lambda x: x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            tree,
        )

    def _train_step(self, trainable, opt_state, frozen, rest, batch, key):
        # Mixed precision: the forward and backward run on bfloat16 copies of the float32
        # master weights; gradients, the optimizer and the loss stay float32.
        model = self._merge(*self._for_compute((trainable, frozen, rest)))

        def loss_fn(model):
            logits = self.forward(model, batch, True, key).astype(jnp.float32)
            return masked_cross_entropy(
                logits, batch["label"], batch["mask"], self.cfg.label_smoothing
            )

        # nnx.value_and_grad with a DiffState filter differentiates the trainable variables
        # only, and lets stateful layers (dropout RNG counters, BatchNorm statistics) update.
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, self.is_trainable))(
            model
        )
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, trainable)
        updates, opt_state = self.tx.update(grads, opt_state, trainable)
        new_rest = jax.tree_util.tree_map(
            lambda new, old: new.astype(old.dtype), nnx.state(model, nnx.Not(nnx.Param)), rest
        )
        return optax.apply_updates(trainable, updates), opt_state, new_rest, loss

    def _ema_step(self, ema, trainable, step):
        decay = ema_decay_at(step, self.cfg.ema_decay)
        return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, trainable)

    def _eval_step(self, trainable, frozen, rest, batch):
        model = nnx.merge(self.eval_graphdef, *self._for_compute((trainable, frozen, rest)))
        logits = self.forward(model, batch, False, None).astype(jnp.float32)
        return batch_counts(logits, batch["label"], batch["mask"])

    def model(self, state: FinetuneState) -> nnx.Module:
        """The NNX model holding ``state``'s weights (their moving average where
        ``ema_decay`` is set), in inference mode (running statistics)."""
        return nnx.merge(self.eval_graphdef, self.weights(state), state.frozen, state.rest)

    @staticmethod
    def weights(state: FinetuneState) -> nnx.State:
        """The trainable weights that are validated and saved: the EMA's where there is one."""
        return state.trainable if state.ema is None else state.ema

    def steps_per_epoch(self, num_examples: int) -> int:
        """Train steps in one epoch over ``num_examples``."""
        return num_batches(num_examples, self.cfg.batch_size, self.drop_remainder)

    def evaluate(self, state: FinetuneState, arrays: dict[str, np.ndarray], batch_size: int):
        totals: dict[str, float] = {}
        for batch in iterate_batches(arrays, batch_size, shuffle=False, seed=0):
            batch = jax.device_put(batch, self.split_batch)
            _add(totals, self.eval_step(self.weights(state), state.frozen, state.rest, batch))
        return _finish(totals)

    def run_epoch(
        self, state: FinetuneState, train: dict[str, np.ndarray], *, progress: bool = True
    ) -> tuple[FinetuneState, float]:
        """One pass over ``train``; returns the new state and the mean training loss."""
        total_loss, total_count = 0.0, 0.0
        batches = iterate_batches(
            train,
            self.cfg.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            epoch=state.epoch,
            drop_remainder=self.drop_remainder,
        )
        steps = self.steps_per_epoch(len(train["label"]))
        trainable, opt_state, rest, key = state.trainable, state.opt_state, state.rest, state.key
        ema, first_step = state.ema, state.epoch * steps
        bar = tqdm(
            batches,
            total=steps,
            desc=f"finetune epoch {state.epoch}",
            unit="batch",
            disable=None if progress else True,
            leave=False,
        )
        for step, batch in enumerate(bar):
            batch = jax.device_put(batch, self.split_batch)
            key, step_key = jax.random.split(key)
            trainable, opt_state, rest, loss = self.train_step(
                trainable, opt_state, state.frozen, rest, batch, step_key
            )
            if ema is not None:
                ema = self.ema_step(ema, trainable, jnp.asarray(first_step + step))
            loss = float(loss)
            _check_finite(loss, "finetune", state.epoch, step)
            count = float(batch["mask"].sum())
            total_loss, total_count = total_loss + loss * count, total_count + count
        new_state = FinetuneState(
            trainable, state.frozen, rest, opt_state, state.epoch + 1, key, ema
        )
        return new_state, total_loss / max(total_count, 1.0)


def _checkpoint_state(state: FinetuneState) -> dict[str, Any]:
    tree = {"trainable": state.trainable, "rest": state.rest, "opt_state": state.opt_state}
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


def run_finetuning(
    finetuner: Finetuner,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    checkpoints: TrainingCheckpoints,
    *,
    eval_batch_size: int,
    on_epoch_end: EpochCallback | None = None,
    on_history: Callable[[History], None] | None = None,
) -> tuple[FinetuneState, History]:
    """Fine-tune for ``cfg.epochs`` with early stopping; resumes from the latest checkpoint.

    Every epoch is checkpointed (latest + best N by ``cfg.monitor``, which the checkpoints
    must rank by too); then ``on_epoch_end(epoch, metrics)`` and ``on_history(history)`` see
    it. A run killed mid-way and
    started again continues from its last finished epoch with the same optimizer state and
    random key, so on CPU it ends with the same parameters as an uninterrupted run.

    Returns:
      The state of the best epoch (restored from its checkpoint) and the history.
    """
    cfg = finetuner.cfg
    if checkpoints.monitor != cfg.monitor:
        raise ValueError(
            f"the checkpoints rank epochs by {checkpoints.monitor} but the run monitors "
            f"{cfg.monitor}; create TrainingCheckpoints with monitor={cfg.monitor!r}"
        )
    state = finetuner.initial
    history = History()
    latest = checkpoints.latest_step()
    if latest is not None:
        restored, progress = checkpoints.restore(latest, _checkpoint_state(state))
        state = FinetuneState(
            restored["trainable"],
            state.frozen,
            restored["rest"],
            restored["opt_state"],
            progress["epoch"],
            jax.random.wrap_key_data(np.asarray(progress["key"], np.uint32)),
            restored.get("ema"),
        )
        history = History(**progress["history"])
    steps_per_epoch = finetuner.steps_per_epoch(len(train["label"]))
    # Patience counts from the end of the warmup at the earliest: while the learning rate is
    # still rising, the validation loss of a pretrained network typically gets worse before it
    # gets better, and stopping there would keep the start, not the fine-tuned model.
    last_warmup_epoch = math.ceil(cfg.warmup_fraction * cfg.epochs) - 1
    while state.epoch < cfg.epochs and not history.stopped_early:
        epoch = state.epoch
        try:
            state, train_loss = finetuner.run_epoch(state, train)
            validation_metrics = finetuner.evaluate(state, validation, eval_batch_size)
            _check_finite_validation(
                validation_metrics["loss"], "finetune", epoch, (epoch + 1) * steps_per_epoch
            )
        except NonFiniteLossError as error:
            # The diverged state is never saved; the checkpoints already written stay.
            checkpoints.manager.wait_until_finished()
            last_good = checkpoints.latest_step()
            kept = (
                f"the last good checkpoint, epoch {last_good}, is kept in {checkpoints.directory}"
                if last_good is not None
                else "no epoch finished, so there is no checkpoint to keep"
            )
            raise NonFiniteLossError(f"{error}; {kept}") from None
        metrics = {"train_loss": train_loss}
        metrics.update({f"validation_{k}": v for k, v in validation_metrics.items()})
        history.epochs.append(metrics)
        if not history.improves(metrics, cfg.monitor, epoch) and (
            epoch - max(history.best_epoch, last_warmup_epoch) >= cfg.patience
        ):
            history.stopped_early = True
        progress = {
            "epoch": state.epoch,
            "key": np.asarray(jax.random.key_data(state.key)).tolist(),
            "history": dataclasses.asdict(history),
        }
        checkpoints.save(epoch, _checkpoint_state(state), progress, metrics)
        # Reported after the save is issued, so what a log shows is what a resume continues from.
        if on_epoch_end:
            on_epoch_end(epoch, metrics)
        if on_history:  # every epoch so far, those a resumed run restored included
            on_history(history)
    checkpoints.manager.wait_until_finished()
    best = checkpoints.best_step()
    if best is not None and best != state.epoch - 1:
        restored, _ = checkpoints.restore(best, _checkpoint_state(state))
        state = FinetuneState(
            restored["trainable"],
            state.frozen,
            restored["rest"],
            restored["opt_state"],
            best + 1,
            state.key,
            restored.get("ema"),
        )
    return state, history
