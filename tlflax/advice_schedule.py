"""The advisor's schedule rule (BiT-HyperRule) and the layer-wise LR decay of each strategy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["feature_extraction", "top_k", "full", "scratch"]
# Layer-wise LR decay is chosen so that the lowest trained group learns at about this
# fraction of the head's rate, within the bounds below (0.8 for about 10 trained groups).
BOTTOM_GROUP_LR_FRACTION = 0.1
LAYER_LR_DECAY_BOUNDS = (0.7, 0.9)


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
