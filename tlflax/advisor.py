"""Which way to transfer: measurements of the frozen backbone on the target data → advice.

Read top to bottom:
  1. evidence: training examples per class, the probe accuracy after every layer group
     (:mod:`tlflax.probes`), where it stops growing, how much the top groups lose, and -
     with large data - how much better pretrained features are than random-init ones;
  2. the decision rules (the seeds' four dataset-size x similarity scenarios) and the
     schedule rule (BiT-HyperRule);
  3. applying the advice to the finetune settings, where settings written in params.yaml win.

Why these measurements: a linear probe after group ``g`` says how task-relevant the
features computed so far are. Where the curve stops growing, the groups above it add
nothing the task can use (they are specialised to the pretraining data), so they are the
ones worth retraining; if the curve grows to the very top, the pretrained high-level
features fit the task (high similarity) and, with little data, training a head on them is
enough.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from flax import nnx

from tlflax.config import AdviseParams, FinetuneParams, TransferRule
from tlflax.probes import DepthProbe, PooledAfterEachGroup, features_by_depth, probe_depths

Strategy = Literal["feature_extraction", "top_k", "full", "scratch"]
# Layer-wise LR decay is chosen so that the lowest trained group learns at about this
# fraction of the head's rate, within the bounds below (0.8 for about 10 trained groups).
BOTTOM_GROUP_LR_FRACTION = 0.1
LAYER_LR_DECAY_BOUNDS = (0.7, 0.9)

# --------------------------------------------------------------------------------------------
# 1. Evidence (measured by tlflax.probes)
# --------------------------------------------------------------------------------------------


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

    def tolerance(self, floor: float) -> float:
        """Differences below this are noise: ``floor``, or the best accuracy's standard error."""
        accuracy = self.best.validation_accuracy
        standard_error = math.sqrt(accuracy * (1 - accuracy) / max(self.validation_examples, 1))
        return max(floor, standard_error)

    def plateau(self, tolerance: float) -> DepthProbe:
        """The shallowest depth within ``tolerance`` of the best: where growth stops."""
        target = self.best.validation_accuracy - tolerance
        return next(p for p in self.pretrained if p.validation_accuracy >= target)

    @property
    def pretraining_gain(self) -> float | None:
        """Best pretrained probe minus best random-init probe (None when not measured)."""
        if not self.random_init:
            return None
        random_best = max(probe.validation_accuracy for probe in self.random_init)
        return self.best.validation_accuracy - random_best


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


# --------------------------------------------------------------------------------------------
# 2. Decision rules and schedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A step budget: total steps, linear warmup, and the steps where the LR drops 10x."""

    steps: int
    warmup_steps: int
    decay_steps: tuple[int, ...]
    rule: str

    def epochs(self, num_examples: int, batch_size: int) -> int:
        """Epochs that cover ``steps`` at ``batch_size`` (the last batch of an epoch is padded)."""
        return max(1, math.ceil(self.steps / math.ceil(num_examples / batch_size)))

    def warmup_fraction(self) -> float:
        return self.warmup_steps / self.steps


def bit_hyperrule_schedule(num_examples: int) -> Schedule:
    """BiT-HyperRule (Kolesnikov et al. 2020): the fine-tuning budget from dataset size.

    Fewer than 20k examples: 500 steps; fewer than 500k: 10k steps; else 20k. Warmup and
    10x decay points as the paper's. The pipeline runs the same number of steps with its
    warmup + cosine schedule (the decay points are reported, not used).
    """
    if num_examples < 20_000:
        return Schedule(500, 100, (200, 300, 400), "BiT-HyperRule: < 20k examples")
    if num_examples < 500_000:
        return Schedule(10_000, 500, (3_000, 6_000, 9_000), "BiT-HyperRule: < 500k examples")
    return Schedule(20_000, 500, (6_000, 12_000, 18_000), "BiT-HyperRule: >= 500k examples")


def recommended_layer_lr_decay(trained_groups: int) -> float:
    """Decay so the lowest of ``trained_groups`` learns at ~10% of the head's rate, bounded."""
    if trained_groups == 0:
        return 1.0
    low, high = LAYER_LR_DECAY_BOUNDS
    return round(min(high, max(low, BOTTOM_GROUP_LR_FRACTION ** (1 / trained_groups))), 3)


