"""Convolution helpers shared by the image backbones.

Two things here are not what `nnx.Conv` gives you:

* TensorFlow-style "same" padding, computed per call from the input size. Checkpoints
  trained in TensorFlow (EfficientNet-Lite) pad asymmetrically — more on the bottom/right —
  and a stride-2 layer fed an even size differs from PyTorch's symmetric padding.
* A depthwise convolution with a per-platform implementation. XLA's CPU depthwise
  convolution is pathological: a 3×3 depthwise conv on (32, 24, 24, 144) took 78 ms
  forward and 258 ms with its gradient here, against 3.6 ms and 86 ms written as k·k
  shifted multiply-adds ("shifted"). The shifted path has a hand-written backward pass
  (`jax.custom_vjp`), itself shifted multiply-adds; autodiff's k·k scattered pads took
  146 ms. A whole EfficientNet-Lite0 train step (batch 32, 96 px): 1.7 s shifted,
  2.6 s shifted with autodiff, 5.6 s XLA, 3.0 s PyTorch eager.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from tlflax.models.matmul import matmul_in_turn

__all__ = [
    "Conv2d",
    "DepthwiseConv2d",
    "DepthwiseImpl",
    "PooledConvBackbone",
    "depthwise_conv",
    "resolve_depthwise_impl",
    "set_batchnorm_modes",
    "set_batchnorm_training",
    "tf_same_padding",
]

DepthwiseImpl = Literal["auto", "xla", "shifted"]
Padding = Literal["SAME", "VALID"]
# One (before, after) pair per spatial dimension.
SpatialPads = tuple[tuple[int, int], tuple[int, int]]

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def tf_same_padding(input_size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding for one dimension: output size ceil(in / stride).

    The total is split with the extra pixel after (bottom/right), as TensorFlow does.

    >>> tf_same_padding(224, 3, 2)
    (0, 1)
    """
    output_size = math.ceil(input_size / stride)
    total = max((output_size - 1) * stride + kernel_size - input_size, 0)
    return total // 2, total - total // 2


def _spatial_pads(
    height: int, width: int, kernel_size: int, stride: int, padding: Padding
) -> SpatialPads:
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "SAME":
        return (
            tf_same_padding(height, kernel_size, stride),
            tf_same_padding(width, kernel_size, stride),
        )
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def resolve_depthwise_impl(impl: DepthwiseImpl) -> Literal["xla", "shifted"]:
    """'auto' → 'shifted' on CPU (where XLA's depthwise conv is slow), else 'xla'."""
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "xla"
    if impl not in ("xla", "shifted"):
        raise ValueError(f"depthwise impl must be 'auto', 'xla' or 'shifted', got {impl!r}")
    return impl


def _output_hw(padded_shape: Sequence[int], kernel_size: int, stride: int) -> tuple[int, int]:
    return (
        (padded_shape[1] - kernel_size) // stride + 1,
        (padded_shape[2] - kernel_size) // stride + 1,
    )


def _tap_window(
    padded: jax.Array, i: int, j: int, stride: int, out_hw: tuple[int, int]
) -> jax.Array:
    """The pixels kernel tap (i, j) reads for every output pixel: padded[:, i::s, j::s, :]."""
    batch, _, _, channels = padded.shape
    out_height, out_width = out_hw
    return lax.slice(
        padded,
        (0, i, j, 0),
        (batch, i + (out_height - 1) * stride + 1, j + (out_width - 1) * stride + 1, channels),
        (1, stride, stride, 1),
    )


def _shifted_taps(
    padded: jax.Array, kernel: jax.Array, stride: int, out_hw: tuple[int, int]
) -> jax.Array:
    """Depthwise conv of an already padded input: sum over taps of window × kernel[i, j, 0]."""
    kernel_size = kernel.shape[0]
    result = None
    for i in range(kernel_size):
        for j in range(kernel_size):
            term = _tap_window(padded, i, j, stride, out_hw) * kernel[i, j, 0]
            result = term if result is None else result + term
    return result


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(
    x: jax.Array, kernel: jax.Array, stride: int, pads: SpatialPads
) -> jax.Array:
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    return _shifted_taps(padded, kernel, stride, _output_hw(padded.shape, kernel.shape[0], stride))


def _shifted_depthwise_forward(x, kernel, stride, pads):
    return _shifted_depthwise(x, kernel, stride, pads), (x, kernel)


