"""musicnn's VGG music tagger in Flax NNX, loaded from the TensorFlow checkpoints on PyPI.

Pons & Serra's `musicnn` package (ISC licence) ships two VGG-style taggers, `MTT_vgg`
(trained on MagnaTagATune) and `MSD_vgg` (Million Song Dataset), of the same shape
(`musicnn/models.py`, `vgg(..., num_filters=128)`): BatchNorm on the input spectrogram,
then five blocks of 3×3 "same" convolution with bias, ReLU, BatchNorm, VALID max-pool, and
a dense layer from the flattened last pool to 50 tags (sigmoid). ReLU comes *before*
BatchNorm there, and so it does here. TensorFlow's BatchNorm epsilon 1e-3; kernels are
HWIO and the dense kernel (in, out), Flax's layouts, so the weights load unchanged.
Validation ROC-AUC / PR-AUC as the package records them (`experiment.result`): MTT_vgg
0.903 / 0.382, MSD_vgg 0.877 / 0.282. Against the original TensorFlow graph the tag
probabilities agree to 1.4e-6 (tests/test_musicnn.py).

The input is a batch of log-mel spectrograms, (N, frames, 96 mel bands, 1) - time is the
height - computed as musicnn does: 16 kHz audio, n_fft 512, hop 256, 96 mel bands,
log10(1 + 10000·mel power); 187 frames are the 3 s the networks were trained on.

Parameter paths: `input_norm/scale`, `blocks/0/conv/kernel`, `blocks/4/norm/var`,
`classifier/kernel`.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlflax.errors import MissingInputError
from tlflax.models.layers import PooledConvBackbone, check_kept_groups, pretrained_batch_norm
from tlflax.models.tf_checkpoint import read_tf_checkpoint
from tlflax.models.torch_weights import LoadReport, load_state_dict_into

__all__ = [
    "MEL_BANDS",
    "MSD_TAGS",
    "MTT_TAGS",
    "TRAINED_FRAMES",
    "ConvBlock",
    "MusicnnVGG",
    "last_pool_size",
    "load_musicnn_weights",
    "load_pretrained",
    "musicnn_checkpoint_path",
    "tf_name",
]

Checkpoint = Literal["MTT_vgg", "MSD_vgg"]

_WEIGHTS_PACKAGE = "musicnn"
_WEIGHTS_DISTRIBUTION = "musicnn==0.1.0"

MEL_BANDS = 96
# Added to the variance over time before its square root (activations are O(1) after
# BatchNorm, so it only matters for a unit that never changes).
_STD_EPSILON = 1e-6
TRAINED_FRAMES = 187  # 3 s at 16 kHz with hop 256: the only length the original top accepts
CHANNELS = 128
# (window, stride) of each block's VALID max-pool, in (time, frequency).
_POOLS: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = (
    ((4, 1), (2, 2)),
    ((2, 2), (2, 2)),
    ((2, 2), (2, 2)),
    ((2, 2), (2, 2)),
    ((4, 4), (4, 4)),
)
# tf.compat.v1.layers.batch_normalization's defaults, which the checkpoints were trained with.
_BATCHNORM_EPSILON = 1e-3
_BATCHNORM_MOMENTUM = 0.99

# musicnn/configuration.py's MTT_LABELS and MSD_LABELS, in the classifier's output order.
# fmt: off
MTT_TAGS: tuple[str, ...] = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
    "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male",
    "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman",
    "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man", "classic", "choir", "voice",
    "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello", "no voice",
    "weird", "country", "metal", "female voice", "choral",
)
MSD_TAGS: tuple[str, ...] = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
    "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill",
    "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic",
    "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
    "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock",
    "60s", "rnb", "indie pop", "sad", "House", "happy",
)
# fmt: on


def last_pool_size(frames: int, mel_bands: int = MEL_BANDS) -> tuple[int, int]:
    """(time, frequency) size of the last group's output: (2, 1) for 187 × 96 inputs."""
    for (window_time, window_frequency), (stride_time, stride_frequency) in _POOLS:
        frames = (frames - window_time) // stride_time + 1
        mel_bands = (mel_bands - window_frequency) // stride_frequency + 1
    return frames, mel_bands


def _batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return pretrained_batch_norm(
        channels, epsilon=_BATCHNORM_EPSILON, momentum=_BATCHNORM_MOMENTUM, rngs=rngs
    )


class ConvBlock(nnx.Module):
    """3×3 "same" convolution with bias, ReLU, BatchNorm, VALID max-pool: `conv`, `norm`."""

    def __init__(
        self,
        in_channels: int,
        *,
        pool_window: tuple[int, int],
        pool_stride: tuple[int, int],
        rngs: nnx.Rngs,
    ) -> None:
        # Stride 1 with an odd kernel: Flax's "SAME" pads exactly as TensorFlow's does.
        # Glorot-uniform is tf.layers.conv2d's initialiser, for layers `dont_load` leaves new.
        self.conv = nnx.Conv(
            in_channels,
            CHANNELS,
            (3, 3),
            padding="SAME",
            kernel_init=nnx.initializers.glorot_uniform(),
            rngs=rngs,
        )
        self.norm = _batch_norm(CHANNELS, rngs)
        self.pool_window = pool_window
        self.pool_stride = pool_stride

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(jax.nn.relu(self.conv(x)))
        return nnx.max_pool(x, self.pool_window, strides=self.pool_stride, padding="VALID")


