"""One epoch loop for every training phase, with callbacks.

:func:`fit_epochs` trains a new head on cached features (:func:`tlflax.train.train_head`),
fine-tunes, and trains the from-scratch reference (:func:`tlflax.finetuner.run_finetuning`)
alike. The loop itself only trains an epoch, validates, records the metrics and asks its
callbacks what to do; what differs between phases is a callback:

* :class:`EarlyStopping` - stop after ``patience`` epochs without a better monitored score;
* :class:`KeepBestInMemory` - end on the best epoch's state (heads: cheap to hold);
* :class:`tlflax.finetuner.Checkpointing` - save every epoch with Orbax, resume a killed run,
  end on the best checkpoint (whole networks: too large to hold a second copy);
* :class:`ReportEpochs` - print each epoch and hand it to a logger (dvclive, a notebook).

The training *state* is whatever the phase's ``train_epoch`` and ``validate`` functions pass
between them (a head's parameters and optimizer state, or a :class:`FinetuneState`): the loop
never looks inside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tlflax.checkpoint import score

State = TypeVar("State")
# on_epoch_end(epoch, metrics): e.g. dvclive logging, a progress line.
EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The training or validation loss became NaN or Inf; the message names epoch and step.

    A ``FloatingPointError``, so a caller can handle it without importing this module.
    """


_DIVERGED_HINT = "lower the learning rate or check the input data"


def check_finite_loss(loss: float, phase: str, epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when a training step's ``loss`` is NaN or Inf."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"{phase}: training loss became {loss} at epoch {epoch}, step {step}; "
            f"stopping ({_DIVERGED_HINT})"
        )


def check_finite_validation(loss: float, phase: str, epoch: int, steps: int) -> None:
    # The training loss of a step is computed before its update: weights that the last
    # update of an epoch blew up show first in the validation loss.
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"{phase}: validation loss became {loss} after epoch {epoch} (step {steps} of "
            f"training): the weights diverged; stopping ({_DIVERGED_HINT})"
        )


@dataclass
class History:
    """Per-epoch metrics of one training phase, plus where the best epoch was."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    # The best epoch's monitored metric as a score, higher is better (tlflax.checkpoint.score).
    best_score: float = -math.inf
    stopped_early: bool = False
    # The start's validation metrics, where no epoch beat it and the run ended on it
    # (fine-tuning: the new head on the pretrained network; see tlflax.finetuner).
    kept_start: dict[str, float] | None = None
    # Fine-tuning with weight mixes (``finetune.weight_mixes``): every candidate's share of the
    # fine-tuned weights (0: the start, 1: the best epoch) with its validation metrics, and
    # the one that ended the run where it is a mix of the two.
    weight_mixes: list[dict[str, float]] = field(default_factory=list)
    kept_mix: dict[str, float] | None = None

    def summary(self) -> dict[str, Any]:
        """Where the run ended and its best epoch's validation scores (a metrics file);
        ``best_epoch`` -1 and ``kept_start`` where the run ended on its start; with weight
        mixes, every candidate's scores and ``fine_tuned_share``, the share that was saved."""
        # The saved weights' share of the fine-tuned ones: 0 the start, 1 the best epoch.
        if self.kept_start is not None:
            best, ended = self.kept_start, {"best_epoch": -1, "kept_start": True}
            saved_share = 0.0
        elif self.kept_mix is not None:
            best, ended = self.kept_mix, {"best_epoch": self.best_epoch}
            saved_share = self.kept_mix["fine_tuned_share"]
        else:
            best, ended = self.epochs[self.best_epoch], {"best_epoch": self.best_epoch}
            saved_share = 1.0
        mixes: dict[str, Any] = (
            {"fine_tuned_share": saved_share, "weight_mixes": self.weight_mixes}
            if self.weight_mixes
            else {}
        )
        return {
            **ended,
            "epochs_run": len(self.epochs),
            "stopped_early": self.stopped_early,
            "validation_accuracy": best["validation_accuracy"],
            "validation_loss": best["validation_loss"],
            **mixes,
        }

    def improves(self, metrics: dict[str, float], monitor: str, epoch: int) -> bool:
        """Record ``metrics`` of ``epoch`` as the best if its ``monitor`` beats the best so far."""
        candidate = score(metrics, monitor)
        if candidate <= self.best_score:  # a tie keeps the earlier epoch
            return False
        self.best_score, self.best_epoch = candidate, epoch
        return True


