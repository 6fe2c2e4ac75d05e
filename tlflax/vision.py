"""The image task: building the classifier, feature extraction, and the image forward pass.

Images travel as uint8 at their stored size; resizing, channel expansion and augmentation
happen inside the jitted step, so the host never holds a resized copy of the dataset.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlflax.config import AugmentParams, TrainHeadParams
from tlflax.data.pipeline import augment_images, map_batches, prepare_images
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.registry import create_backbone
from tlflax.taps import tap_widths
from tlflax.train import Batch, Forward


def build_image_classifier(
    backbone_name: str,
    num_classes: int,
    head_cfg: TrainHeadParams,
    *,
    pretrained: bool,
    seed: int = 0,
    taps: Sequence[int] | None = None,
    weights_path: str | Path | None = None,
) -> ImageClassifier:
    """Backbone without its original top, plus a new head shaped by ``head_cfg``.

    ``taps``: the head reads the joined pooled outputs after these layer groups
    (:mod:`tlflax.taps`), and the groups above the highest tap are dropped; None, the
    backbone's final pooled features. ``weights_path``: a state dict to load instead of
    the packaged weights (with ``pretrained``; see :func:`tlflax.models.registry.create_backbone`).
    """
    rngs = nnx.Rngs(seed)
    backbone, _ = create_backbone(
        backbone_name,
        pretrained=pretrained,
        weights_path=weights_path,
        require_every_tensor=True,
        rngs=rngs,
    )
    in_features = backbone.feature_dim
    if taps is not None:
        # The network is cut at its highest tap: the groups above it never run.
        backbone.keep_groups(max(taps))
        # Channel widths do not depend on the image size: any small image gives them.
        shapes = jax.eval_shape(
            lambda: pooled_after_each_group(backbone, jnp.zeros((1, 64, 64, 3), jnp.float32))
        )
        in_features = sum(tap_widths(shapes)[tap - 1] for tap in taps)
    head = Head(
        in_features,
        num_classes,
        kind=head_cfg.head,
        hidden_dim=head_cfg.hidden_dim,
        dropout_rate=head_cfg.dropout,
        rngs=rngs,
    )
    return ImageClassifier(backbone, head, taps)


def abstract_image_classifier(
    backbone_name: str,
    num_classes: int,
    head_cfg: TrainHeadParams,
    taps: Sequence[int] | None = None,
    weights_path: str | Path | None = None,
) -> ImageClassifier:
    """The classifier's structure with shape-only weights, to restore a checkpoint into.

    Random initialisation compiles one kernel per parameter shape (tens of seconds on a small
    CPU); a model about to be overwritten by a checkpoint does not need it.
    """
    return nnx.eval_shape(
        lambda: build_image_classifier(
            backbone_name,
            num_classes,
            head_cfg,
            pretrained=False,
            taps=taps,
            weights_path=weights_path,
        )
    )


def image_forward(
    image_size: int, augment: AugmentParams, compute_dtype: str = "float32"
) -> Forward:
    """The forward pass of an :class:`ImageClassifier` on a batch of uint8 images.

    ``compute_dtype`` is the dtype images enter the network in; with bfloat16 weights (mixed
    precision) float32 images would silently promote every layer back to float32.
    """

    def forward(model: nnx.Module, batch: Batch, train: bool, key: jax.Array | None):
        images = prepare_images(batch["image"], image_size)
        dropout_key = None
        if train and key is not None:
            augment_key, dropout_key = jax.random.split(key)
            images = augment_images(
                augment_key,
                images,
                random_crop=augment.random_crop,
                flip=augment.flip,
                erasing_probability=augment.random_erasing,
            )
        if not train and augment.test_time_flip:
            return _mirror_averaged(model, images.astype(compute_dtype))
        return model(images.astype(compute_dtype), train=train, dropout_key=dropout_key)

    return forward


def _mirror_averaged(model: nnx.Module, images: jax.Array) -> jax.Array:
    """Log of the mean class probabilities of each image and its mirror image: logits whose
    softmax is the averaged prediction (so loss, accuracy and calibration read it as is)."""
    # lax.rev, not images[:, :, ::-1]: with a symbolic batch (jax.export) indexing with a
    # negative step becomes a gather, which the ONNX translation has no rule for.
    both = jnp.concatenate([images, jnp.flip(images, axis=2)])
    log_probabilities = jax.nn.log_softmax(
        model(both, train=False, dropout_key=None).astype(jnp.float32)
    )
    original, mirrored = jnp.split(log_probabilities, 2)
    return jnp.logaddexp(original, mirrored) - jnp.log(2.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _features_step(graphdef, state, images, image_size: int) -> jax.Array:
    # Module-level and keyed on (graphdef, image_size): every split reuses one compilation.
    model = nnx.merge(graphdef, state)
    return model.features(prepare_images(images, image_size), train=False)


def extract_features(
    backbone: nnx.Module,
    images: np.ndarray,
    *,
    image_size: int,
    batch_size: int,
    description: str = "extract",
) -> np.ndarray:
    """Pooled features of the frozen backbone for every image, in order.

    The backbone runs in inference mode (BatchNorm on running statistics). Batches have one
    fixed shape, so this compiles once whatever the dataset size.
    """
    if len(images) == 0:
        return np.zeros((0, backbone.feature_dim), np.float32)
    graphdef, state = nnx.split(backbone)
    features = map_batches(
        lambda batch: _features_step(graphdef, state, batch["image"], image_size),
        {"image": images},
        batch_size=batch_size,
        description=description,
    )
    return features.astype(np.float32)


def pooled_after_each_group(backbone: nnx.Module, images: jax.Array) -> list[jax.Array]:
    """Pooled activations (B, D_g) after each layer group, in forward order, pooled by the
    backbone's ``pool`` (global average for images: D_g = C_g).

    One pass through ``run_groups``, group by group (inference mode): the depth probes of
    :mod:`tlflax.advisor` read every depth for the cost of one forward pass.
    """
    pooled, activations = [], images
    for group in range(len(backbone.group_patterns())):
        activations = backbone.run_groups(activations, group, group + 1, train=False)
        pooled.append(backbone.pool(activations))
    return pooled
