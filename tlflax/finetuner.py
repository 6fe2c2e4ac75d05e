"""Fine-tuning of backbone + head, and training the same network from scratch.

The model is split once into trainable / frozen / other state, and the jitted step
differentiates only the trainable part: frozen weights cost no gradient compute.
:func:`run_finetuning` drives :class:`Finetuner` through the one epoch loop of
:mod:`tlflax.loop`, with :class:`Checkpointing` for Orbax checkpoints and resume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from tlflax.balance import NO_REMEDY, ClassBalance
from tlflax.checkpoint import TrainingCheckpoints, score
from tlflax.config import FinetuneParams, ParamsError
from tlflax.data.pipeline import cutmix_images, iterate_batches, num_batches
from tlflax.distributed import process_shard, put_replicated
from tlflax.loop import (
    Callback,
    EarlyStopping,
    EpochCallback,
    History,
    ReportEpochs,
    check_finite_loss,
    fit_epochs,
)
from tlflax.models.layers import set_batchnorm_modes, set_batchnorm_training
from tlflax.optim import make_optimizer, warmup_cosine
from tlflax.train import (
    Forward,
    add_counts,
    batch_counts,
    ema_decay_at,
    finish_counts,
    masked_cross_entropy,
    mixed_cross_entropy,
)
from tlflax.transfer import ParamSetting, model_settings, trainable_filter


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
        balance: ClassBalance = NO_REMEDY,
    ):
        self.cfg = cfg
        self.forward = forward
        # The remedy for imbalanced training data (tlflax.balance): loss weights, logit
        # offsets or class-balanced epochs; NO_REMEDY trains exactly as before it existed.
        self.balance = balance
        self.class_weights = balance.loss_weights()
        self.logit_offsets = balance.loss_logit_offsets()
        trainable, frozen, rest = self._split(model, group_patterns, backbone_prefix)
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
        self.initial = self._initial_state(trainable, frozen, rest)
        self.train_step = jax.jit(self._train_step, donate_argnums=(0, 1, 3))
        self.eval_step = jax.jit(self._eval_step)
        self.ema_step = jax.jit(self._ema_step, donate_argnums=(0,))

    def _split(self, model: nnx.Module, group_patterns: list[str], backbone_prefix: str):
        """Resolve each parameter's setting from the rules and split the model once into
        (trainable params, frozen params, other state)."""
        cfg = self.cfg
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
        return trainable, frozen, rest

    def _initial_state(self, trainable, frozen, rest) -> FinetuneState:
        """The run's start, placed on every device of every process (tlflax.distributed)."""
        cfg = self.cfg
        # Data parallelism: weights replicated, batches split on their first axis; jit
        # partitions the step (GSPMD). On one device this changes nothing.
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        if cfg.batch_size % self.mesh.size:
            raise ParamsError(
                f"'finetune.batch_size' ({cfg.batch_size}) must be a multiple of the number of "
                f"devices ({self.mesh.size}) for data parallelism"
            )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split_batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        trainable, frozen, rest, opt_state, key = put_replicated(
            (trainable, frozen, rest, self.tx.init(trainable), jax.random.key(cfg.seed)),
            self.replicated,
        )
        ema = jax.tree_util.tree_map(jnp.copy, trainable) if cfg.ema_decay else None
        return FinetuneState(trainable, frozen, rest, opt_state, 0, key, ema)

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

        loss_options = {
            "label_smoothing": self.cfg.label_smoothing,
            "class_weights": self.class_weights,
            # The reported train_loss is on adjusted logits under logit_adjustment;
            # _eval_step (validation, early stopping) scores the plain logits.
            "logit_offsets": self.logit_offsets,
        }
        cutmix = self.cfg.augment.cutmix
        if cutmix:
            # Images only (the params refuse it for other data); a key of its own, so the
            # forward pass's augmentation and dropout draw what they drew without it.
            mixed, partner, partner_share = cutmix_images(
                jax.random.fold_in(key, 1), batch["image"], batch["mask"], cutmix
            )
            batch = {**batch, "image": mixed}

        def loss_fn(model):
            logits = self.forward(model, batch, True, key).astype(jnp.float32)
            if cutmix:
                return mixed_cross_entropy(
                    logits,
                    batch["label"],
                    batch["label"][partner],
                    partner_share,
                    batch["mask"],
                    **loss_options,
                )
            return masked_cross_entropy(logits, batch["label"], batch["mask"], **loss_options)

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

    def _global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows joined with the other processes' into one batch on the mesh."""
        return jax.make_array_from_process_local_data(self.split_batch, batch)

    def evaluate(self, state: FinetuneState, arrays: dict[str, np.ndarray], batch_size: int):
        totals: dict[str, float] = {}
        batches = iterate_batches(arrays, batch_size, shuffle=False, seed=0, shard=process_shard())
        for batch in batches:
            counts = self.eval_step(
                self.weights(state), state.frozen, state.rest, self._global_batch(batch)
            )
            add_counts(totals, counts)
        return finish_counts(totals)

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
            balanced=self.balance.balanced_sampling,
            shard=process_shard(),
        )
        num_examples = len(train["label"])
        steps = self.steps_per_epoch(num_examples)
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
            batch = self._global_batch(batch)
            key, step_key = jax.random.split(key)
            trainable, opt_state, rest, loss = self.train_step(
                trainable, opt_state, state.frozen, rest, batch, step_key
            )
            if ema is not None:
                ema = self.ema_step(ema, trainable, jnp.asarray(first_step + step))
            loss = float(loss)
            check_finite_loss(loss, "finetune", state.epoch, step)
            # Real rows of the global batch (this process holds only its part of the mask).
            count = float(min(self.cfg.batch_size, num_examples - step * self.cfg.batch_size))
            total_loss, total_count = total_loss + loss * count, total_count + count
        new_state = FinetuneState(
            trainable, state.frozen, rest, opt_state, state.epoch + 1, key, ema
        )
        return new_state, total_loss / max(total_count, 1.0)