class Callback(Generic[State]):
    """Hooks of :func:`fit_epochs`; each default leaves the run as it is."""

    def on_train_begin(self, state: State, history: History) -> tuple[State, History]:
        """Before the first epoch: may replace the start (a resumed run's state and history)."""
        return state, history

    def on_epoch_end(
        self, epoch: int, state: State, metrics: dict[str, float], history: History, improved: bool
    ) -> None:
        """After ``epoch`` is validated and recorded; ``improved``: it is the best so far.
        Setting ``history.stopped_early`` ends the run after this epoch."""

    def on_diverged(self) -> str | None:
        """The loss became NaN or Inf: what to add to the error (e.g. which checkpoint stays)."""
        return None

    def on_train_end(self, state: State, history: History) -> State:
        """After the last epoch: may replace the final state (e.g. by the best epoch's)."""
        return state


@dataclass
class EarlyStopping(Callback):
    """Stop once ``patience`` epochs in a row brought no better monitored score."""

    patience: int
    # Patience counts from this epoch at the earliest (fine-tuning: the end of the warmup).
    counts_from_epoch: int = -1

    def on_epoch_end(self, epoch, state, metrics, history, improved) -> None:
        if not improved and epoch - max(history.best_epoch, self.counts_from_epoch) >= (
            self.patience
        ):
            history.stopped_early = True


class KeepBestInMemory(Callback):
    """End on the state of the best epoch, held in memory (small models: a head)."""

    def __init__(self) -> None:
        self.best = None

    def on_epoch_end(self, epoch, state, metrics, history, improved) -> None:
        if improved:
            self.best = state

    def on_train_end(self, state, history):
        return state if self.best is None else self.best


@dataclass
class ReportEpochs(Callback):
    """Print each epoch's metrics and pass them on: ``on_epoch_end(epoch, metrics)`` as the
    epoch ends, ``on_history(history)`` with every epoch so far (a resumed run's too)."""

    name: str | None = None  # the phase's name in the printed line; None prints nothing
    on_epoch: EpochCallback | None = None
    on_history: Callable[[History], None] | None = None

    def on_epoch_end(self, epoch, state, metrics, history, improved) -> None:
        if self.name:
            values = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
            print(f"{self.name}: epoch {epoch}: {values}")
        if self.on_epoch:
            self.on_epoch(epoch, metrics)
        if self.on_history:
            self.on_history(history)


def fit_epochs(
    state: State,
    *,
    train_epoch: Callable[[State, int], tuple[State, float]],
    validate: Callable[[State], dict[str, float]],
    epochs: int,
    monitor: str,
    phase: str,
    steps_per_epoch: int,
    callbacks: Sequence[Callback] = (),
) -> tuple[State, History]:
    """Train up to ``epochs`` epochs; callbacks (in order) resume, stop, save and report.

    Args:
      state: the start of the run.
      train_epoch: ``(state, epoch) -> (state, mean training loss)``: one pass over the data.
      validate: ``state -> {"loss": .., "accuracy": ..}`` on the validation split.
      monitor: ``validation_loss`` or ``validation_accuracy``: what "the best epoch" means.
      phase: the phase's name in error messages.
      steps_per_epoch: to name the step in a divergence message.

    Returns:
      The final state (as the callbacks leave it: e.g. the best epoch's) and the history.

    Raises:
      NonFiniteLossError: a training or validation loss became NaN or Inf; the message adds
        what the callbacks kept (a checkpoint).
    """
    history = History()
    for callback in callbacks:
        state, history = callback.on_train_begin(state, history)
    epoch = len(history.epochs)
    while epoch < epochs and not history.stopped_early:
        try:
            state, train_loss = train_epoch(state, epoch)
            validation = validate(state)
            check_finite_validation(validation["loss"], phase, epoch, (epoch + 1) * steps_per_epoch)
        except NonFiniteLossError as error:
            notes = [note for callback in callbacks if (note := callback.on_diverged())]
            if not notes:
                raise
            raise NonFiniteLossError("; ".join([str(error), *notes])) from None
        metrics = {"train_loss": train_loss}
        metrics.update({f"validation_{key}": value for key, value in validation.items()})
        history.epochs.append(metrics)
        improved = history.improves(metrics, monitor, epoch)
        for callback in callbacks:
            callback.on_epoch_end(epoch, state, metrics, history, improved)
        epoch += 1
    for callback in callbacks:
        state = callback.on_train_end(state, history)
    return state, history
