"""Backbones by name: how to build each one and load its pretrained weights.

Adding a backbone is one `BackboneSpec` entry in `_SPECS`. A backbone module provides
`features`, `run_groups`, `group_patterns` and a `feature_dim`; its constructor takes
`include_top` and `rngs` as keywords; its loader fills a built model in place.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import jax
from flax import nnx

from tlflax.models import efficientnet
from tlflax.models.torch_weights import LoadReport

__all__ = [
    "BackboneConstructor",
    "BackboneSpec",
    "WeightsLoader",
    "backbone_names",
    "create_backbone",
    "get_backbone_spec",
]


class BackboneConstructor(Protocol):
    """Builds a randomly initialised backbone, with or without its original classifier."""

    def __call__(self, *, include_top: bool, rngs: nnx.Rngs) -> nnx.Module: ...


class WeightsLoader(Protocol):
    """Fills a built backbone with pretrained weights in place, except `dont_load` matches."""

    def __call__(self, model: nnx.Module, *, dont_load: Sequence[str]) -> LoadReport: ...


@dataclass(frozen=True)
class BackboneSpec:
    """Everything `create_backbone` needs to know about one backbone.

    Attributes:
      name: the registry key, as written in `params.yaml`.
      constructor: builds the randomly initialised module.
      feature_dim: width of `features(...)`.
      input_kind: "image" (NHWC floats in [0, 1]) or "text" (token ids and a mask).
      load_pretrained: fills a built module with its pretrained weights; None when the
        backbone has none.
    """

    name: str
    constructor: BackboneConstructor
    feature_dim: int
    input_kind: Literal["image", "text"]
    load_pretrained: WeightsLoader | None


_SPECS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="efficientnet_lite0",
            constructor=efficientnet.EfficientNetLite0,
            feature_dim=efficientnet.EfficientNetLite0.feature_dim,
            input_kind="image",
            load_pretrained=efficientnet.load_pretrained,
        ),
    )
}


def backbone_names() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(_SPECS)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec registered as `name`.

    Raises:
      ValueError: unknown name; the message lists the valid names and the nearest one.
    """
    try:
        return _SPECS[name]
    except KeyError:
        nearest = difflib.get_close_matches(name, _SPECS, n=1)
        suggestion = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise ValueError(
            f"unknown backbone {name!r}: valid names are {', '.join(backbone_names())}{suggestion}"
        ) from None


def create_backbone(
    name: str,
    *,
    pretrained: bool = True,
    include_top: bool = False,
    dont_load: Sequence[str] = (),
    rngs: nnx.Rngs,
) -> tuple[nnx.Module, LoadReport | None]:
    """Builds the backbone registered as `name`, with its pretrained weights if asked.

    Args:
      name: a registered name (see `backbone_names`).
      pretrained: load the pretrained weights; an error for a backbone that has none.
      include_top: keep the original classifier (ImageNet's, for image backbones).
      dont_load: regexes over the backbone's parameter paths to leave initialised.
      rngs: initialisation randomness; unused when the checkpoint sets every variable.

    Returns:
      The module, and the `LoadReport` (None when `pretrained` is False).

    Raises:
      ValueError: unknown name (with the valid names and the nearest one).
      ValueError: `pretrained` for a backbone without pretrained weights.
    """
    spec = get_backbone_spec(name)
    if not pretrained:
        return spec.constructor(include_top=include_top, rngs=rngs), None
    if spec.load_pretrained is None:
        raise ValueError(f"backbone {name!r} has no pretrained weights: use pretrained=False")
    # Random initialisation compiles a PRNG program per parameter shape — 35 s for
    # EfficientNet-Lite0 on a 2-core CPU — for values the checkpoint then overwrites. So
    # build abstractly and load; only if something is left unset (missing from the file,
    # `dont_load`, RNG state) is the model built for real.
    model = nnx.eval_shape(lambda: spec.constructor(include_top=include_top, rngs=nnx.Rngs(0)))
    report = spec.load_pretrained(model, dont_load=dont_load)
    if _fully_loaded(model):
        return model, report
    model = spec.constructor(include_top=include_top, rngs=rngs)
    return model, spec.load_pretrained(model, dont_load=dont_load)


def _fully_loaded(model: nnx.Module) -> bool:
    return not any(
        isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))
    )