class Checkpointing(Callback[FinetuneState]):
    """Orbax checkpoints of every epoch (latest + best N), resume, and the best epoch at the end.

    A run killed mid-way and started again continues from its last finished epoch with the
    same optimizer state and random key, so on CPU it ends with the same parameters as an
    uninterrupted run. What a log shows after an epoch is what a resume continues from: put
    this callback before the reporting one.
    """

    def __init__(self, checkpoints: TrainingCheckpoints):
        self.checkpoints = checkpoints

    @staticmethod
    def _tree(state: FinetuneState) -> dict[str, Any]:
        tree = {"trainable": state.trainable, "rest": state.rest, "opt_state": state.opt_state}
        return tree if state.ema is None else {**tree, "ema": state.ema}

    def _restore(self, step: int, state: FinetuneState, epoch: int | None = None):
        restored, progress = self.checkpoints.restore(step, self._tree(state))
        key = state.key
        if epoch is None:  # resuming: the key and epoch the run had reached
            epoch = progress["epoch"]
            key = put_replicated(  # placed where the fresh run's key is
                jax.random.wrap_key_data(np.asarray(progress["key"], np.uint32)), state.key.sharding
            )
        weights = (restored["trainable"], state.frozen, restored["rest"], restored["opt_state"])
        return FinetuneState(*weights, epoch, key, restored.get("ema")), progress

    def on_train_begin(self, state, history):
        latest = self.checkpoints.latest_step()
        if latest is None:
            return state, history
        state, progress = self._restore(latest, state)
        return state, History(**progress["history"])

    def on_epoch_end(self, epoch, state, metrics, history, improved) -> None:
        progress = {
            "epoch": state.epoch,
            "key": np.asarray(jax.random.key_data(state.key)).tolist(),
            "history": dataclasses.asdict(history),
        }
        self.checkpoints.save(epoch, self._tree(state), progress, metrics)

    def on_diverged(self) -> str:
        # The diverged state is never saved; the checkpoints already written stay.
        self.checkpoints.manager.wait_until_finished()
        last_good = self.checkpoints.latest_step()
        if last_good is None:
            return "no epoch finished, so there is no checkpoint to keep"
        return (
            f"the last good checkpoint, epoch {last_good}, is kept in {self.checkpoints.directory}"
        )

    def on_train_end(self, state, history):
        self.checkpoints.manager.wait_until_finished()
        best = self.checkpoints.best_step()
        if best is None or best == state.epoch - 1:
            return state
        return self._restore(best, state, epoch=best + 1)[0]