class MusicnnVGG(PooledConvBackbone):
    """musicnn's MTT/MSD VGG: 605,748 parameters with the 50-tag classifier (`include_top`).

    Layer groups, the unit of `run_groups` and `group_patterns`, are the five conv blocks;
    group 0 also holds the input BatchNorm and takes log-mel spectrograms (N, frames, 96, 1)
    (a trailing channel axis is added to (N, frames, 96)). The last group's output is
    (N, 2, 1, 128) for 187 frames.

    `pool` summarises a group's output over time only, and keeps its frequency rows: the mean
    and the standard deviation over time of every (frequency row, channel), side by side,
    (N, 2 × F_g × 128), from 2 × 48 × 128 after the first block down to 2 × 1 × 128 after the
    last, whatever the input length. `features` are the last group's output so pooled (256
    values), and the classifiers' taps and the advisor's depth probes pool every group the
    same way (`tlflax.models.heads`, `tlflax.vision.pooled_after_each_group`). Frequency is
    not averaged away because where in the spectrum a pattern sits is what tells one voice,
    language or instrument from another (the envelope MFCCs summarise): on the language
    job's 100 training clips (seed 0) the advisor's ridge probe after block 3 scores 0.98 on
    validation with the time average against 0.87 with the global average. The standard
    deviation is the statistics pooling of x-vectors (Snyder et al., 2018): how a pattern
    comes and goes over the clip, which a mean alone cannot tell from a steady one; the
    MFCC baseline reads both moments too. On the language job's validation clips (seeds
    0-2, ridge head, `python -m pipelines.head_probe`) it is level with the mean alone:
    0.947 against 0.943 on block 2, 0.933 against 0.947 on blocks 1-4. The original classifier
    instead reads the flattened (2 × 1 × 128) last pool, so `__call__` with `include_top`
    needs exactly `TRAINED_FRAMES` frames; `jax.nn.sigmoid` of its logits gives the tag
    probabilities (`MTT_TAGS` or `MSD_TAGS` order).

    BatchNorm uses its running statistics unless `set_batchnorm_training(model, True)` is
    called; `train` is accepted for the common interface (the original's dropout is left out).

    Args:
      include_top: add the `classifier` Linear(256 → num_classes).
      num_classes: the classifier's width.
      rngs: initialisation randomness.
    """

    # `pool`'s width after the last group: mean and standard deviation of 128 channels.
    feature_dim: int = 2 * CHANNELS

    def __init__(self, *, include_top: bool = False, num_classes: int = 50, rngs: nnx.Rngs) -> None:
        self.input_norm = _batch_norm(1, rngs)
        blocks, in_channels = [], 1
        for window, stride in _POOLS:
            blocks.append(ConvBlock(in_channels, pool_window=window, pool_stride=stride, rngs=rngs))
            in_channels = CHANNELS
        self.blocks = nnx.List(blocks)
        # The original top reads the flattened last pool of a TRAINED_FRAMES-frame input.
        top_inputs = math.prod(last_pool_size(TRAINED_FRAMES)) * CHANNELS
        self.classifier = nnx.Linear(top_inputs, num_classes, rngs=rngs) if include_top else None

    def _groups(self) -> list[Callable[[jax.Array], jax.Array]]:
        def first_block(spectrograms: jax.Array) -> jax.Array:
            if spectrograms.ndim == 3:
                spectrograms = spectrograms[..., None]
            return self.blocks[0](self.input_norm(spectrograms))

        return [first_block, *list(self.blocks)[1:]]

    def group_patterns(self) -> list[str]:
        """One regex per layer group, in forward order, over '/'-joined parameter paths."""
        return [r"^(input_norm|blocks/0)/", *(rf"^blocks/{i}/" for i in range(1, len(self.blocks)))]

    def keep_groups(self, groups: int) -> None:
        """Drop every layer group after the first ``groups`` (a network cut at that depth)."""
        check_kept_groups(groups, len(self.blocks))
        self.blocks = nnx.List(list(self.blocks)[:groups])

    def pool(self, activations: jax.Array) -> jax.Array:
        """A group's (N, time, frequency, C) output as its mean and standard deviation over
        time: (N, 2 × frequency × C), the means first, each frequency-major."""
        mean = jnp.mean(activations, axis=1)
        # The epsilon keeps the gradient of the square root finite where a unit is constant
        # over the clip (a ReLU silent throughout).
        spread = jnp.sqrt(jnp.mean(jnp.square(activations - mean[:, None]), axis=1) + _STD_EPSILON)
        batch = activations.shape[0]
        return jnp.concatenate([mean.reshape(batch, -1), spread.reshape(batch, -1)], axis=-1)

    def features(self, spectrograms: jax.Array, *, train: bool = False) -> jax.Array:
        """The last group's output pooled over time: (N, 256), the mean and standard
        deviation of its 128 channels (one frequency row left)."""
        return super().features(spectrograms, train=train)

    def __call__(self, spectrograms: jax.Array, *, train: bool = False) -> jax.Array:
        """Tag logits (N, num_classes) with the classifier, else pooled features (N, 256).

        Raises:
          ValueError: the classifier is asked for, and the input is not `TRAINED_FRAMES`
            frames of `MEL_BANDS` bands.
        """
        if self.classifier is None:
            return self.features(spectrograms, train=train)
        if tuple(spectrograms.shape[1:3]) != (TRAINED_FRAMES, MEL_BANDS):
            raise ValueError(
                f"musicnn's tag classifier takes {TRAINED_FRAMES} frames × {MEL_BANDS} mel "
                f"bands (3 s), got {tuple(spectrograms.shape[1:3])}; `features` takes any length"
            )
        last_pool = self.run_groups(spectrograms, 0, None, train=train)
        # TensorFlow's flatten of NHWC, (time, frequency, channel) order: the dense kernel's.
        return self.classifier(jnp.reshape(last_pool, (last_pool.shape[0], -1)))


