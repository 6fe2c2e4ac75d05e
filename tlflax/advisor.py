"""Which way to transfer: measurements of the frozen backbone on the target data → advice.

Read top to bottom:
  1. evidence: training examples per class, the probe accuracy after every layer group
     (:mod:`tlflax.probes`), where it stops growing, how much the top groups lose, and -
     with large data - how much better pretrained features are than random-init ones;
     every such comparison of two probes is a paired test on the same validation examples;
  2. the decision rules (the seeds' four dataset-size x similarity scenarios) and the
     schedule rule (BiT-HyperRule);
  3. applying the advice to the finetune settings, where settings written in params.yaml win.

Why these measurements: a linear probe after group ``g`` says how task-relevant the
features computed so far are. Where the curve stops growing, the groups above it add
nothing the task can use (they are specialised to the pretraining data), so they are the
ones worth retraining; if the curve grows to the very top, the pretrained high-level
features fit the task (high similarity) and, with little data, training a head on them is
enough.

Why a paired test: every probe is scored on the same validation examples, so two depths'
accuracies are strongly correlated - both get the easy examples right. The standard error
of one accuracy ignores that and misjudges their difference both ways; what says whether
one depth is really better is how the examples they disagree on split (McNemar's test,
:class:`tlflax.probes.PairedTest`). A difference is *real* only when it is large enough to
matter (a threshold in :class:`tlflax.config.AdviseParams`) and significant by that test at
``advise.significance``; every decision below is made on real differences only, and the
advice records each comparison it made with the numbers of examples behind it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flax import nnx

from tlflax.config import AdviseParams, FinetuneParams, ParamsError, TransferRule
from tlflax.errors import MissingInputError
from tlflax.probes import (
    DepthProbe,
    PairedTest,
    PooledAfterEachGroup,
    features_by_depth,
    paired_test,
    probe_depths,
)
from tlflax.taps import TapsProbe

Strategy = Literal["feature_extraction", "top_k", "full", "scratch"]
# What a comparison of two probes decides: whether the top groups lose accuracy
# (similarity), where accuracy stops growing (plateau), whether pretraining helps.
Call = Literal["similarity", "plateau", "pretraining"]
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


def compare(
    call: Call,
    better: DepthProbe,
    worse: DepthProbe,
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
      labels: their names in the report (default: :func:`depth_label`).
    """
    test = paired_test(better.correct(), worse.correct())
    real = test.difference > min_difference and test.p_value < significance
    better_label, worse_label = labels or (depth_label(better), depth_label(worse))
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


def strategy_layer_lr_decay(
    strategy: Strategy, unfreeze_groups: int | None, num_groups: int
) -> float:
    """The layer-wise LR decay of a strategy, from the pretrained groups it trains.

    ``full`` trains all ``num_groups`` backbone groups, ``top_k`` its ``unfreeze_groups``;
    ``feature_extraction`` trains none, and ``scratch`` has random weights - no pretrained
    features in the lower groups to protect - so both get 1.0.
    """
    if strategy == "full":
        return recommended_layer_lr_decay(num_groups)
    if strategy == "top_k":
        return recommended_layer_lr_decay(unfreeze_groups or 0)
    return 1.0


