"""Input pipeline: fixed-shape numpy batches on the host, image preprocessing in JAX.

Every batch has the same shape — the last partial batch is padded and masked — so a
jitted step compiles once. Shuffling draws one index permutation per epoch and gathers
one batch at a time, so host memory stays at one batch whatever the dataset size, when the
inputs are read on demand (:mod:`tlflax.data.streaming`, read ahead in background threads).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tlflax.data.errors import DataError
from tlflax.data.streaming import is_stored, prefetched

MASK_KEY = "mask"


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """How many batches :func:`iterate_batches` yields for ``num_examples`` examples."""
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def epoch_order(num_examples: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation seeded by ``(seed, epoch)``, or 0..N-1."""
    if not shuffle:
        return np.arange(num_examples)
    # Seeding with the pair gives every epoch its own reproducible stream without
    # advancing any shared state, so epoch 7 can be replayed alone after a restart.
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_examples)


def balanced_order(labels: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """A class-balanced epoch: as many draws as ``labels`` has examples, shared evenly
    between the classes present, seeded by ``(seed, epoch)``.

    Each class gets ``N // C`` draws (the remainder goes to classes picked at random), taken
    from shuffled passes over its examples: a small class's examples repeat as evenly as they
    can, a large class's are sub-sampled without repeats. The draws come in a random order.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    # Its own stream (a third seed word): the plain shuffle of epoch_order is left as it was.
    generator = np.random.Generator(np.random.PCG64([seed, epoch, 1]))
    draws = np.full(len(classes), len(labels) // len(classes))
    draws[generator.choice(len(classes), len(labels) % len(classes), replace=False)] += 1
    chosen = []
    for class_label, wanted in zip(classes, draws, strict=True):
        members = np.flatnonzero(labels == class_label)
        passes = -(-wanted // len(members))
        cycled = np.concatenate([generator.permutation(members) for _ in range(passes)])
        chosen.append(cycled[:wanted])
    return generator.permutation(np.concatenate(chosen))


def iterate_batches(
    arrays: dict[str, np.ndarray],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    drop_remainder: bool = False,
    balanced: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
    """Yield fixed-shape batches of aligned arrays, each example once per epoch.

    Args:
        arrays: name -> array; all share their first dimension (the examples).
        batch_size: examples per batch.
        shuffle: visit examples in a random order seeded by ``(seed, epoch)``.
        seed: base seed of the order.
        epoch: epoch number; each epoch has its own order.
        drop_remainder: skip the last partial batch instead of padding it.
        balanced: draw the epoch class-balanced from ``arrays["label"]`` in a random order
            (:func:`balanced_order`, same length) instead of visiting each example once.
        shard: ``(index, count)``: yield only the ``index``-th of ``count`` equal parts of
            every batch (this process's rows when ``count`` processes train together; each
            reads only its own). ``batch_size`` is the global batch, a multiple of ``count``.

    Returns:
        An iterator of dicts with the keys of ``arrays`` plus ``"mask"`` (float32, 1 for real rows, 0 for
        padding). The last partial batch repeats its first row as padding, so padded rows
        hold valid values (labels in range, finite pixels) and only the mask tells them apart.

    Raises:
        DataError: naming the key whose length differs, or a key named ``"mask"``.

    Example:
        >>> batches = list(iterate_batches({"x": np.arange(5)}, 2, shuffle=False, seed=0))
        >>> batches[-1]["x"], batches[-1]["mask"]
        (array([4, 4]), array([1., 0.], dtype=float32))
    """
    num_examples = _checked_length(arrays, batch_size, shard)
    # Checked above, outside the generator, so bad input fails at the call, not at first use.
    if balanced:
        order = balanced_order(arrays["label"], seed=seed, epoch=epoch)
    else:
        order = epoch_order(num_examples, shuffle=shuffle, seed=seed, epoch=epoch)
    batch_at = functools.partial(_batch_at, arrays, order, batch_size, shard)
    count = num_batches(len(order), batch_size, drop_remainder)
    if is_stored(arrays):
        # Columns read from disk: the next batches are read while this one is used.
        return prefetched(batch_at, count)
    return map(batch_at, range(count))


def _checked_length(arrays: dict, batch_size: int, shard: tuple[int, int]) -> int:
    """The number of examples of ``arrays``, once they and the batching are checked."""
    if batch_size < 1:
        raise DataError("batch_size", f"must be >= 1, got {batch_size}")
    if MASK_KEY in arrays:
        raise DataError(f"arrays[{MASK_KEY!r}]", "key is reserved for the padding mask")
    lengths = {key: len(array) for key, array in arrays.items()}
    num_examples = next(iter(lengths.values()), 0)
    for key, length in lengths.items():
        if length != num_examples:
            raise DataError(f"arrays[{key!r}]", f"lengths differ: {lengths}")
    shard_index, shard_count = shard
    if batch_size % shard_count or not 0 <= shard_index < shard_count:
        raise DataError("batch_size", f"{batch_size} does not split into {shard_count} equal parts")
    return num_examples


def _batch_at(
    arrays: dict, order: np.ndarray, batch_size: int, shard: tuple[int, int], batch_index: int
) -> dict[str, np.ndarray]:
    """Batch ``batch_index`` of the epoch ``order`` (the last one padded), ``shard``'s rows."""
    indices = order[batch_index * batch_size : (batch_index + 1) * batch_size]
    num_real = len(indices)
    if num_real < batch_size:
        indices = np.concatenate([indices, np.full(batch_size - num_real, indices[0])])
    mask = (np.arange(batch_size) < num_real).astype(np.float32)
    shard_size = batch_size // shard[1]
    rows = slice(shard[0] * shard_size, (shard[0] + 1) * shard_size)
    batch = {key: array[indices[rows]] for key, array in arrays.items()}
    batch[MASK_KEY] = mask[rows]
    return batch


def map_batches(
    function: Callable[[dict[str, np.ndarray]], jax.Array],
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    description: str,
) -> np.ndarray:
    """``function`` over fixed-shape batches of ``arrays`` in order, padding rows dropped.

    The one inference loop of the library (features, cached activations, predictions):
    every batch has the same shape (the last is padded), so a jitted ``function`` compiles
    once; a progress bar shows in a terminal and stays out of CI logs.

    Raises:
      DataError: ``arrays`` hold no examples (naming ``description``).
    """
    total = num_batches(len(next(iter(arrays.values()))), batch_size)
    if total == 0:
        raise DataError(description, "no examples")
    outputs = []
    batches = iterate_batches(arrays, batch_size, shuffle=False, seed=0)
    for batch in tqdm(batches, total=total, desc=description, unit="batch", disable=None):
        outputs.append(np.asarray(function(batch))[batch[MASK_KEY] > 0])
    return np.concatenate(outputs)


def prepare_images(images: jax.Array, image_size: int) -> jax.Array:
    """Turn uint8 NHWC images into float32 RGB in [0, 1] at ``image_size`` x ``image_size``.

    Pure and jit-friendly (``image_size`` must be static under ``jax.jit``).

    Args:
        images: uint8 (N, H, W, C) with C = 1 (grayscale) or 3 (RGB).
        image_size: output height and width.

    Returns:
        float32 (N, image_size, image_size, 3), bilinearly resized.
    """
    batch, height, width, channels = images.shape
    if channels not in (1, 3):
        raise DataError("images", f"expected 1 or 3 channels, got shape {images.shape}")
    scaled = images.astype(jnp.float32) / 255.0
    if (height, width) != (image_size, image_size):
        # Resize before widening to RGB: a third of the work for grayscale input.
        scaled = jax.image.resize(
            scaled, (batch, image_size, image_size, channels), method="bilinear"
        )
    if channels == 1:
        scaled = jnp.repeat(scaled, 3, axis=-1)
    # Anti-aliased resizing can overshoot by rounding error; keep the promised range.
    return jnp.clip(scaled, 0.0, 1.0)


def augment_images(
    rng: jax.Array,
    images: jax.Array,
    *,
    random_crop: bool,
    flip: bool,
    crop_padding: int = 4,
    erasing_probability: float = 0.0,
) -> jax.Array:
    """Randomly crop, horizontally flip and erase each image independently; shapes are unchanged.

    The crop pads every side by ``crop_padding`` pixels (reflecting the border, so no
    artificial black frame appears) and cuts a window of the original size at a random
    offset. Pure and jit-friendly (the keyword arguments must be static under ``jax.jit``).

    Args:
        rng: a JAX PRNG key.
        images: float (N, H, W, C) in [0, 1].
        random_crop: apply the padded random crop.
        flip: mirror each image left-right with probability 1/2.
        crop_padding: pixels of padding per side for the crop.
        erasing_probability: share of images in which one random rectangle is replaced
            by uniform noise (:func:`erase_random_rectangles`); 0 leaves every image whole.

    Returns:
        The augmented images, same shape and dtype as ``images``.
    """
    batch, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(rng)
    if random_crop and crop_padding > 0:
        padding = ((0, 0), (crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0))
        padded = jnp.pad(images, padding, mode="reflect")
        offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * crop_padding + 1)

        def crop_one(image: jax.Array, offset: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(
                image, (offset[0], offset[1], 0), (height, width, channels)
            )

        images = jax.vmap(crop_one)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
        images = jnp.where(mirror, images[:, :, ::-1, :], images)
    if erasing_probability > 0:
        # A key of its own, folded in, so crops and flips stay what they were without it.
        images = erase_random_rectangles(jax.random.fold_in(rng, 1), images, erasing_probability)
    return images


# Random erasing's ranges (Zhong et al., AAAI 2020, the paper's defaults): the rectangle
# covers 2-40% of the image, with height/width ratio between 0.3 and 1/0.3.
ERASED_AREA_RANGE = (0.02, 0.4)
ERASED_ASPECT_RANGE = (0.3, 1 / 0.3)


def _box_masks(
    height: int, width: int, top: jax.Array, bottom: jax.Array, left: jax.Array, right: jax.Array
) -> jax.Array:
    """(N, height, width) bool: True inside each image's box, rows ``top`` to ``bottom`` and
    columns ``left`` to ``right`` (each (N,), ends excluded)."""
    rows = jnp.arange(height)[None, :, None]
    columns = jnp.arange(width)[None, None, :]
    return (
        (rows >= top[:, None, None])
        & (rows < bottom[:, None, None])
        & (columns >= left[:, None, None])
        & (columns < right[:, None, None])
    )


def erase_random_rectangles(rng: jax.Array, images: jax.Array, probability: float) -> jax.Array:
    """Random erasing: with ``probability``, one rectangle of each image becomes uniform noise.

    Occluding part of the object makes the network use all of it rather than its single most
    telling patch; on small data this is a regulariser that costs one mask per batch. The
    rectangle's area and aspect ratio are drawn from :data:`ERASED_AREA_RANGE` and
    :data:`ERASED_ASPECT_RANGE` (the aspect log-uniformly), its position uniformly among
    those that keep it inside the image.

    Args:
        rng: a JAX PRNG key.
        images: float (N, H, W, C) in [0, 1].
        probability: the chance that an image is erased at all.

    Returns:
        The images with their rectangles replaced, same shape and dtype.
    """
    batch, height, width, _ = images.shape
    keys = jax.random.split(rng, 6)
    area = jax.random.uniform(
        keys[0], (batch,), minval=ERASED_AREA_RANGE[0], maxval=ERASED_AREA_RANGE[1]
    ) * (height * width)
    log_aspect = jax.random.uniform(
        keys[1],
        (batch,),
        minval=jnp.log(ERASED_ASPECT_RANGE[0]),
        maxval=jnp.log(ERASED_ASPECT_RANGE[1]),
    )
    aspect = jnp.exp(log_aspect)
    rect_height = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, height).astype(jnp.int32)
    rect_width = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, width).astype(jnp.int32)
    top = jnp.floor(jax.random.uniform(keys[2], (batch,)) * (height - rect_height + 1))
    left = jnp.floor(jax.random.uniform(keys[3], (batch,)) * (width - rect_width + 1))
    top, left = top.astype(jnp.int32), left.astype(jnp.int32)
    inside = _box_masks(height, width, top, top + rect_height, left, left + rect_width)
    erased = jax.random.bernoulli(keys[4], probability, (batch,))
    mask = (inside & erased[:, None, None])[..., None]
    noise = jax.random.uniform(keys[5], images.shape, dtype=images.dtype)
    return jnp.where(mask, noise, images)


