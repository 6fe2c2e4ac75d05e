"""ResNet-18 and ResNet-50 in Flax NNX, loadable from torchvision/timm state dicts.

The architecture is torchvision's (ResNet v1.5: a bottleneck block strides in its 3×3
convolution, not its first 1×1), with PyTorch's conventions kept wherever they change
the numbers: symmetric explicit padding (k // 2 on every side, unlike TensorFlow's
"same"), BatchNorm epsilon 1e-5, and a 3×3 stride-2 max-pool padded by one pixel.
No pretrained ResNet ships with this project; bring a `.pth`/`.npz` state dict and load
it with `load_resnet_weights` (or `tlflax.models.registry.load_backbone_weights`).

Parameter paths ('/'-joined, relative to the model) follow the other image backbones
so that the same transfer rules read the same on every family: `stem/conv/kernel`,
`stem/norm/scale`, `blocks/<i>/conv1/kernel`, `blocks/<i>/norm2/mean`,
`blocks/<i>/downsample/conv/kernel`, `classifier/kernel`; block `i` counts the residual
blocks of all four stages in forward order (`layer1.0` is block 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from tlflax.models.layers import PooledConvBackbone, check_kept_groups, pretrained_batch_norm
from tlflax.models.torch_weights import TORCH_LEAF_NAMES, LoadReport, load_state_dict_into

__all__ = [
    "VARIANTS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResidualBlock",
    "load_resnet_weights",
    "torch_key",
]

# torchvision's input statistics (ImageNet RGB mean/std); images arrive in [0, 1].
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# PyTorch's BatchNorm2d defaults; Flax's momentum is the decay (PyTorch's momentum 0.1).
_BATCHNORM_EPSILON = 1e-5
_BATCHNORM_MOMENTUM = 0.9

STEM_CHANNELS = 64
STAGE_CHANNELS = (64, 128, 256, 512)


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, *, rngs: nnx.Rngs
) -> nnx.Conv:
    """A bias-free convolution padded like PyTorch's `padding=kernel_size // 2`."""
    pad = kernel_size // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        # torchvision's kaiming_normal_(mode="fan_out"); it matters for layers that
        # `dont_load` leaves initialised.
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        rngs=rngs,
    )


def _batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return pretrained_batch_norm(
        channels, epsilon=_BATCHNORM_EPSILON, momentum=_BATCHNORM_MOMENTUM, rngs=rngs
    )


