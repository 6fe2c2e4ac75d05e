"""The advisor's evidence: what the frozen backbone's probes measure on the target data.

Every comparison of two probes is McNemar's paired test on the same validation examples
(:class:`tlflax.probes.PairedTest`); :mod:`tlflax.advisor` explains why. The rules that turn
this evidence into a recommendation are in :mod:`tlflax.advice_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from flax import nnx

from tlflax.probes import (
    DepthProbe,
    PairedTest,
    PooledAfterEachGroup,
    features_by_depth,
    paired_test,
    probe_depths,
)

# What a comparison of two probes decides: whether the top groups lose accuracy
# (similarity), where accuracy stops growing (plateau), whether pretraining helps, and which
# candidate backbone to use (tlflax.backbone_choice).
Call = Literal["similarity", "plateau", "pretraining", "backbone"]


@dataclass(frozen=True)
class Evidence:
    """What the advisor measured; the properties are the quantities its rules compare."""

    num_classes: int
    train_examples: int
    train_examples_per_class: int  # of the rarest class
    probed_train_examples: int
    validation_examples: int
    majority_accuracy: float  # validation share of its most frequent class
    pretrained: tuple[DepthProbe, ...]
    # Probes of the same architecture with random weights; measured only with large data,
    # where training from scratch is a candidate.
    random_init: tuple[DepthProbe, ...] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.pretrained)

    @property
    def best(self) -> DepthProbe:
        """The best depth (the shallowest of equals)."""
        return max(self.pretrained, key=lambda probe: (probe.validation_accuracy, -probe.groups))

    @property
    def top(self) -> DepthProbe:
        return self.pretrained[-1]

    @property
    def top_deficit(self) -> float:
        """How much accuracy the top groups lose after the best depth (0 if they lose none)."""
        return self.best.validation_accuracy - self.top.validation_accuracy

    @property
    def random_init_best(self) -> DepthProbe | None:
        """The best random-init depth (the shallowest of equals; None when not measured)."""
        if not self.random_init:
            return None
        return max(self.random_init, key=lambda probe: (probe.validation_accuracy, -probe.groups))

    @property
    def pretraining_gain(self) -> float | None:
        """Best pretrained probe minus best random-init probe (None when not measured)."""
        random_best = self.random_init_best
        if random_best is None:
            return None
        return self.best.validation_accuracy - random_best.validation_accuracy


def depth_label(probe: DepthProbe, weights: str = "") -> str:
    """A probe's name in reports: 'depth 14 (blocks/12)', or 'random-init depth 14 (...)'."""
    return f"{weights + ' ' if weights else ''}depth {probe.groups} ({probe.group_name})"


@dataclass(frozen=True)
class Comparison:
    """One comparison a decision rests on: is ``better`` really more accurate than ``worse``?

    ``better`` is the probe the call expects to be ahead (the best depth against a shallower
    depth or the top; pretrained against random init). Its lead is *real* only when it is
    larger than ``min_difference`` (smaller leads do not matter for the decision) AND
    McNemar's paired test on the ``test.discordant`` examples the two disagree on rejects
    equal accuracy at ``significance`` (otherwise the validation set cannot tell them apart).
    The test is two-sided: ``better`` is picked after looking at the same accuracies.
    """

    call: Call
    better: str
    worse: str
    test: PairedTest
    min_difference: float
    significance: float
    real: bool

    def summary(self) -> str:
        """'on 200 validation examples they disagree on 14 (10 vs 4), McNemar mid-p 0.118: ...'."""
        test = self.test
        verdict = "a real difference" if self.real else "not a real difference"
        return (
            f"on {test.examples} validation examples they disagree on {test.discordant} "
            f"({test.first_only_correct} vs {test.second_only_correct}), McNemar mid-p "
            f"{test.p_value:.3g}: {verdict} (needs > {self.min_difference} and "
            f"p < {self.significance})"
        )


class ScoredOnValidation(Protocol):
    """A probe scored on the validation examples: a depth's, or a candidate backbone's."""

    def correct(self) -> np.ndarray: ...


def compare(
    call: Call,
    better: ScoredOnValidation,
    worse: ScoredOnValidation,
    *,
    min_difference: float,
    significance: float,
    labels: tuple[str, str] | None = None,
) -> Comparison:
    """Whether ``better``'s lead over ``worse`` (same validation examples) is real.

    Args:
      call: the decision the comparison serves.
      better, worse: the two probes; ``better`` is the one expected ahead.
      min_difference: the accuracy lead that matters; smaller leads are not real.
      significance: the level McNemar's paired test must reach.
      labels: their names in the report (default, for depth probes: :func:`depth_label`).
    """
    test = paired_test(better.correct(), worse.correct())
    real = test.difference > min_difference and test.p_value < significance
    if labels is None:
        assert isinstance(better, DepthProbe) and isinstance(worse, DepthProbe)
        labels = (depth_label(better), depth_label(worse))
    better_label, worse_label = labels
    return Comparison(call, better_label, worse_label, test, min_difference, significance, real)


def count_per_class(labels: np.ndarray, num_classes: int) -> int:
    """Examples of the rarest class."""
    return int(np.bincount(labels, minlength=num_classes).min())


def measure(
    backbone: nnx.Module,
    pooled_after_each_group: PooledAfterEachGroup,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    *,
    num_classes: int,
    batch_size: int,
    all_train_labels: np.ndarray | None = None,
    random_init: nnx.Module | None = None,
) -> tuple[Evidence, dict[str, list[np.ndarray]]]:
    """Probe every depth of ``backbone`` (and of ``random_init``, if given) on this data.

    Args:
      backbone: the pretrained backbone.
      pooled_after_each_group: (backbone, batch) -> pooled activations after each group.
      train, validation: model inputs and ``label``; ``train`` may be a probed subset.
      num_classes: number of classes.
      batch_size: examples per forward call.
      all_train_labels: every training label, when ``train`` is a subset (sizes count them).
      random_init: the same architecture with random weights, the reference of "does
        pretraining help"; worth its forward pass only where training from scratch is a
        candidate.

    Returns:
      The evidence, and the pretrained features of each split by depth (the last depth is
      the pipeline's feature extraction).
    """
    all_labels = train["label"] if all_train_labels is None else all_train_labels
    splits = {"train": train, "validation": validation}

    def probes(model: nnx.Module) -> tuple[tuple[DepthProbe, ...], dict[str, list[np.ndarray]]]:
        features = features_by_depth(model, pooled_after_each_group, splits, batch_size=batch_size)
        found = probe_depths(
            features["train"],
            train["label"],
            features["validation"],
            validation["label"],
            num_classes=num_classes,
            group_patterns=model.group_patterns(),
        )
        return found, features

    pretrained, features = probes(backbone)
    evidence = Evidence(
        num_classes=num_classes,
        train_examples=len(all_labels),
        train_examples_per_class=count_per_class(all_labels, num_classes),
        probed_train_examples=len(train["label"]),
        validation_examples=len(validation["label"]),
        majority_accuracy=float(np.bincount(validation["label"]).max() / len(validation["label"])),
        pretrained=pretrained,
        random_init=probes(random_init)[0] if random_init is not None else None,
    )
    return evidence, features