@dataclass(frozen=True)
class Advice:
    """The recommendation, the evidence behind it and the thresholds that decided it."""

    strategy: Strategy
    unfreeze_groups: int  # backbone layer groups that train, counted from the top
    # The shallowest depth whose probe is not really worse than the best one's: where
    # accuracy stops growing (apply_advice cuts a hand-picked top_k there).
    plateau_depth: int
    layer_lr_decay: float
    schedule: Schedule
    size_regime: Literal["small", "medium", "large"]
    similarity: Literal["high", "low"]
    reasons: tuple[str, ...]
    # The paired comparisons the decisions rest on, with the examples that decided each.
    comparisons: tuple[Comparison, ...]
    evidence: Evidence
    thresholds: AdviseParams = field(default_factory=AdviseParams)
    # The depths a head reads with extract.taps: auto (tlflax.taps.probe_taps), chosen on
    # the probed training examples; None where they were not measured.
    taps: TapsProbe | None = None

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

        def p_value(call: Call) -> float | None:
            return next((c.test.p_value for c in self.comparisons if c.call == call), None)

        data["summary"] = {
            "best_depth": evidence.best.groups,
            "best_group": evidence.best.group_name,
            "best_probe_accuracy": evidence.best.validation_accuracy,
            "top_probe_accuracy": evidence.top.validation_accuracy,
            "top_deficit": evidence.top_deficit,
            "top_deficit_p_value": p_value("similarity"),
            "plateau_depth": self.plateau_depth,
            "pretraining_gain": evidence.pretraining_gain,
            "pretraining_gain_p_value": p_value("pretraining"),
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
        comparisons = tuple(
            Comparison(**{**comparison, "test": PairedTest(**comparison["test"])})
            for comparison in data["comparisons"]
        )
        return cls(
            strategy=data["strategy"],
            unfreeze_groups=data["unfreeze_groups"],
            plateau_depth=data["plateau_depth"],
            layer_lr_decay=data["layer_lr_decay"],
            schedule=Schedule(**schedule),
            size_regime=data["size_regime"],
            similarity=data["similarity"],
            reasons=tuple(data["reasons"]),
            comparisons=comparisons,
            evidence=Evidence(**evidence),
            thresholds=AdviseParams(**data["thresholds"]),
            taps=_taps_from_json(data.get("taps")),
        )


def load_advice(path: Path) -> Advice:
    """The advice the ``advise`` stage wrote to ``path``.

    Raises:
      MissingInputError: there is no advice yet (the advise stage has not run).
    """
    if not path.exists():
        raise MissingInputError(
            f"{path} is missing: run the advise stage first (dvc repro advise); the plan's "
            "strategy, schedule and the depths the head reads come from it"
        )
    return Advice.from_json(json.loads(path.read_text(encoding="utf-8")))


def _taps_from_json(data: Mapping[str, Any] | None) -> TapsProbe | None:
    if data is None:
        return None
    steps = tuple((int(depth), float(accuracy)) for depth, accuracy in data["steps"])
    return TapsProbe(**{**data, "taps": tuple(data["taps"]), "steps": steps})


def recommend(evidence: Evidence, thresholds: AdviseParams) -> Advice:
    """The seeds' four scenarios, decided by measurements instead of by eye.

    - size: ``small`` below ``small_data_per_class`` examples of the rarest class, ``large``
      from ``large_data_per_class`` on, else ``medium``;
    - similarity: ``low`` when the best depth's lead over the top group is real (the top
      features are specialised to the pretraining data), else ``high``;
    - plateau: the shallowest depth whose deficit to the best depth is not real.

    A lead is real when it exceeds ``plateau_tolerance`` and McNemar's paired test rejects
    equal accuracy at ``significance`` (:func:`compare`). Each call therefore keeps its
    default - high similarity, growth up to the best depth not established - until the
    validation examples the two probes disagree on show otherwise; an accuracy gap of the
    same size can be real for two depths with correlated errors and noise for two with
    independent ones. The best depth is itself picked on these examples, which makes its
    leads look slightly larger than they are; the level is not corrected for that.

    Then: large data → ``full`` if pretrained features really beat random-init ones (by more
    than ``min_pretraining_gain``, significantly), else ``scratch`` - as with the gain alone
    before, pretraining has to show that it helps, and with large data the validation set
    usually has the examples to show it; low similarity → ``top_k``, retraining every group
    above the plateau; high similarity → ``feature_extraction`` with small data, ``full``
    with more.
    """
    per_class = evidence.train_examples_per_class
    num_groups = evidence.num_groups
    if per_class < thresholds.small_data_per_class:
        size_regime = "small"
    elif per_class >= thresholds.large_data_per_class:
        size_regime = "large"
    else:
        size_regime = "medium"
    best, top = evidence.best, evidence.top

    def against_best(call: Call, probe: DepthProbe) -> Comparison:
        return compare(
            call,
            best,
            probe,
            min_difference=thresholds.plateau_tolerance,
            significance=thresholds.significance,
        )

    top_call = against_best("similarity", top)
    similarity = "low" if top_call.real else "high"
    # The best depth's lead over itself is never real, so some depth is the plateau.
    plateau = next(p for p in evidence.pretrained if not against_best("plateau", p).real)
    # Why the plateau is here: its own deficit is not real, the depth below's is.
    below_and_plateau = evidence.pretrained[max(plateau.groups - 2, 0) : plateau.groups]
    plateau_calls = [against_best("plateau", probe) for probe in below_and_plateau]
    comparisons = [
        comparison
        for comparison in (top_call, *plateau_calls)
        if comparison.better != comparison.worse  # a probe against itself says nothing
    ]
    top_verdict = (
        "the top group is the best depth"
        if top.groups == best.groups
        else f"the top group ({top.group_name}) gives {top.validation_accuracy:.3f}, "
        f"{evidence.top_deficit:.3f} lower; {top_call.summary()}"
    )
    reasons = [
        f"{per_class} training examples per class (rarest class): {size_regime} data "
        f"(small < {thresholds.small_data_per_class} <= medium < "
        f"{thresholds.large_data_per_class} <= large).",
        f"Probe accuracy peaks at {best.validation_accuracy:.3f} after group {best.groups} "
        f"({best.group_name}); {top_verdict}: {similarity} similarity.",
        f"Accuracy stops growing after group {plateau.groups} ({plateau.group_name}, "
        f"{plateau.validation_accuracy:.3f}), the shallowest depth not really worse than the "
        f"best: the {num_groups - plateau.groups} group(s) above it add nothing this task "
        "can use.",
    ]
    random_best = evidence.random_init_best
    if size_regime == "large":
        gain_call = None
        if random_best is not None:
            gain_call = compare(
                "pretraining",
                best,
                random_best,
                min_difference=thresholds.min_pretraining_gain,
                significance=thresholds.significance,
                labels=(depth_label(best, "pretrained"), depth_label(random_best, "random-init")),
            )
            comparisons.append(gain_call)
        if gain_call is not None and not gain_call.real:
            strategy, unfreeze = "scratch", num_groups
            reasons.append(
                "The best pretrained probe leads the best random-init one by "
                f"{gain_call.test.difference:.3f}; {gain_call.summary()}; data is large: "
                "train from scratch."
            )
        else:
            strategy, unfreeze = "full", num_groups
            measured = (
                f" by {gain_call.test.difference:.3f}; {gain_call.summary()};"
                if gain_call is not None
                else ""
            )
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
    decay = strategy_layer_lr_decay(strategy, unfreeze, num_groups)
    reasons.append(
        f"{schedule.rule} ({evidence.train_examples} training examples): {schedule.steps} "
        f"steps, {schedule.warmup_steps} warmup; layer-wise LR decay {decay}."
    )
    return Advice(
        strategy=strategy,
        unfreeze_groups=unfreeze,
        plateau_depth=plateau.groups,
        layer_lr_decay=decay,
        schedule=schedule,
        size_regime=size_regime,
        similarity=similarity,
        reasons=tuple(reasons),
        comparisons=tuple(comparisons),
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
        raise ParamsError(
            f"'finetune.unfreeze_groups' is {unfreeze_groups}; this backbone has "
            f"{len(group_patterns)} layer groups (with extract.taps, the groups up to the "
            "highest tap)"
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
    strategy keeps its own (``top_k`` with ``unfreeze_groups``, or the advised number, or
    the groups above the advised plateau). Explicit ``rules`` (only allowed with auto) win
    over any strategy. ``epochs``, ``warmup_fraction`` and ``layer_lr_decay`` come from the
    advice unless written; the decay is the advised one for the advised strategy and
    groups (and for explicit rules), else the one the advisor gives the strategy picked by
    hand (:func:`strategy_layer_lr_decay`: ``full`` decays over every backbone group).
    """
    strategy = advice.strategy if cfg.strategy == "auto" else cfg.strategy
    unfreeze = cfg.unfreeze_groups
    if unfreeze is None:
        unfreeze = advice.unfreeze_groups if strategy == advice.strategy else None
        if strategy == "top_k" and unfreeze is None:
            # The advice picked another strategy; its plateau still says where to cut.
            unfreeze = max(1, advice.evidence.num_groups - advice.plateau_depth)
        if strategy == "top_k" and unfreeze is not None and unfreeze > len(group_patterns):
            # The advice counts the groups of the whole backbone; a network cut after its
            # highest tap (extract.taps) has fewer, and then every one of them trains. (For
            # `full` the advised decay stays: on the default job's validation images it
            # beat the decay recomputed for the cut network, 0.925 against 0.910.)
            unfreeze = len(group_patterns)
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
        advised_plan = (strategy, unfreeze) == (advice.strategy, advice.unfreeze_groups)
        # A strategy picked by hand trains other groups than the advised one: its decay
        # follows from its own groups (`full`: all of them, not the 0 `unfreeze` it has).
        update["layer_lr_decay"] = (
            advice.layer_lr_decay
            if advised_plan or strategy == "rules"
            else strategy_layer_lr_decay(strategy, unfreeze, len(group_patterns))
        )
    return AppliedStrategy(strategy, cfg.model_copy(update=update), tuple(sorted(update)))
