"""The advisor's decision rules: evidence → :class:`Advice` (the seeds' four scenarios).

The evidence is measured by :mod:`tlflax.advice_evidence`, the schedule and layer-wise LR
decay come from :mod:`tlflax.advice_schedule`; :mod:`tlflax.advisor` applies the advice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlflax.advice_evidence import Call, Comparison, Evidence, compare, depth_label
from tlflax.advice_schedule import (
    Schedule,
    Strategy,
    bit_hyperrule_schedule,
    strategy_layer_lr_decay,
)
from tlflax.backbone_choice import BackboneCandidate, BackboneChoice
from tlflax.config import AdviseParams
from tlflax.errors import MissingInputError
from tlflax.probes import DepthProbe, PairedTest
from tlflax.taps import TapsProbe

SizeRegime = Literal["small", "medium", "large"]
Similarity = Literal["high", "low"]


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
    size_regime: SizeRegime
    similarity: Similarity
    reasons: tuple[str, ...]
    # The paired comparisons the decisions rest on, with the examples that decided each.
    comparisons: tuple[Comparison, ...]
    evidence: Evidence
    thresholds: AdviseParams = field(default_factory=AdviseParams)
    # The depths a head reads with extract.taps: auto (tlflax.taps.probe_taps), chosen on
    # the probed training examples; None where they were not measured.
    taps: TapsProbe | None = None
    # With extract.backbone: auto, the candidates measured and the one chosen (whose probes
    # are the evidence above); None where the backbone was written.
    backbone: BackboneChoice | None = None

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
            "backbone": None if self.backbone is None else self.backbone.chosen,
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
        comparisons = _comparisons_from_json(data["comparisons"])
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
            backbone=_backbone_from_json(data.get("backbone")),
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


def _comparisons_from_json(data: Sequence[Mapping[str, Any]]) -> tuple[Comparison, ...]:
    return tuple(
        Comparison(**{**comparison, "test": PairedTest(**comparison["test"])})
        for comparison in data
    )


def _backbone_from_json(data: Mapping[str, Any] | None) -> BackboneChoice | None:
    if data is None:
        return None
    candidates = tuple(
        BackboneCandidate(**{**candidate, "taps": tuple(candidate["taps"])})
        for candidate in data["candidates"]
    )
    return BackboneChoice(
        data["chosen"], data["rule"], candidates, _comparisons_from_json(data["comparisons"])
    )


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
    usually has the examples to show it; medium data → ``full`` (lower groups slower, by the
    layer-wise decay), whatever the similarity; small data → ``top_k`` with low similarity,
    retraining every group above the plateau, ``feature_extraction`` with high.
    """
    size_regime = _size_regime(evidence.train_examples_per_class, thresholds)
    top_call = _against_best("similarity", evidence.top, evidence, thresholds)
    similarity = "low" if top_call.real else "high"
    plateau, plateau_calls = _plateau(evidence, thresholds)
    comparisons = [
        comparison
        for comparison in (top_call, *plateau_calls)
        if comparison.better != comparison.worse  # a probe against itself says nothing
    ]
    reasons = _evidence_reasons(evidence, thresholds, size_regime, similarity, top_call, plateau)
    choice = _choose_strategy(evidence, thresholds, size_regime, similarity, plateau)
    if choice.pretraining_call is not None:
        comparisons.append(choice.pretraining_call)
    schedule = bit_hyperrule_schedule(evidence.train_examples)
    decay = strategy_layer_lr_decay(choice.strategy, choice.unfreeze_groups, evidence.num_groups)
    reasons += [choice.reason, _schedule_reason(schedule, evidence.train_examples, decay)]
    return Advice(
        strategy=choice.strategy,
        unfreeze_groups=choice.unfreeze_groups,
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


def _size_regime(per_class: int, thresholds: AdviseParams) -> SizeRegime:
    """``small``, ``medium`` or ``large`` by the training examples of the rarest class."""
    if per_class < thresholds.small_data_per_class:
        return "small"
    if per_class >= thresholds.large_data_per_class:
        return "large"
    return "medium"


def _against_best(
    call: Call, probe: DepthProbe, evidence: Evidence, thresholds: AdviseParams
) -> Comparison:
    """Whether the best depth's lead over ``probe`` is real, by ``plateau_tolerance``."""
    return compare(
        call,
        evidence.best,
        probe,
        min_difference=thresholds.plateau_tolerance,
        significance=thresholds.significance,
    )


def _plateau(evidence: Evidence, thresholds: AdviseParams) -> tuple[DepthProbe, list[Comparison]]:
    """The shallowest depth not really worse than the best, and the comparisons that place it."""
    # The best depth's lead over itself is never real, so some depth is the plateau.
    plateau = next(
        probe
        for probe in evidence.pretrained
        if not _against_best("plateau", probe, evidence, thresholds).real
    )
    # Why the plateau is here: its own deficit is not real, the depth below's is.
    below_and_plateau = evidence.pretrained[max(plateau.groups - 2, 0) : plateau.groups]
    calls = [_against_best("plateau", probe, evidence, thresholds) for probe in below_and_plateau]
    return plateau, calls


def _evidence_reasons(
    evidence: Evidence,
    thresholds: AdviseParams,
    size_regime: SizeRegime,
    similarity: Similarity,
    top_call: Comparison,
    plateau: DepthProbe,
) -> list[str]:
    """The reasons that state the evidence: the data size, the similarity, the plateau."""
    best, top = evidence.best, evidence.top
    top_verdict = (
        "the top group is the best depth"
        if top.groups == best.groups
        else f"the top group ({top.group_name}) gives {top.validation_accuracy:.3f}, "
        f"{evidence.top_deficit:.3f} lower; {top_call.summary()}"
    )
    return [
        f"{evidence.train_examples_per_class} training examples per class (rarest class): "
        f"{size_regime} data (small < {thresholds.small_data_per_class} <= medium < "
        f"{thresholds.large_data_per_class} <= large).",
        f"Probe accuracy peaks at {best.validation_accuracy:.3f} after group {best.groups} "
        f"({best.group_name}); {top_verdict}: {similarity} similarity.",
        f"Accuracy stops growing after group {plateau.groups} ({plateau.group_name}, "
        f"{plateau.validation_accuracy:.3f}), the shallowest depth not really worse than the "
        f"best: the {evidence.num_groups - plateau.groups} group(s) above it add nothing this "
        "task can use.",
    ]


@dataclass(frozen=True)
class _StrategyChoice:
    """A strategy, the backbone groups it trains and the reason for it."""

    strategy: Strategy
    unfreeze_groups: int
    reason: str
    # With large data: the best pretrained probe against the best random-init one.
    pretraining_call: Comparison | None = None


def _choose_strategy(
    evidence: Evidence,
    thresholds: AdviseParams,
    size_regime: SizeRegime,
    similarity: Similarity,
    plateau: DepthProbe,
) -> _StrategyChoice:
    """The strategy for the data size and similarity, and the reason for it."""
    num_groups = evidence.num_groups
    if size_regime == "large":
        return _large_data_choice(evidence, thresholds)
    if size_regime == "medium":
        if similarity == "low":
            # Measured by the strategy grid (README): at 500 examples per class, keeping the
            # bottom groups frozen (top_k) scored below full fine-tuning on validation in
            # both domains. The layer-wise decay already holds the generic bottom near its
            # pretrained weights, softly, where a freeze holds it hard.
            reason = (
                "Low similarity, but enough data to move the backbone: fine-tune every "
                "group, lower groups slower (the layer-wise decay keeps the bottom near its "
                "pretrained weights instead of freezing it)."
            )
        else:
            reason = (
                "High similarity and enough data to move the backbone: fine-tune every "
                "group, lower groups slower."
            )
        return _StrategyChoice("full", num_groups, reason)
    if similarity == "low":
        unfreeze = num_groups - plateau.groups
        return _StrategyChoice(
            "top_k",
            unfreeze,
            f"Low similarity: keep the {plateau.groups} bottom group(s) frozen and retrain "
            f"the {unfreeze} above the plateau.",
        )
    return _StrategyChoice(
        "feature_extraction",
        0,
        "High similarity and small data: train a head on the frozen features.",
    )


def _large_data_choice(evidence: Evidence, thresholds: AdviseParams) -> _StrategyChoice:
    """``scratch`` when pretrained features do not really beat random-init ones, else ``full``."""
    best, random_best = evidence.best, evidence.random_init_best
    num_groups = evidence.num_groups
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
    if gain_call is not None and not gain_call.real:
        return _StrategyChoice(
            "scratch",
            num_groups,
            "The best pretrained probe leads the best random-init one by "
            f"{gain_call.test.difference:.3f}; {gain_call.summary()}; data is large: "
            "train from scratch.",
            gain_call,
        )
    measured = (
        f" by {gain_call.test.difference:.3f}; {gain_call.summary()};"
        if gain_call is not None
        else ""
    )
    return _StrategyChoice(
        "full",
        num_groups,
        f"Pretrained features beat random-init ones{measured} and data is large: "
        "fine-tune every group.",
        gain_call,
    )


def _schedule_reason(schedule: Schedule, train_examples: int, layer_lr_decay: float) -> str:
    """The reason that states the schedule and the layer-wise LR decay."""
    return (
        f"{schedule.rule} ({train_examples} training examples): {schedule.steps} "
        f"steps, {schedule.warmup_steps} warmup; layer-wise LR decay {layer_lr_decay}."
    )