def _shifted_depthwise_backward(stride, pads, residuals, output_grad):
    x, kernel = residuals
    kernel_size = kernel.shape[0]
    _, height, width, _ = x.shape
    out_height, out_width = output_grad.shape[1:3]
    # Input gradient: with the output gradient dilated by the stride (zeros between rows
    # and columns), grad_x[p] = sum_t dilated[p + pad_before - t] * kernel[t] — a stride-1
    # depthwise conv of the padded, dilated gradient with the flipped kernel. One lax.pad
    # does the dilation and the padding, and its negative edges crop to x's extent.
    (top, _), (left, _) = pads
    before_h, before_w = kernel_size - 1 - top, kernel_size - 1 - left
    after_h = height + kernel_size - 1 - before_h - ((out_height - 1) * stride + 1)
    after_w = width + kernel_size - 1 - before_w - ((out_width - 1) * stride + 1)
    dilated = lax.pad(
        output_grad,
        jnp.zeros((), output_grad.dtype),
        ((0, 0, 0), (before_h, after_h, stride - 1), (before_w, after_w, stride - 1), (0, 0, 0)),
    )
    # Kernel gradient: each tap's weight multiplied exactly the window it read.
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    taps = [
        jnp.sum(
            _tap_window(padded, i, j, stride, (out_height, out_width)) * output_grad, axis=(0, 1, 2)
        )
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]
    kernel_grad = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    # The input gradient waits for the kernel gradient (see tlflax.models.matmul): run side
    # by side on the CPU they slow each other down; in turn the EfficientNet-Lite0 train step
    # took 0.67 s instead of 0.76 s (median of 10 rounds; ratio to PyTorch 0.86 -> 0.99).
    kernel_grad, dilated = lax.optimization_barrier((kernel_grad, dilated))
    input_grad = _shifted_taps(dilated, kernel[::-1, ::-1], 1, (height, width))
    return input_grad.astype(x.dtype), kernel_grad


_shifted_depthwise.defvjp(_shifted_depthwise_forward, _shifted_depthwise_backward)


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: Padding = "SAME",
    impl: DepthwiseImpl = "auto",
) -> jax.Array:
    """Depthwise 2-D convolution (one k×k filter per channel), NHWC.

    Args:
      x: input, (batch, height, width, channels).
      kernel: (k, k, 1, channels) — the layout of a grouped `lax.conv_general_dilated`
        kernel and of `nnx.Conv(feature_group_count=channels)`.
      stride: the same in both spatial dimensions.
      padding: "SAME" (TensorFlow's, see `tf_same_padding`) or "VALID".
      impl: "xla" (`lax.conv_general_dilated` with `feature_group_count`), "shifted"
        (a sum of k·k strided slices times kernel taps, with a matching hand-written
        gradient) or "auto" ("shifted" on CPU, "xla" elsewhere).

    Returns:
      (batch, out_height, out_width, channels).
    """
    kernel_size, kernel_width, one, channels = kernel.shape
    if kernel_size != kernel_width or one != 1 or channels != x.shape[-1]:
        raise ValueError(
            f"depthwise kernel must be (k, k, 1, {x.shape[-1]}) for input {x.shape}, "
            f"got {kernel.shape}"
        )
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    pads = _spatial_pads(x.shape[1], x.shape[2], kernel_size, stride, padding)
    if resolve_depthwise_impl(impl) == "shifted":
        return _shifted_depthwise(x, kernel, stride, pads)
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=pads,
        dimension_numbers=_NHWC_HWIO,
        feature_group_count=channels,
    )


class Conv2d(nnx.Module):
    """A bias-free 2-D convolution with TensorFlow "same" padding computed from each input.

    Bias-free because every convolution in the backbones that use it feeds a BatchNorm.
    The kernel is HWIO, at path `kernel`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        padding: Padding = "SAME",
        rngs: nnx.Rngs,
    ) -> None:
        # TF EfficientNet's initialiser; it matters for layers re-initialised via dont_load.
        initializer = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(
            initializer(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels))
        )
        self.stride = stride
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        # Promote like Flax's layers do: bf16 inputs with f32 kernels compute in f32.
        dtype = jnp.result_type(x, kernel)
        if kernel.shape[:2] == (1, 1) and self.stride == 1:
            # A pointwise convolution is a matrix product over the channels. Written as one,
            # its gradients are matrix products too; as a convolution, XLA's CPU backend
            # computes them 2.5-4x slower (e.g. (32, 24, 24, 144) -> 24 channels: 20 ms vs
            # 8 ms for both gradients). Most of EfficientNet's weights are in such layers.
            batch, height, width, channels = x.shape
            rows = x.astype(dtype).reshape(batch * height * width, channels)
            product = matmul_in_turn(rows, kernel[0, 0].astype(dtype))
            return product.reshape(batch, height, width, -1)
        pads = _spatial_pads(x.shape[1], x.shape[2], kernel.shape[0], self.stride, self.padding)
        return lax.conv_general_dilated(
            x.astype(dtype),
            kernel.astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=pads,
            dimension_numbers=_NHWC_HWIO,
        )


class DepthwiseConv2d(nnx.Module):
    """A bias-free depthwise convolution; kernel (k, k, 1, channels) at path `kernel`.

    `impl` picks the implementation (see `depthwise_conv`); it is not a parameter, so
    checkpoints move freely between implementations.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        padding: Padding = "SAME",
        impl: DepthwiseImpl = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        # fan_in of a (k, k, 1, C) kernel is k·k: the true fan of one per-channel filter
        # (fan_out would also count the C independent filters).
        initializer = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        self.kernel = nnx.Param(initializer(rngs.params(), (kernel_size, kernel_size, 1, channels)))
        self.stride = stride
        self.padding = padding
        self.impl = resolve_depthwise_impl(impl)

    def __call__(self, x: jax.Array) -> jax.Array:
        return depthwise_conv(x, self.kernel[...], self.stride, self.padding, self.impl)