class KeepTheStart(Callback[FinetuneState]):
    """End on the start when no epoch beats it on validation (a tie keeps the start), or on
    the best mix of start and fine-tuned weights where ``finetune.weight_mixes`` lists some.

    A fine-tuning run starts from the new head on the pretrained network: a model the
    validation split already scores. On a small dataset fine-tuning can lose to it (the head
    fits the few training examples, and the backbone then drifts on a tiny error signal), and
    early stopping alone would still return the best *epoch*. This keeps what the run was
    given unless training really did better on validation. Weight mixes (WiSE-FT) go between
    the two: a model that keeps part of the pretrained features' generality. Put it after the
    checkpointing callback, whose end restores the best epoch.
    """

    def __init__(self, finetuner: Finetuner, validation_metrics: Callable[[FinetuneState], dict]):
        start = finetuner.initial
        self.finetuner = finetuner
        self.validation_metrics = validation_metrics
        self.metrics = self._prefixed(validation_metrics(start))
        # Copies in new buffers: the first train step donates the start's own (the copies
        # keep their placement, and random keys in `rest` stay keys).
        self.weights = jax.tree_util.tree_map(jnp.copy, (start.trainable, start.rest, start.ema))

    @staticmethod
    def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
        return {f"validation_{key}": value for key, value in metrics.items()}

    def _mix(self, state: FinetuneState, share: float) -> FinetuneState:
        """``(1 - share) * start + share * state``, leaf by leaf; what is not a float (random
        keys, counters) is the fine-tuned state's."""

        def mix(start, end):
            if end is None or not jnp.issubdtype(end.dtype, jnp.floating):
                return end
            return ((1.0 - share) * start + share * end).astype(end.dtype)

        trainable, rest, ema = self.weights
        mixed = jax.tree_util.tree_map(
            mix, (trainable, rest, ema), (state.trainable, state.rest, state.ema)
        )
        return dataclasses.replace(state, trainable=mixed[0], rest=mixed[1], ema=mixed[2])

    def on_train_end(self, state, history):
        monitor = self.finetuner.cfg.monitor
        end_metrics = history.epochs[history.best_epoch] if history.epochs else self.metrics
        candidates = [(0.0, self.metrics, None)]
        for share in sorted(set(self.finetuner.cfg.weight_mixes)):
            mixed = self._mix(state, share)
            candidates.append((share, self._prefixed(self.validation_metrics(mixed)), mixed))
        candidates.append((1.0, end_metrics, state))
        if len(candidates) > 2:
            history.weight_mixes = [
                {
                    "fine_tuned_share": share,
                    "validation_accuracy": metrics["validation_accuracy"],
                    "validation_loss": metrics["validation_loss"],
                }
                for share, metrics, _ in candidates
            ]
        # max keeps the first of equals: a tie goes to the smaller share, the start first.
        share, metrics, chosen = max(candidates, key=lambda c: score(c[1], monitor))
        if share == 0.0:
            history.kept_start = self.metrics
            trainable, rest, ema = self.weights
            return dataclasses.replace(state, trainable=trainable, rest=rest, ema=ema)
        if share < 1.0:
            history.kept_mix = {"fine_tuned_share": share, **metrics}
        return chosen


def run_finetuning(
    finetuner: Finetuner,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    checkpoints: TrainingCheckpoints,
    *,
    eval_batch_size: int,
    on_epoch_end: EpochCallback | None = None,
    on_history: Callable[[History], None] | None = None,
    name: str | None = None,
) -> tuple[FinetuneState, History]:
    """Fine-tune for ``cfg.epochs`` with early stopping; resumes from the latest checkpoint.

    Every epoch is checkpointed (latest + best N by ``cfg.monitor``, which the checkpoints
    must rank by too); then ``on_epoch_end(epoch, metrics)`` and ``on_history(history)`` see
    it (and ``name: epoch N: ...`` is printed where ``name`` is given). The start is scored
    on validation first: a pretrained start that no epoch beats is what the run returns
    (:class:`KeepTheStart`; not for ``strategy: scratch``, whose start is random).

    Returns:
      The state of the best epoch (restored from its checkpoint), or the start, and the
      history (``history.kept_start``: the start's validation metrics where it was kept).
    """
    cfg = finetuner.cfg
    if checkpoints.monitor != cfg.monitor:
        raise ValueError(
            f"the checkpoints rank epochs by {checkpoints.monitor} but the run monitors "
            f"{cfg.monitor}; create TrainingCheckpoints with monitor={cfg.monitor!r}"
        )
    # Patience counts from the end of the warmup at the earliest: while the learning rate is
    # still rising, the validation loss of a pretrained network typically gets worse before it
    # gets better, and stopping there would keep the start, not the fine-tuned model.
    last_warmup_epoch = math.ceil(cfg.warmup_fraction * cfg.epochs) - 1

    def validate(state: FinetuneState) -> dict[str, float]:
        return finetuner.evaluate(state, validation, eval_batch_size)

    keep_the_start = [] if cfg.strategy == "scratch" else [KeepTheStart(finetuner, validate)]
    state, history = fit_epochs(
        finetuner.initial,
        train_epoch=lambda state, epoch: finetuner.run_epoch(state, train),
        validate=validate,
        epochs=cfg.epochs,
        monitor=cfg.monitor,
        phase="finetune",
        steps_per_epoch=finetuner.steps_per_epoch(len(train["label"])),
        callbacks=[
            EarlyStopping(cfg.patience, counts_from_epoch=last_warmup_epoch),
            Checkpointing(checkpoints),
            *keep_the_start,
            ReportEpochs(name, on_epoch_end, on_history),
        ],
    )
    if name and history.kept_start is not None:
        print(
            f"{name}: no epoch beat the start on {cfg.monitor} "
            f"({history.kept_start[cfg.monitor]:.4f}): the start is kept"
        )
    if name and history.kept_mix is not None:
        print(
            f"{name}: the mix of {history.kept_mix['fine_tuned_share']:g} fine-tuned and "
            f"{1 - history.kept_mix['fine_tuned_share']:g} start weights leads on {cfg.monitor} "
            f"({history.kept_mix[cfg.monitor]:.4f}): it is kept"
        )
    return state, history