class Downsample(nnx.Module):
    """The projection shortcut (1×1 conv, BatchNorm) of a block that changes shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = _conv(in_channels, out_channels, 1, stride, rngs=rngs)
        self.norm = _batch_norm(out_channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class ResidualBlock(nnx.Module):
    """Convolution → BatchNorm layers (ReLU between them) plus a shortcut, then ReLU.

    Subclasses set the kernel sizes; the first 3×3 convolution strides (ResNet v1.5) and
    the last one widens to `width * expansion`. Children: `conv1`/`norm1`, `conv2`/`norm2`,
    ..., and `downsample` when the shape changes.
    """

    kernel_sizes: tuple[int, ...]
    expansion: int

    def __init__(self, in_channels: int, width: int, stride: int, *, rngs: nnx.Rngs):
        out_channels = width * self.expansion
        layer_widths = [width] * (len(self.kernel_sizes) - 1) + [out_channels]
        strided_layer = self.kernel_sizes.index(3)
        channels = in_channels
        for index, (kernel_size, layer_width) in enumerate(
            zip(self.kernel_sizes, layer_widths, strict=True)
        ):
            layer_stride = stride if index == strided_layer else 1
            conv = _conv(channels, layer_width, kernel_size, layer_stride, rngs=rngs)
            # Numbered from 1 like torchvision's conv1/bn1, which the importer maps to.
            setattr(self, f"conv{index + 1}", conv)
            setattr(self, f"norm{index + 1}", _batch_norm(layer_width, rngs))
            channels = layer_width
        self.downsample = (
            Downsample(in_channels, out_channels, stride, rngs=rngs)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = x
        layers = len(self.kernel_sizes)
        for number in range(1, layers + 1):
            out = getattr(self, f"norm{number}")(getattr(self, f"conv{number}")(out))
            out = jax.nn.relu(out) if number < layers else out
        shortcut = self.downsample(x) if self.downsample is not None else x
        return jax.nn.relu(out + shortcut)


class BasicBlock(ResidualBlock):
    """Two 3×3 convolutions: ResNet-18/34."""

    kernel_sizes = (3, 3)
    expansion = 1


class Bottleneck(ResidualBlock):
    """1×1 reduce, 3×3, 1×1 expand to 4× the width: ResNet-50 and deeper."""

    kernel_sizes = (1, 3, 1)
    expansion = 4


class Stem(nnx.Module):
    """Input normalisation, 7×7 stride-2 conv, BatchNorm, ReLU, 3×3 stride-2 max-pool."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = _conv(3, STEM_CHANNELS, 7, 2, rngs=rngs)
        self.norm = _batch_norm(STEM_CHANNELS, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = (images - _IMAGENET_MEAN) / _IMAGENET_STD
        x = jax.nn.relu(self.norm(self.conv(x)))
        # PyTorch pads a max-pool with -inf, as Flax does, so the border max is exact.
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNetVariant(NamedTuple):
    """A ResNet depth: the block type and the number of blocks in each of the four stages."""

    block: type[ResidualBlock]
    stage_depths: tuple[int, int, int, int]

    @property
    def feature_dim(self) -> int:
        """Width of the pooled features: the last stage's output channels."""
        return STAGE_CHANNELS[-1] * self.block.expansion


VARIANTS: dict[str, ResNetVariant] = {
    "resnet18": ResNetVariant(BasicBlock, (2, 2, 2, 2)),
    "resnet50": ResNetVariant(Bottleneck, (3, 4, 6, 3)),
}


class ResNet(PooledConvBackbone):
    """A torchvision-layout ResNet with the common backbone interface.

    Layer groups, the unit of `run_groups` and `group_patterns`, are in forward order:
    the stem (with input normalisation and the max-pool), then each residual block. The
    classifier (`classifier/`), present only with `include_top`, is in no group.

    BatchNorm uses its running statistics unless `set_batchnorm_training(model, True)`
    is called; `train` is accepted for the common interface and changes nothing here.

    Args:
      variant: a key of `VARIANTS` ("resnet18", "resnet50").
      include_top: add the `classifier` Linear(feature_dim → num_classes); `__call__`
        then returns logits instead of pooled features.
      num_classes: the classifier's width.
      rngs: initialisation randomness.
    """

    def __init__(
        self,
        variant: str,
        *,
        include_top: bool = False,
        num_classes: int = 1000,
        rngs: nnx.Rngs,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown ResNet variant {variant!r}: valid ones are {list(VARIANTS)}")
        block_type, stage_depths = VARIANTS[variant]
        self.stem = Stem(rngs=rngs)
        blocks, torch_block_names = [], []
        in_channels = STEM_CHANNELS
        for stage, (width, depth) in enumerate(zip(STAGE_CHANNELS, stage_depths, strict=True)):
            for index in range(depth):
                # The first block of stages 2-4 halves the resolution (stage 1 follows the pool).
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block_type(in_channels, width, stride, rngs=rngs))
                torch_block_names.append(f"layer{stage + 1}.{index}")
                in_channels = width * block_type.expansion
        self.blocks = nnx.List(blocks)
        # torchvision's names for the same blocks, in the same order: the importer's map.
        self.torch_block_names = tuple(torch_block_names)
        self.feature_dim = in_channels
        self.classifier = nnx.Linear(in_channels, num_classes, rngs=rngs) if include_top else None

    def _groups(self) -> list[Callable[[jax.Array], jax.Array]]:
        return [self.stem, *self.blocks]

    def group_patterns(self) -> list[str]:
        """One regex per layer group, in forward order, over '/'-joined parameter paths."""
        return [r"^stem/", *(rf"^blocks/{index}/" for index in range(len(self.blocks)))]

    def keep_groups(self, groups: int) -> None:
        """Drop every layer group after the first ``groups`` (a network cut at that depth)."""
        check_kept_groups(groups, len(self.group_patterns()))
        self.blocks = nnx.List(list(self.blocks)[: groups - 1])


# --- torchvision / timm state dicts: the one place that knows their names ---------------

# Our module path → torchvision's, outside the residual blocks.
_TORCH_TOP_MODULES = {"stem/conv": "conv1", "stem/norm": "bn1", "classifier": "fc"}
# Our module path inside block i → torchvision's, under that block's `layer<s>.<j>`.
_TORCH_BLOCK_MODULES = {
    **{f"conv{n}": f"conv{n}" for n in (1, 2, 3)},
    **{f"norm{n}": f"bn{n}" for n in (1, 2, 3)},
    "downsample/conv": "downsample.0",
    "downsample/norm": "downsample.1",
}


def torch_key(path: str, torch_block_names: Sequence[str]) -> str | None:
    """The torchvision state-dict key for one of our '/'-joined parameter paths.

    Args:
      path: e.g. "blocks/2/downsample/norm/mean".
      torch_block_names: `ResNet.torch_block_names`, block index → "layer<s>.<j>".

    Returns:
      e.g. "layer2.0.downsample.1.running_mean"; None for a path with no counterpart.

    >>> torch_key("blocks/2/downsample/norm/mean", ["layer1.0", "layer1.1", "layer2.0"])
    'layer2.0.downsample.1.running_mean'
    """
    module, _, leaf = path.rpartition("/")
    block = re.fullmatch(r"blocks/(\d+)/(.+)", module)
    if block is not None:
        torch_module = _TORCH_BLOCK_MODULES.get(block[2])
        if torch_module is not None:
            torch_module = f"{torch_block_names[int(block[1])]}.{torch_module}"
    else:
        torch_module = _TORCH_TOP_MODULES.get(module)
    if torch_module is None or leaf not in TORCH_LEAF_NAMES:
        return None
    return f"{torch_module}.{TORCH_LEAF_NAMES[leaf]}"


def load_resnet_weights(
    model: ResNet,
    state_dict: dict[str, np.ndarray],
    *,
    dont_load: Sequence[str] = (),
) -> LoadReport:
    """Copies a torchvision/timm ResNet state dict into `model`, in place.

    Conv kernels go OIHW → HWIO, `fc.weight` (out, in) → (in, out), BatchNorm
    weight/bias/running_mean/running_var → scale/bias/mean/var; `num_batches_tracked`
    is ignored.

    Args:
      model: the model to fill (its variant must match the file's).
      state_dict: e.g. `read_torch_state_dict(path)` or `tlflax.models.weights.read_weights`.
      dont_load: regexes over our paths to leave initialised (e.g. `r"^classifier/"`).

    Returns:
      A `LoadReport`: with `include_top=False`, `fc.weight` and `fc.bias` are `unexpected`.

    Raises:
      InputError: a shape differs (naming the key and both shapes) outside `dont_load`.
    """
    return load_state_dict_into(
        model,
        state_dict,
        source_key=lambda path: torch_key(path, model.torch_block_names),
        dont_load=dont_load,
        ignore_source_key=r"\.num_batches_tracked$",
    )
