"""A small CNN: the from-scratch baseline, and a fast stand-in backbone for tests.

It has the same interface as the pretrained image backbones (``features``, ``run_groups``,
``group_patterns``), so every training path can be exercised on it in seconds.
"""

from __future__ import annotations

import jax
from flax import nnx

from tlflax.models.layers import check_kept_groups, global_average_pool


class ConvBlock(nnx.Module):
    """3×3 conv → BatchNorm → ReLU, stride 2."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_channels, out_channels, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs
        )
        # Running statistics by default, like the pretrained backbones; see set_batchnorm_training.
        self.norm = nnx.BatchNorm(out_channels, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.norm(self.conv(x)))


class SmallCNN(nnx.Module):
    """``len(widths)`` stride-2 conv blocks, then global average pooling."""

    def __init__(self, *, widths: tuple[int, ...] = (32, 64, 128), rngs: nnx.Rngs):
        channels = (3, *widths)
        self.blocks = nnx.List(
            [ConvBlock(a, b, rngs=rngs) for a, b in zip(channels[:-1], channels[1:], strict=True)]
        )
        self.feature_dim = widths[-1]

    def run_groups(
        self, x: jax.Array, start: int, stop: int | None, *, train: bool = False
    ) -> jax.Array:
        """Run blocks ``[start, stop)``; block 0 takes images in [0, 1]."""
        # The input scaling belongs to block 0: an empty range returns its input unchanged.
        if start == 0 and (stop is None or stop > 0):
            x = (x - 0.5) / 0.25
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def pool(self, activations: jax.Array) -> jax.Array:
        """Global average pooling of a group's (B, h, w, C) activations: (B, C)."""
        return global_average_pool(activations)

    def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.pool(self.run_groups(images, 0, None, train=train))

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.features(images, train=train)

    def group_patterns(self) -> list[str]:
        return [rf"^blocks/{i}/" for i in range(len(self.blocks))]

    def keep_groups(self, groups: int) -> None:
        """Drop every block after the first ``groups`` (a network cut at that depth)."""
        check_kept_groups(groups, len(self.blocks))
        self.blocks = nnx.List(list(self.blocks)[:groups])