@dataclass(frozen=True)
class Advice:
    """The recommendation, the evidence behind it and the thresholds that decided it."""

    strategy: Strategy
    unfreeze_groups: int  # backbone layer groups that train, counted from the top
    layer_lr_decay: float
    schedule: Schedule
    size_regime: Literal["small", "medium", "large"]
    similarity: Literal["high", "low"]
    tolerance: float
    reasons: tuple[str, ...]
    evidence: Evidence
    thresholds: AdviseParams = field(default_factory=AdviseParams)

    def lr_multipliers(self) -> list[tuple[str, float]]:
        """(layer group or 'head', learning-rate multiplier) for everything that trains."""
        if self.strategy == "scratch":
            return [("head", 1.0), ("every backbone group", 1.0)]
        names = [probe.group_name for probe in self.evidence.pretrained]
        trained = names[len(names) - self.unfreeze_groups :] if self.unfreeze_groups else []
        rows = [("head", 1.0)]
        for depth, name in enumerate(reversed(trained), start=1):
            rows.append((name, round(self.layer_lr_decay**depth, 4)))
        return rows

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["thresholds"] = self.thresholds.model_dump()
        evidence = self.evidence
        data["summary"] = {
            "best_depth": evidence.best.groups,
            "best_group": evidence.best.group_name,
            "best_probe_accuracy": evidence.best.validation_accuracy,
            "top_probe_accuracy": evidence.top.validation_accuracy,
            "top_deficit": evidence.top_deficit,
            "plateau_depth": evidence.plateau(self.tolerance).groups,
            "pretraining_gain": evidence.pretraining_gain,
        }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Advice:
        evidence = dict(data["evidence"])
        evidence["pretrained"] = tuple(DepthProbe(**p) for p in evidence["pretrained"])
        if evidence.get("random_init") is not None:
            evidence["random_init"] = tuple(DepthProbe(**p) for p in evidence["random_init"])
        schedule = dict(data["schedule"])
        schedule["decay_steps"] = tuple(schedule["decay_steps"])
        return cls(
            strategy=data["strategy"],
            unfreeze_groups=data["unfreeze_groups"],
            layer_lr_decay=data["layer_lr_decay"],
            schedule=Schedule(**schedule),
            size_regime=data["size_regime"],
            similarity=data["similarity"],
            tolerance=data["tolerance"],
            reasons=tuple(data["reasons"]),
            evidence=Evidence(**evidence),
            thresholds=AdviseParams(**data["thresholds"]),
        )


def recommend(evidence: Evidence, thresholds: AdviseParams) -> Advice:
    """The seeds' four scenarios, decided by measurements instead of by eye.

    - size: ``small`` below ``small_data_per_class`` examples of the rarest class, ``large``
      from ``large_data_per_class`` on, else ``medium``;
    - similarity: ``low`` when the top groups' probe is worse than the best depth's by more
      than the tolerance (the top features are specialised to the pretraining data), else
      ``high``.

    Then: large data → ``scratch`` if pretrained features beat random-init ones by less than
    ``min_pretraining_gain``, else ``full``; low similarity → ``top_k``, retraining every
    group above the plateau (the shallowest depth within the tolerance of the best); high
    similarity → ``feature_extraction`` with small data, ``full`` with more.
    """
    per_class = evidence.train_examples_per_class
    num_groups = evidence.num_groups
    if per_class < thresholds.small_data_per_class:
        size_regime = "small"
    elif per_class >= thresholds.large_data_per_class:
        size_regime = "large"
    else:
        size_regime = "medium"
    tolerance = evidence.tolerance(thresholds.plateau_tolerance)
    best, top = evidence.best, evidence.top
    plateau = evidence.plateau(tolerance)
    similarity = "low" if evidence.top_deficit > tolerance else "high"
    reasons = [
        f"{per_class} training examples per class (rarest class): {size_regime} data "
        f"(small < {thresholds.small_data_per_class} <= medium < "
        f"{thresholds.large_data_per_class} <= large).",
        f"Probe accuracy peaks at {best.validation_accuracy:.3f} after group {best.groups} "
        f"({best.group_name}); the top group ({top.group_name}) gives "
        f"{top.validation_accuracy:.3f}, {evidence.top_deficit:.3f} lower; differences under "
        f"{tolerance:.3f} are noise (validation standard error, floor "
        f"{thresholds.plateau_tolerance}): {similarity} similarity.",
        f"Accuracy stops growing after group {plateau.groups} ({plateau.group_name}, "
        f"{plateau.validation_accuracy:.3f}): the {num_groups - plateau.groups} group(s) "
        "above it add nothing this task can use.",
    ]
    gain = evidence.pretraining_gain
    if size_regime == "large":
        if gain is not None and gain < thresholds.min_pretraining_gain:
            strategy, unfreeze = "scratch", num_groups
            reasons.append(
                f"Pretrained features beat random-init ones by only {gain:.3f} (< "
                f"{thresholds.min_pretraining_gain}) and data is large: train from scratch."
            )
        else:
            strategy, unfreeze = "full", num_groups
            measured = f" by {gain:.3f}" if gain is not None else ""
            reasons.append(
                f"Pretrained features beat random-init ones{measured} and data is large: "
                "fine-tune every group."
            )
    elif similarity == "low":
        strategy, unfreeze = "top_k", num_groups - plateau.groups
        reasons.append(
            f"Low similarity: keep the {plateau.groups} bottom group(s) frozen and retrain "
            f"the {unfreeze} above the plateau."
        )
    elif size_regime == "small":
        strategy, unfreeze = "feature_extraction", 0
        reasons.append("High similarity and small data: train a head on the frozen features.")
    else:
        strategy, unfreeze = "full", num_groups
        reasons.append(
            "High similarity and enough data to move the backbone: fine-tune every group, "
            "lower groups slower."
        )
    schedule = bit_hyperrule_schedule(evidence.train_examples)
    decay = 1.0 if strategy == "scratch" else recommended_layer_lr_decay(unfreeze)
    reasons.append(
        f"{schedule.rule} ({evidence.train_examples} training examples): {schedule.steps} "
        f"steps, {schedule.warmup_steps} warmup; layer-wise LR decay {decay}."
    )
    return Advice(
        strategy=strategy,
        unfreeze_groups=unfreeze,
        layer_lr_decay=decay,
        schedule=schedule,
        size_regime=size_regime,
        similarity=similarity,
        tolerance=tolerance,
        reasons=tuple(reasons),
        evidence=evidence,
        thresholds=thresholds,
    )