def cutmix_images(
    rng: jax.Array, images: jax.Array, mask: jax.Array, probability: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CutMix (Yun et al., ICCV 2019): paste a box of another image of the batch into each
    image with ``probability``; the target becomes a mix of both labels by area.

    The box covers a share of the image drawn uniformly (the paper's Beta(1, 1)), with the
    image's aspect ratio, centred uniformly and clipped at the borders; the label share is
    the area actually pasted. Partners are drawn among the batch's real rows (``mask`` > 0)
    only, so no padding row is pasted into a real one. Works on any dtype (the raw uint8
    images before resizing: pasting copies pixels, it never blends them).

    Args:
        rng: a JAX PRNG key.
        images: (N, H, W, C).
        mask: (N,) 1 for real rows, 0 for padding.
        probability: the chance that an image receives a box at all.

    Returns:
        (mixed images, each row's partner index, each row's partner share in [0, 1)); the
        training target of row i is (1 - share) * its label + share * its partner's label.
    """
    batch, height, width, _ = images.shape
    keys = jax.random.split(rng, 5)
    # Real rows first, in random order; row i's partner is the real row at i's rank among
    # the real rows, which is a permutation of them.
    shuffled = jnp.argsort(jax.random.uniform(keys[0], (batch,)) + 2.0 * (mask <= 0))
    rank = jnp.clip(jnp.cumsum(mask > 0) - 1, 0, batch - 1)
    partner = shuffled[rank]
    side = jnp.sqrt(jax.random.uniform(keys[1], (batch,)))
    box_height, box_width = side * height, side * width
    centre_row = jax.random.uniform(keys[2], (batch,)) * height
    centre_column = jax.random.uniform(keys[3], (batch,)) * width
    top = jnp.clip(jnp.round(centre_row - box_height / 2), 0, height).astype(jnp.int32)
    bottom = jnp.clip(jnp.round(centre_row + box_height / 2), 0, height).astype(jnp.int32)
    left = jnp.clip(jnp.round(centre_column - box_width / 2), 0, width).astype(jnp.int32)
    right = jnp.clip(jnp.round(centre_column + box_width / 2), 0, width).astype(jnp.int32)
    pasted = jax.random.bernoulli(keys[4], probability, (batch,)) & (mask > 0)
    inside = _box_masks(height, width, top, bottom, left, right) & pasted[:, None, None]
    mixed = jnp.where(inside[..., None], images[partner], images)
    share = inside.sum(axis=(1, 2)).astype(jnp.float32) / (height * width)
    return mixed, partner, share
