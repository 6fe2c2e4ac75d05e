"""Which pretrained backbone: each candidate's frozen features probed on this data, and priced.

``extract.backbone: auto`` hands the first step of transfer learning - choosing the
pretrained model - to the ``advise`` stage. Every candidate (``extract.candidates``, or each
registered backbone of the data's modality that ships weights) is measured the way the
advisor measures depths: the pooled output after every layer group of the frozen network,
the depths a head would read chosen on train (:func:`tlflax.taps.probe_taps`), and the
ridge probe of those depths scored on validation. That probe is the best cheap predictor
of what a head, and a fine-tuning run that starts from it, can reach (Kornblith et al.
2019: ImageNet models' linear-probe and fine-tuned accuracies rank alike across tasks).

Its price is the floating-point operations of one example's forward pass, from XLA's own
cost analysis of the compiled function at the job's input size: deterministic, unlike a
stopwatch on a shared machine, and proportional to the CPU time of extraction and of every
training step.

The rule (:func:`choose_backbone`): the candidate with the best probe is the reference; a
candidate is as good as it unless the reference's lead is *real* - larger than
``advise.plateau_tolerance`` and significant by McNemar's paired test on the validation
examples at ``advise.significance``, the same test every other decision of the advisor
uses; of the candidates as good as the best, the cheapest is chosen. A bigger network is
paid for only with accuracy the validation set can see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from tlflax.advice_evidence import Comparison, compare
from tlflax.config import AdviseParams, Params, ParamsError
from tlflax.models.registry import backbone_names, get_backbone_spec
from tlflax.probes import unpack_correct

RULE = (
    "the cheapest candidate (fewest floating-point operations per example) whose probe is "
    "not really worse than the best one: a lead counts when it exceeds "
    "advise.plateau_tolerance and McNemar's paired test on the validation examples is "
    "significant at advise.significance"
)


@dataclass(frozen=True)
class BackboneCandidate:
    """One candidate backbone as measured on this data."""

    name: str
    # The ridge probe of the depths a head would read (advise's taps), on validation.
    probe_accuracy: float
    taps: tuple[int, ...]
    # The best single depth's probe, for the report.
    best_depth_probe_accuracy: float
    flops_per_example: float
    parameters: int
    validation_correct: str
    validation_examples: int

    def correct(self) -> np.ndarray:
        """Whether its probe gets each validation example right (what the paired test reads)."""
        return unpack_correct(self.validation_correct, self.validation_examples)


@dataclass(frozen=True)
class BackboneChoice:
    """The chosen backbone, the candidates best probe first, and each against the best."""

    chosen: str
    rule: str
    candidates: tuple[BackboneCandidate, ...]
    # The best candidate against each other one (``real``: the other is really worse).
    comparisons: tuple[Comparison, ...]

    def reason(self) -> str:
        """One sentence for the advice's reasons."""
        best = self.candidates[0]
        chosen = next(c for c in self.candidates if c.name == self.chosen)
        if chosen.name == best.name:
            return (
                f"backbone {chosen.name}: the best probe of {len(self.candidates)} candidates "
                f"({chosen.probe_accuracy:.3f} on validation) and the cheapest of those not "
                f"really worse ({chosen.flops_per_example / 1e6:.0f} MFLOPs per example)"
            )
        return (
            f"backbone {chosen.name}: probe {chosen.probe_accuracy:.3f} against the best, "
            f"{best.name}'s {best.probe_accuracy:.3f}, not really worse, at "
            f"{chosen.flops_per_example / 1e6:.0f} MFLOPs per example instead of "
            f"{best.flops_per_example / 1e6:.0f}"
        )


def choose_backbone(
    candidates: Sequence[BackboneCandidate], thresholds: AdviseParams
) -> BackboneChoice:
    """The cheapest candidate whose probe is not really worse than the best (module docstring).

    Raises:
      ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("no candidate backbones to choose from")
    # Best probe first; among equals the cheaper first, so a tie never buys a bigger network.
    ranked = sorted(candidates, key=lambda c: (-c.probe_accuracy, c.flops_per_example, c.name))
    best = ranked[0]
    comparisons = tuple(
        compare(
            "backbone",
            best,
            other,
            min_difference=thresholds.plateau_tolerance,
            significance=thresholds.significance,
            labels=(best.name, other.name),
        )
        for other in ranked[1:]
    )
    really_worse = {other.name for other, c in zip(ranked[1:], comparisons, strict=True) if c.real}
    as_good = [c for c in ranked if c.name not in really_worse]
    chosen = min(as_good, key=lambda c: (c.flops_per_example, -c.probe_accuracy, c.name))
    return BackboneChoice(chosen.name, RULE, tuple(ranked), comparisons)


def forward_flops(
    backbone: nnx.Module,
    pooled_after_each_group: Callable[[nnx.Module, dict[str, jax.Array]], list[jax.Array]],
    one_example: dict[str, np.ndarray],
) -> float:
    """Floating-point operations of the frozen forward pass of one example, as XLA counts
    them for the compiled function (``one_example``: model inputs with a batch of one)."""
    graphdef, state = nnx.split(backbone)

    def forward(state: nnx.State, batch: dict[str, jax.Array]) -> list[jax.Array]:
        return pooled_after_each_group(nnx.merge(graphdef, state), batch)

    analysis = jax.jit(forward).lower(state, one_example).compile().cost_analysis()
    # A dict in current JAX; a list of one dict (per device program) in older releases.
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis["flops"])


def parameter_count(backbone: nnx.Module) -> int:
    """Trainable parameters of the backbone."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(nnx.state(backbone, nnx.Param))))


def backbones_taking(modality: str, *, with_weights: bool = False) -> list[str]:
    """The registered backbones of ``modality`` (``with_weights``: that ship weights)."""
    specs = [get_backbone_spec(name) for name in backbone_names()]
    return [
        spec.name
        for spec in specs
        if spec.input_kind == modality and (spec.load_pretrained is not None or not with_weights)
    ]


def candidate_backbones(params: Params) -> list[str]:
    """The backbones ``extract.backbone: auto`` chooses among: ``extract.candidates``, or
    every registered backbone of the data's modality that ships pretrained weights.

    Raises:
      ParamsError: a candidate that is unknown, takes another modality's input or ships no
        weights of its own (each is named, with the ones that fit).
    """
    modality = params.prepare.modality
    fitting = backbones_taking(modality, with_weights=True)
    written = params.extract.candidates
    if written is None:
        return fitting
    for name in written:
        if name not in fitting:
            raise ParamsError(
                f"'extract.candidates': {name!r} is not a {modality} backbone with packaged "
                f"weights; candidates for prepare.dataset {params.prepare.dataset!r}: "
                f"{', '.join(fitting)}"
            )
    return list(dict.fromkeys(written))