def pretrained_batch_norm(
    channels: int, *, epsilon: float, momentum: float, rngs: nnx.Rngs
) -> nnx.BatchNorm:
    """BatchNorm on running statistics by default, whatever ``train`` says.

    Fine-tuning on a small data set with batch statistics wrecks pretrained BatchNorm (Keras'
    transfer-learning advice); :func:`set_batchnorm_training` flips this for callers that
    want batch statistics.
    """
    return nnx.BatchNorm(
        channels, use_running_average=True, momentum=momentum, epsilon=epsilon, rngs=rngs
    )


def set_batchnorm_training(model: nnx.Module, enabled: bool) -> None:
    """Switches every BatchNorm in `model` to batch statistics (True) or running ones (False).

    The backbones build BatchNorm with running statistics and keep them whatever `train`
    says — Keras' advice for fine-tuning on small data sets. With `enabled`, BatchNorm
    normalises with each batch's statistics and updates its running averages (which then
    have to be carried out of a jitted step as `nnx.BatchStat` state).
    """
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            module.use_running_average = not enabled


def set_batchnorm_modes(
    model: nnx.Module, settings: Mapping[str, Any], batchnorm: Literal["frozen", "train"]
) -> list[str]:
    """Batch statistics for the BatchNorm layers that train, running statistics elsewhere.

    With ``batchnorm="train"`` a BatchNorm layer normalises with (and updates its running
    averages from) each batch's statistics only when its own scale and bias train: the
    BatchNorm layers of frozen groups keep the statistics they came with, like their weights.

    Args:
      model: updated in place.
      settings: parameter path -> setting with a ``frozen`` attribute
        (:func:`tlflax.transfer.resolve_settings`).
      batchnorm: ``"frozen"`` keeps every BatchNorm on its running statistics.

    Returns:
      The paths of the BatchNorm layers that now use batch statistics.
    """
    trained = []
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            name = "/".join(map(str, path))
            scale = settings.get(f"{name}/scale")
            trains = batchnorm == "train" and scale is not None and not scale.frozen
            module.use_running_average = not trains
            if trains:
                trained.append(name)
    return trained


def global_average_pool(activations: jax.Array) -> jax.Array:
    """A group's (B, h, w, C) activations averaged over both spatial axes: (B, C)."""
    return jnp.mean(activations, axis=(1, 2))


def check_kept_groups(groups: int, available: int) -> None:
    """A backbone can be cut after 1 to all of its ``available`` layer groups."""
    if not 1 <= groups <= available:
        raise ValueError(f"cannot keep {groups} layer groups of a backbone with {available}")


class PooledConvBackbone(nnx.Module):
    """What the convolutional backbones share: layer groups run in order, global average
    pooling, and an optional ImageNet classifier on top.

    A subclass sets ``self.classifier`` (an ``nnx.Linear`` or None) and ``feature_dim``, and
    says what its groups are in ``_groups``; the classifier belongs to no group.
    """

    classifier: nnx.Linear | None
    feature_dim: int

    def _groups(self) -> list[Callable[[jax.Array], jax.Array]]:
        raise NotImplementedError

    def run_groups(
        self, x: jax.Array, start: int, stop: int | None, *, train: bool = False
    ) -> jax.Array:
        """Runs layer groups [start, stop) on `x`; group 0 takes images (NHWC RGB in [0, 1]).

        `stop=None` runs to the end, giving the last group's (B, h, w, feature_dim)
        activation, unpooled.
        """
        # No layer is stochastic: `train` is accepted for the common backbone interface;
        # BatchNorm's mode is set by `set_batchnorm_training`.
        del train
        for group in self._groups()[start:stop]:
            x = group(x)
        return x

    def pool(self, activations: jax.Array) -> jax.Array:
        """A group's (B, h, w, C) activations as one vector per example: the global average,
        (B, C). The final features, the taps and the depth probes all pool with it."""
        return global_average_pool(activations)

    def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Pooled features (B, feature_dim) of NHWC RGB images in [0, 1]."""
        return self.pool(self.run_groups(images, 0, None, train=train))

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) with a classifier, else pooled features (B, feature_dim)."""
        features = self.features(images, train=train)
        return self.classifier(features) if self.classifier is not None else features
