"""The audio task: building the classifier, feature extraction, and the audio forward pass.

The counterpart of :mod:`tlflax.vision`. Clips travel as float32 waveforms (B, samples) at
16 kHz, as the prepared dataset stores them; the log-mel front end (:mod:`tlflax.audio`),
the crop to the network's input length and the optional masking augmentation happen
inside the jitted step, so the host never holds a spectrogram copy of the dataset::

    waveforms (B, samples) -> log-mel (B, 187, 96) -> [masking] -> (B, 187, 96, 1) -> model

The audio backbones (musicnn's VGG taggers) are convolutional networks over a one-channel
"image" whose height is time and whose width is the 96 mel bands, so the classifier is an
:class:`~tlflax.models.heads.ImageClassifier`: taps, prefix cuts and depth probes work on
it exactly as on images.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlflax.audio import MUSICNN_LOG_MEL, log_mel_spectrogram
from tlflax.config import TrainHeadParams
from tlflax.data.pipeline import map_batches
from tlflax.models.heads import ImageClassifier
from tlflax.models.musicnn import MEL_BANDS, TRAINED_FRAMES
from tlflax.models.registry import create_backbone
from tlflax.taps import tap_widths
from tlflax.train import Batch, Forward, create_head
from tlflax.vision import pooled_after_each_group as _pooled_after_each_image_group

# What the audio backbones take: 16 kHz clips (the rate the prepared dataset must hold),
# and spectrogram patches of 187 frames - musicnn's 3 s, the first 187 of a 3 s clip's 188
# frames, as musicnn's own extractor takes them.
SAMPLE_RATE = MUSICNN_LOG_MEL.sample_rate
PATCH_FRAMES = TRAINED_FRAMES
# The samples whose spectrogram holds exactly the first PATCH_FRAMES frames of a longer
# clip's (frame t, centred on sample t * hop, reads samples before (t + 1) * hop only).
_PATCH_SAMPLES = PATCH_FRAMES * MUSICNN_LOG_MEL.hop_length

# `finetune.augment.spec_augment`: SpecAugment-style masks (Park et al., 2019), one of each
# per clip, of a width drawn uniformly from 0 to these: 0.32 s of a 3 s patch, and an
# eighth of the mel bands. Masked cells are set to 0, log10(1 + 0): silence.
MAX_MASKED_FRAMES = 20
MAX_MASKED_BANDS = 12


def prepare_spectrograms(waveforms: jax.Array | np.ndarray) -> jax.Array:
    """Log-mel spectrograms (B, 187, 96, 1) float32 of waveforms (B, samples) at 16 kHz.

    A clip longer than 3 s is cut to its first 187 frames, a shorter one is padded with
    silence (zero samples) to 3 s; jit-compilable, one compilation per clip length.
    """
    waveforms = jnp.asarray(waveforms, jnp.float32)[:, :_PATCH_SAMPLES]
    missing = _PATCH_SAMPLES - waveforms.shape[1]
    if missing > 0:
        waveforms = jnp.pad(waveforms, ((0, 0), (0, missing)))
    spectrograms = log_mel_spectrogram(waveforms, MUSICNN_LOG_MEL)[:, :PATCH_FRAMES]
    return spectrograms[..., None]


def _random_runs(key: jax.Array, batch: int, length: int, max_width: int) -> jax.Array:
    """(batch, length) booleans: per row, one run of 0 to ``max_width`` consecutive True,
    at a uniformly drawn start."""
    width_key, start_key = jax.random.split(key)
    widths = jax.random.randint(width_key, (batch, 1), 0, max_width + 1)
    starts = jax.random.randint(start_key, (batch, 1), 0, length - widths + 1)
    positions = jnp.arange(length)[None, :]
    return (positions >= starts) & (positions < starts + widths)


def mask_spectrograms(key: jax.Array, spectrograms: jax.Array) -> jax.Array:
    """``spectrograms`` (B, frames, bands, 1) with, in each, one random run of up to
    :data:`MAX_MASKED_FRAMES` frames and one of up to :data:`MAX_MASKED_BANDS` mel bands
    set to silence (0)."""
    batch, frames, bands = spectrograms.shape[:3]
    time_key, band_key = jax.random.split(key)
    masked_frames = _random_runs(time_key, batch, frames, MAX_MASKED_FRAMES)
    masked_bands = _random_runs(band_key, batch, bands, MAX_MASKED_BANDS)
    masked = masked_frames[:, :, None] | masked_bands[:, None, :]
    return jnp.where(masked[..., None], 0.0, spectrograms)


def build_audio_classifier(
    backbone_name: str,
    num_classes: int,
    head_cfg: TrainHeadParams,
    *,
    pretrained: bool,
    seed: int = 0,
    taps: Sequence[int] | None = None,
) -> ImageClassifier:
    """Audio backbone without its original top (musicnn's tags), plus a new head.

    ``seed`` seeds the backbone's random weights (``pretrained=False``); the head is shaped
    and seeded by ``head_cfg``. ``taps``: the head reads the joined pooled outputs after
    these layer groups (:mod:`tlflax.taps`), and the groups above the highest tap are
    dropped; None, the backbone's final pooled features.
    """
    backbone, _ = create_backbone(backbone_name, pretrained=pretrained, rngs=nnx.Rngs(seed))
    in_features = backbone.feature_dim
    if taps is not None:
        # The network is cut at its highest tap: the groups above it never run.
        backbone.keep_groups(max(taps))
        # A single patch's shapes give the channel widths (no data is computed).
        patch = jnp.zeros((1, PATCH_FRAMES, MEL_BANDS, 1), jnp.float32)
        shapes = jax.eval_shape(lambda: _pooled_after_each_image_group(backbone, patch))
        in_features = sum(tap_widths(shapes)[tap - 1] for tap in taps)
    return ImageClassifier(backbone, create_head(in_features, num_classes, head_cfg), taps)


def abstract_audio_classifier(
    backbone_name: str,
    num_classes: int,
    head_cfg: TrainHeadParams,
    taps: Sequence[int] | None = None,
) -> ImageClassifier:
    """The classifier's structure with shape-only weights, to restore a checkpoint into."""
    return nnx.eval_shape(
        lambda: build_audio_classifier(
            backbone_name, num_classes, head_cfg, pretrained=False, taps=taps
        )
    )


def audio_forward(spec_augment: bool = False, compute_dtype: str = "float32") -> Forward:
    """The forward pass of an audio classifier on a batch of waveforms (``batch["audio"]``).

    Args:
      spec_augment: in training steps, mask each clip's spectrogram
        (:func:`mask_spectrograms`); inference never masks.
      compute_dtype: the dtype spectrograms enter the network in (the front end itself
        always runs in float32).
    """

    def forward(model: nnx.Module, batch: Batch, train: bool, key: jax.Array | None):
        spectrograms = prepare_spectrograms(batch["audio"])
        dropout_key = None
        if train and key is not None:
            augment_key, dropout_key = jax.random.split(key)
            if spec_augment:
                spectrograms = mask_spectrograms(augment_key, spectrograms)
        return model(spectrograms.astype(compute_dtype), train=train, dropout_key=dropout_key)

    return forward


@functools.partial(jax.jit, static_argnums=0)
def _features_step(graphdef, state, waveforms: jax.Array) -> jax.Array:
    # Module-level and keyed on graphdef: every split reuses one compilation.
    model = nnx.merge(graphdef, state)
    return model.features(prepare_spectrograms(waveforms), train=False)


def extract_features(
    backbone: nnx.Module,
    waveforms: np.ndarray,
    *,
    batch_size: int,
    description: str = "extract",
) -> np.ndarray:
    """Pooled features (N, feature_dim) float32 of the frozen backbone for every clip.

    The backbone runs in inference mode (BatchNorm on running statistics). Batches have one
    fixed shape, so this compiles once whatever the dataset size.
    """
    if len(waveforms) == 0:
        return np.zeros((0, backbone.feature_dim), np.float32)
    graphdef, state = nnx.split(backbone)
    features = map_batches(
        lambda batch: _features_step(graphdef, state, batch["audio"]),
        {"audio": waveforms},
        batch_size=batch_size,
        description=description,
    )
    return features.astype(np.float32)


def pooled_after_each_group(backbone: nnx.Module, waveforms: jax.Array) -> list[jax.Array]:
    """Activations after each layer group of the clips' spectrograms, pooled over time by the
    backbone (frequency rows kept, ``MusicnnVGG.pool``), in forward order: the depth probes
    of :mod:`tlflax.advisor`."""
    return _pooled_after_each_image_group(backbone, prepare_spectrograms(waveforms))
