"""New task heads and the backbone + head classifiers (image, text) used for fine-tuning.

The final kernel of every head starts at zero (BiT / ViT fine-tuning practice): the model
starts from a uniform prediction instead of a random one, so the first updates do not push
large, noisy gradients into the pretrained backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from tlflax.taps import join_taps


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout driven by an explicit key; identity when ``key`` is None.

    An explicit key (rather than an ``nnx.Rngs`` stream inside the module) keeps the head's
    state free of RNG counters, so a jitted step stays a pure function of (params, batch, key).
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class Head(nnx.Module):
    """A linear or one-hidden-layer MLP classifier over pooled backbone features.

    ``kind`` ``ridge`` is the linear head, fitted in closed form by
    :func:`tlflax.train.fit_ridge_head` instead of by gradient steps.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        kind: Literal["linear", "mlp", "ridge"] = "linear",
        hidden_dim: int = 256,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.kind = kind
        self.dropout_rate = dropout_rate
        if kind == "mlp":
            self.hidden = nnx.Linear(in_features, hidden_dim, rngs=rngs)
            in_features = hidden_dim
        self.output = nnx.Linear(
            in_features, num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs
        )

    def __call__(self, features: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        x = dropout(features, self.dropout_rate, keys[0])
        if self.kind == "mlp":
            x = nnx.relu(self.hidden(x))
            x = dropout(x, self.dropout_rate, keys[1])
        return self.output(x)


class _BackboneClassifier(nnx.Module):
    """A pretrained backbone (original top dropped) followed by a new :class:`Head`.

    Parameter paths are ``backbone/...`` and ``head/...``, the names the fine-tuning rules in
    ``params.yaml`` match against. Besides the whole forward pass, a subclass can run its
    backbone in two parts, ``run_prefix`` (layer groups ``[0, k)``, inference mode) and
    ``from_prefix`` (groups ``[k, end)``, pooling and the head), so that the activations of a
    frozen prefix can be computed once and cached (:mod:`tlflax.prefix_cache`).

    ``taps`` (:mod:`tlflax.taps`): the head reads the pooled outputs after these layer groups
    (counted from 1), joined, instead of the backbone's final pooled features; the groups
    above the highest tap never run - the network is cut there. None: the final features.
    """

    def __init__(self, backbone: nnx.Module, head: Head, taps: Sequence[int] | None = None):
        self.backbone = backbone
        self.head = head
        self.taps = None if taps is None else tuple(int(tap) for tap in taps)

    def _classify(
        self, features: jax.Array, train: bool, dropout_key: jax.Array | None
    ) -> jax.Array:
        return self.head(features, dropout_key=dropout_key if train else None)

    def _tapped_features(
        self,
        activations: jax.Array,
        start: int,
        run_group: Callable[[jax.Array, int], jax.Array],
        pool: Callable[[jax.Array], jax.Array],
    ) -> jax.Array:
        """The joined taps, from the activations after ``start`` groups (``start`` <= the
        lowest tap): runs the groups up to the highest tap, pooling after each tap."""
        assert self.taps is not None
        if start > self.taps[0]:
            raise ValueError(f"activations after {start} groups cannot give tap {self.taps[0]}")
        pooled = [pool(activations)] if start in self.taps else []
        for group in range(start, self.taps[-1]):
            activations = run_group(activations, group)
            if group + 1 in self.taps:
                pooled.append(pool(activations))
        return join_taps(pooled)


class ImageClassifier(_BackboneClassifier):
    """An image backbone (``features``, ``run_groups``) followed by a new :class:`Head`."""

    def __call__(
        self, images: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        if self.taps is not None:
            return self.from_prefix(images, 0, train=train, dropout_key=dropout_key)
        return self._classify(self.backbone.features(images, train=train), train, dropout_key)

    def run_prefix(self, images: jax.Array, stop: int) -> jax.Array:
        """Activations of backbone groups ``[0, stop)`` in inference mode."""
        return self.backbone.run_groups(images, 0, stop, train=False)

    def from_prefix(
        self,
        activations: jax.Array,
        start: int,
        *,
        train: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits from the activations :meth:`run_prefix` returned for ``stop=start``."""
        if self.taps is not None:
            features = self._tapped_features(
                activations,
                start,
                lambda x, group: self.backbone.run_groups(x, group, group + 1, train=train),
                # The backbone's own pooling, as its `features` ends (global average for
                # images, over time only for spectrograms).
                self.backbone.pool,
            )
            return self._classify(features, train, dropout_key)
        unpooled = self.backbone.run_groups(activations, start, None, train=train)
        return self._classify(self.backbone.pool(unpooled), train, dropout_key)


class TextClassifier(_BackboneClassifier):
    """A text encoder (MiniLM: ``run_groups`` over token ids, masked mean ``pool``) and a head."""

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        train: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        return self._classify(
            self.head_features(input_ids, attention_mask, train=train), train, dropout_key
        )

    def head_features(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, train: bool = False
    ) -> jax.Array:
        """What the head reads (B, F): the joined taps, or the encoder's final pooled features."""
        return self._features_after(input_ids, attention_mask, 0, train)

    def run_prefix(self, input_ids: jax.Array, attention_mask: jax.Array, stop: int) -> jax.Array:
        """Hidden states (B, T, D) after groups ``[0, stop)`` in inference mode (no dropout)."""
        return self.backbone.run_groups(input_ids, attention_mask, 0, stop, train=False)

    def from_prefix(
        self,
        hidden: jax.Array,
        attention_mask: jax.Array,
        start: int,
        *,
        train: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits from the hidden states :meth:`run_prefix` returned for ``stop=start``
        (token ids for ``start=0``)."""
        features = self._features_after(hidden, attention_mask, start, train)
        return self._classify(features, train, dropout_key)

    def _features_after(
        self, hidden: jax.Array, attention_mask: jax.Array, start: int, train: bool
    ) -> jax.Array:
        """The head's input from the hidden states after ``start`` groups (ids for 0)."""
        if self.taps is not None:
            return self._tapped_features(
                hidden,
                start,
                lambda x, group: self.backbone.run_groups(
                    x, attention_mask, group, group + 1, train=train
                ),
                lambda x: self.backbone.pool(x, attention_mask),
            )
        hidden = self.backbone.run_groups(hidden, attention_mask, start, None, train=train)
        return self.backbone.pool(hidden, attention_mask)
