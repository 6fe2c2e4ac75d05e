"""Which parameters train, and how fast: ordered ``(regex, value)`` rules over parameter paths.

Parameters are named by their '/'-joined path in the model, e.g.
``backbone/blocks/3/depthwise/kernel`` or ``head/output/bias``. A list of rules is matched in
order and the first match wins (big_vision's habit); every parameter must be covered, so a
new layer can never be trained - or frozen - by accident.

On top of the rules, layer-wise learning-rate decay scales each backbone layer group by
``decay ** depth_from_top``: the head and the top group learn fastest, the stem slowest,
following the intuition that low-level features transfer best and need the least change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import jax
from flax import nnx

from tlflax.config import TransferRule
from tlflax.errors import InputError

FROZEN = "frozen"


@dataclass(frozen=True)
class ParamSetting:
    """How one parameter is trained."""

    frozen: bool
    lr_multiplier: float
    weight_decay_multiplier: float
    # Gradual unfreezing: the epoch from which this parameter starts to move (0 = at once).
    unfreeze_epoch: int = 0

    @property
    def label(self) -> str:
        """The optimizer group of this parameter; equal settings share one group."""
        if self.frozen:
            return FROZEN
        label = f"lr{self.lr_multiplier:.6g}_wd{self.weight_decay_multiplier:.6g}"
        return label + (f"_from{self.unfreeze_epoch}" if self.unfreeze_epoch else "")


class UncoveredParametersError(InputError):
    """Some parameters match no rule in ``finetune.rules``; the message lists them."""


def path_to_name(path: Sequence[object]) -> str:
    """'/'-join a pytree or NNX path, dropping the trailing ``value`` that NNX states carry."""
    parts = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def parameter_names(state: nnx.State) -> list[str]:
    """All parameter paths of an NNX state (or any pytree), in tree order."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return [path_to_name(path) for path, _ in leaves]


def is_decayed(name: str, ndim: int) -> bool:
    """Weight decay applies to kernels and embeddings only, never to biases or norm scales.

    Decaying a bias or a normalisation scale pulls it towards zero for no regularising
    benefit, and hurts pretrained norm layers in particular.
    """
    leaf = name.rsplit("/", 1)[-1]
    return ndim > 1 and leaf in {"kernel", "embedding"}


def layer_depths(
    names: Sequence[str], group_patterns: Sequence[str], prefix: str
) -> dict[str, int]:
    """Depth from the top for each parameter under ``prefix``.

    ``group_patterns`` lists one regex per backbone layer group in forward order (relative to
    the backbone). The last group has depth 1, the one below it 2, and so on; parameters
    outside the backbone (the head) have depth 0.

    Raises:
      ValueError: a backbone parameter matches no group pattern. The patterns are the
        backbone's own (``group_patterns()``), not the user's: that is a bug in the backbone.
    """
    compiled = [re.compile(pattern) for pattern in group_patterns]
    depths: dict[str, int] = {}
    for name in names:
        if not name.startswith(prefix):
            depths[name] = 0
            continue
        relative = name[len(prefix) :]
        group = next((i for i, pattern in enumerate(compiled) if pattern.search(relative)), None)
        if group is None:
            raise ValueError(f"parameter '{name}' belongs to no layer group of the backbone")
        depths[name] = len(compiled) - group
    return depths


def resolve_settings(
    names: Sequence[str],
    rules: Sequence[TransferRule],
    *,
    ndims: dict[str, int],
    depths: dict[str, int] | None = None,
    layer_lr_decay: float = 1.0,
    gradual_unfreezing: bool = False,
) -> dict[str, ParamSetting]:
    """Apply the ordered rules (first match wins) and layer-wise LR decay to every parameter.

    With ``gradual_unfreezing`` (ULMFiT's top-down schedule) a parameter at depth ``d`` from
    the top starts to train at epoch ``d``: the head first, then one more layer group per
    epoch. Parameters frozen by a rule stay frozen.

    Raises:
      UncoveredParametersError: listing every parameter no rule matches.
    """
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    settings: dict[str, ParamSetting] = {}
    uncovered: list[str] = []
    for name in names:
        rule = next((r for pattern, r in compiled if pattern.search(name)), None)
        if rule is None:
            uncovered.append(name)
            continue
        depth = depths.get(name, 0) if depths else 0
        lr_multiplier = rule.lr_multiplier * layer_lr_decay**depth
        frozen = rule.freeze or lr_multiplier == 0.0
        decay = rule.weight_decay_multiplier if is_decayed(name, ndims[name]) else 0.0
        settings[name] = ParamSetting(
            frozen=frozen,
            lr_multiplier=0.0 if frozen else lr_multiplier,
            weight_decay_multiplier=0.0 if frozen else decay,
            unfreeze_epoch=depth if gradual_unfreezing and not frozen else 0,
        )
    if uncovered:
        shown = ", ".join(uncovered[:10]) + (" ..." if len(uncovered) > 10 else "")
        raise UncoveredParametersError(
            f"{len(uncovered)} parameter(s) match no rule in finetune.rules: {shown}. "
            "Add a rule (e.g. pattern '.*') so every parameter is either trained or frozen."
        )
    return settings


@dataclass(frozen=True)
class ModelSettings:
    """How every parameter of one model trains, with the parameter sizes (for reports)."""

    settings: dict[str, ParamSetting]
    sizes: dict[str, int]
    depths: dict[str, int]


def model_settings(
    model: nnx.Module,
    rules: Sequence[TransferRule],
    *,
    group_patterns: Sequence[str],
    layer_lr_decay: float,
    gradual_unfreezing: bool,
    backbone_prefix: str = "backbone/",
) -> ModelSettings:
    """:func:`resolve_settings` over every parameter of ``model`` (which may be abstract).

    ``group_patterns`` are the backbone's layer groups in forward order, relative to
    ``backbone_prefix``; they give each parameter its depth for layer-wise decay.
    """
    params = nnx.state(model, nnx.Param)
    names = parameter_names(params)
    leaves = jax.tree_util.tree_leaves(params)
    ndims = {name: leaf.ndim for name, leaf in zip(names, leaves, strict=True)}
    depths = layer_depths(names, group_patterns, backbone_prefix)
    settings = resolve_settings(
        names,
        rules,
        ndims=ndims,
        depths=depths,
        layer_lr_decay=layer_lr_decay,
        gradual_unfreezing=gradual_unfreezing,
    )
    sizes = {name: int(leaf.size) for name, leaf in zip(names, leaves, strict=True)}
    return ModelSettings(settings, sizes, depths)


def trainable_filter(settings: dict[str, ParamSetting]):
    """An NNX filter selecting the parameters that train (used to split the model)."""

    def is_trainable(path: tuple, variable: object) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        setting = settings.get(path_to_name(path))
        return setting is not None and not setting.frozen

    return is_trainable


def summarize(settings: dict[str, ParamSetting], sizes: dict[str, int]) -> dict[str, float]:
    """Counts for logs and reports: trainable and frozen parameter totals."""
    trainable = sum(sizes[n] for n, s in settings.items() if not s.frozen)
    frozen = sum(sizes[n] for n, s in settings.items() if s.frozen)
    return {
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "trainable_fraction": trainable / max(trainable + frozen, 1),
    }