# --- The TensorFlow checkpoints: the one place that knows their names ----------------------

_TF_BATCHNORM_LEAF_NAMES = {
    "scale": "gamma",
    "bias": "beta",
    "mean": "moving_mean",
    "var": "moving_variance",
}
# Adam's slots and step counters, which the checkpoints also hold: not weights.
_TF_TRAINING_STATE = r"/Adam(_1)?$|^beta[12]_power$|^global_step$"


def tf_name(path: str) -> str | None:
    """The checkpoint's name for one of our '/'-joined parameter paths (None: it has none).

    The input BatchNorm is TensorFlow's `batch_normalization`; block i's convolution is
    `<i+1>CNN` and its BatchNorm `batch_normalization_<i+1>`; the classifier is `dense`.

    >>> tf_name("blocks/0/norm/bias")
    'batch_normalization_1/beta'
    """
    module, _, leaf = path.rpartition("/")
    block = re.fullmatch(r"blocks/(\d+)/(conv|norm)", module)
    if module == "input_norm" or (block is not None and block[2] == "norm"):
        layer = "batch_normalization" + (f"_{int(block[1]) + 1}" if block is not None else "")
        tf_leaf = _TF_BATCHNORM_LEAF_NAMES.get(leaf)
    elif block is not None:
        layer, tf_leaf = f"{int(block[1]) + 1}CNN", leaf
    elif module == "classifier":
        layer, tf_leaf = "dense", leaf
    else:
        return None
    return f"{layer}/{tf_leaf}" if tf_leaf is not None else None


def load_musicnn_weights(
    model: MusicnnVGG, arrays: dict[str, np.ndarray], *, dont_load: Sequence[str] = ()
) -> LoadReport:
    """Copies a musicnn VGG checkpoint (`read_tf_checkpoint` output) into `model`, in place.

    Layouts are Flax's already; Adam slots and step counters are ignored.

    Returns:
      A `LoadReport`: with `include_top=False`, `dense/kernel` and `dense/bias` are `unexpected`.

    Raises:
      InputError: a shape differs (naming the key and both shapes) outside `dont_load`.
    """
    return load_state_dict_into(
        model,
        arrays,
        source_key=tf_name,
        convert=np.asarray,
        dont_load=dont_load,
        ignore_source_key=_TF_TRAINING_STATE,
    )


def musicnn_checkpoint_path(checkpoint: Checkpoint = "MTT_vgg") -> Path:
    """The folder of a checkpoint inside the installed `musicnn` package (not imported: its
    tagging modules import TensorFlow; only the files are used)."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"musicnn's weights come from the Python package {_WEIGHTS_PACKAGE!r}, which is "
            f"not installed: pip install --no-deps {_WEIGHTS_DISTRIBUTION}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / checkpoint
    if not (folder / ".index").is_file():
        raise MissingInputError(
            f"{_WEIGHTS_PACKAGE} is installed but has no checkpoint {folder}/.index; "
            f"reinstall {_WEIGHTS_DISTRIBUTION}"
        )
    return folder


def load_pretrained(
    model: MusicnnVGG, *, dont_load: Sequence[str] = (), checkpoint: Checkpoint = "MTT_vgg"
) -> LoadReport:
    """Loads a packaged checkpoint (MagnaTagATune's by default) into `model`."""
    arrays = read_tf_checkpoint(musicnn_checkpoint_path(checkpoint))
    return load_musicnn_weights(model, arrays, dont_load=dont_load)