# --------------------------------------------------------------------------------------------
# 3. Applying the advice
# --------------------------------------------------------------------------------------------


def strategy_rules(
    strategy: Strategy, unfreeze_groups: int, group_patterns: Sequence[str]
) -> list[TransferRule]:
    """The ``finetune.rules`` of a strategy over a backbone's layer groups (forward order).

    Raises:
      ValueError: ``unfreeze_groups`` is outside 1..number of groups for ``top_k``.
    """
    head = TransferRule(pattern="^head/")
    backbone = TransferRule(pattern="^backbone/")
    if strategy == "feature_extraction":
        return [head, TransferRule(pattern="^backbone/", freeze=True)]
    if strategy in ("full", "scratch"):
        return [head, backbone]
    if not 1 <= unfreeze_groups <= len(group_patterns):
        raise ValueError(
            f"'finetune.unfreeze_groups' is {unfreeze_groups}; this backbone has "
            f"{len(group_patterns)} layer groups"
        )
    frozen = group_patterns[: len(group_patterns) - unfreeze_groups]
    if not frozen:
        return [head, backbone]
    alternatives = "|".join(pattern.removeprefix("^") for pattern in frozen)
    return [head, TransferRule(pattern=f"^backbone/(?:{alternatives})", freeze=True), backbone]


@dataclass(frozen=True)
class AppliedStrategy:
    """The settings a fine-tuning run uses, and which of them the advice supplied."""

    strategy: Strategy | Literal["rules"]  # "rules": explicit finetune.rules decide
    finetune: FinetuneParams
    from_advice: tuple[str, ...]


def apply_advice(
    cfg: FinetuneParams,
    advice: Advice,
    *,
    group_patterns: Sequence[str],
    num_train_examples: int,
) -> AppliedStrategy:
    """``cfg`` with every advised setting it leaves unset filled from ``advice``.

    ``strategy: auto`` takes the advised strategy (and its number of groups); an explicit
    strategy keeps its own (``top_k`` with ``unfreeze_groups``, or the advised number).
    Explicit ``rules`` (only allowed with auto) win over any strategy. ``epochs``,
    ``warmup_fraction`` and ``layer_lr_decay`` come from the advice unless written.
    """
    strategy = advice.strategy if cfg.strategy == "auto" else cfg.strategy
    unfreeze = cfg.unfreeze_groups
    if unfreeze is None:
        unfreeze = advice.unfreeze_groups if strategy == advice.strategy else None
        if strategy == "top_k" and unfreeze is None:
            # The advice picked another strategy; its plateau still says where to cut.
            plateau = advice.evidence.plateau(advice.tolerance).groups
            unfreeze = max(1, advice.evidence.num_groups - plateau)
    update: dict[str, Any] = {}
    if cfg.is_explicit("rules"):
        strategy = "rules"
    else:
        update["rules"] = strategy_rules(strategy, unfreeze or 0, group_patterns)
    if not cfg.is_explicit("epochs"):
        update["epochs"] = advice.schedule.epochs(num_train_examples, cfg.batch_size)
    if not cfg.is_explicit("warmup_fraction"):
        update["warmup_fraction"] = advice.schedule.warmup_fraction()
    if not cfg.is_explicit("layer_lr_decay"):
        update["layer_lr_decay"] = (
            advice.layer_lr_decay
            if strategy in (advice.strategy, "rules")
            else recommended_layer_lr_decay(unfreeze or 0)
        )
    return AppliedStrategy(strategy, cfg.model_copy(update=update), tuple(sorted(update)))
