"""Which way to transfer: measurements of the frozen backbone on the target data → advice.

Read top to bottom:
  1. evidence: training examples per class, the probe accuracy after every layer group
     (:mod:`tlflax.probes`), where it stops growing, how much the top groups lose, and -
     with large data - how much better pretrained features are than random-init ones;
     every such comparison of two probes is a paired test on the same validation examples
     (:mod:`tlflax.advice_evidence`);
  2. the decision rules (the seeds' four dataset-size x similarity scenarios,
     :mod:`tlflax.advice_rules`) and the schedule rule (BiT-HyperRule,
     :mod:`tlflax.advice_schedule`);
  3. applying the advice to the finetune settings, where settings written in params.yaml win
     (this module, which also re-exports the names of the other three).

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tlflax.advice_evidence import (
    Call,
    Comparison,
    Evidence,
    compare,
    count_per_class,
    depth_label,
    measure,
)
from tlflax.advice_rules import Advice, load_advice, recommend
from tlflax.advice_schedule import (
    BOTTOM_GROUP_LR_FRACTION,
    LAYER_LR_DECAY_BOUNDS,
    Schedule,
    Strategy,
    bit_hyperrule_schedule,
    recommended_layer_lr_decay,
    strategy_layer_lr_decay,
)
from tlflax.config import FinetuneParams, ParamsError, TransferRule

__all__ = [
    "BOTTOM_GROUP_LR_FRACTION",
    "LAYER_LR_DECAY_BOUNDS",
    "Advice",
    "AppliedStrategy",
    "Call",
    "Comparison",
    "Evidence",
    "Schedule",
    "Strategy",
    "apply_advice",
    "bit_hyperrule_schedule",
    "compare",
    "count_per_class",
    "depth_label",
    "load_advice",
    "measure",
    "recommend",
    "recommended_layer_lr_decay",
    "strategy_layer_lr_decay",
    "strategy_rules",
]


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


def groups_above_the_frozen_bottom(advised: int, num_groups: int, cut_groups: int) -> int:
    """How many of a cut network's top groups train under advice to retrain the top
    ``advised`` of the whole backbone's ``num_groups``.

    The advice keeps the bottom ``num_groups - advised`` groups frozen: they hold what this
    task can use as it is (below the probe's plateau). A network cut after its highest tap
    (``extract.taps``) loses groups from the top, never from the bottom, so the same bottom
    stays frozen and the groups between it and the cut train; at least the top one, where
    the cut falls at or below the plateau. (For `full` nothing is frozen and the advised
    decay stays: on the default job's validation images it beat the decay recomputed for
    the cut network, 0.925 against 0.910.)
    """
    return max(1, cut_groups - (num_groups - advised))


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
        if strategy == "top_k" and unfreeze is not None:
            unfreeze = groups_above_the_frozen_bottom(
                unfreeze, advice.evidence.num_groups, len(group_patterns)
            )
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
