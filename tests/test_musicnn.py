"""musicnn's VGG taggers: the TensorFlow checkpoint reader, parity with the original network,
a real drum loop, and the common backbone interface.

The reference outputs in tests/data/musicnn_reference.npz come from the original TensorFlow
graph (benchmarks/musicnn_reference.py, run once with tensorflow-cpu 2.21 and tf-keras).
"""

from __future__ import annotations

import ast
import re
import shutil
import struct
import wave
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from scipy import signal

from tests.conftest import ROOT
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.musicnn import (
    MSD_TAGS,
    MTT_TAGS,
    TRAINED_FRAMES,
    MusicnnVGG,
    last_pool_size,
    load_musicnn_weights,
    load_pretrained,
    musicnn_checkpoint_path,
)
from tlflax.models.tf_checkpoint import _crc32c, read_tf_checkpoint
from tlflax.models.torch_weights import WeightsFileError
from tlflax.vision import pooled_after_each_group

REFERENCE = ROOT / "tests" / "data" / "musicnn_reference.npz"
DRUM_KIT = ROOT / "data" / "raw" / "hydrogen-drumkits" / "The Black Pearl 1.0"
CHECKPOINTS = ("MTT_vgg", "MSD_vgg")
# float32 XLA against float32 TensorFlow, both on CPU: measured 1.4e-6 / 1.4e-5 at most.
PROBABILITY_TOLERANCE = 1e-5
LAST_POOL_TOLERANCE = 1e-4  # activations up to ~7
PARAMETERS_WITH_TOP = 605_748

# Shapes of the weights (Adam slots, `<name>/Adam` and `<name>/Adam_1`, have the same).
_WEIGHT_SHAPES = {
    **{f"{i}CNN/kernel": (3, 3, 1 if i == 1 else 128, 128) for i in range(1, 6)},
    **{f"{i}CNN/bias": (128,) for i in range(1, 6)},
    **{
        f"batch_normalization{suffix}/{leaf}": (1 if suffix == "" else 128,)
        for suffix in ("", "_1", "_2", "_3", "_4", "_5")
        for leaf in ("beta", "gamma", "moving_mean", "moving_variance")
    },
    "dense/kernel": (256, 50),
    "dense/bias": (50,),
}


@pytest.fixture(scope="module")
def models() -> dict[str, MusicnnVGG]:
    """Both packaged taggers, built abstractly and filled (as `create_backbone` does)."""
    models = {}
    for checkpoint in CHECKPOINTS:
        models[checkpoint] = nnx.eval_shape(lambda: MusicnnVGG(include_top=True, rngs=nnx.Rngs(0)))
        load_pretrained(models[checkpoint], checkpoint=checkpoint)
    return models


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE, allow_pickle=False) as archive:
        return dict(archive)


@pytest.fixture(scope="module")
def spectrograms(reference) -> np.ndarray:
    return reference["spectrograms"].astype(np.float32)[..., None]


# --- The checkpoint reader ---------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_reader_reads_every_tensor_with_its_shape(checkpoint: str) -> None:
    arrays = read_tf_checkpoint(musicnn_checkpoint_path(checkpoint))
    slots = {
        f"{name}/{slot}": shape
        for name, shape in _WEIGHT_SHAPES.items()
        for slot in ("Adam", "Adam_1")
    }
    # Adam keeps no slots for the BatchNorm moving statistics, which are not trained.
    slots = {name: shape for name, shape in slots.items() if "/moving_" not in name}
    expected = {**_WEIGHT_SHAPES, **slots, "beta1_power": (), "beta2_power": ()}
    assert {name: array.shape for name, array in arrays.items()} == expected
    assert list(arrays) == sorted(arrays)  # the index's order
    assert all(array.dtype == np.float32 for array in arrays.values())
    assert np.all(arrays["batch_normalization_3/moving_variance"] > 0)


def test_reader_takes_the_index_path_and_the_folder_alike() -> None:
    folder = musicnn_checkpoint_path("MTT_vgg")
    by_index, by_folder = read_tf_checkpoint(folder / ".index"), read_tf_checkpoint(folder)
    np.testing.assert_array_equal(by_index["dense/kernel"], by_folder["dense/kernel"])


def test_crc32c_matches_the_standard_check_value_on_both_paths() -> None:
    assert _crc32c(b"123456789") == 0xE3069283
    data = np.random.default_rng(0).integers(0, 256, 70_001, dtype=np.uint8).tobytes()
    byte_by_byte = 0xFFFFFFFF
    for byte in data:  # the textbook bitwise definition
        byte_by_byte ^= byte
        for _ in range(8):
            byte_by_byte = (byte_by_byte >> 1) ^ (0x82F63B78 if byte_by_byte & 1 else 0)
    assert _crc32c(data) == byte_by_byte ^ 0xFFFFFFFF


# A minimal writer of the same format, to make valid and broken files of every kind.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _block(entries: list[tuple[bytes, bytes]], compression: int) -> bytes:
    """One block holding `entries` whole (no shared key prefixes), with its trailer; a
    compression type other than 0 only marks the block (its bytes stay plain)."""
    contents = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    contents += struct.pack("<II", 0, 1) + bytes([compression])  # one restart point, at 0
    return contents + struct.pack("<I", _masked_crc(contents))


def _write_checkpoint(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    *,
    compression: int = 0,
    big_endian: bool = False,
    dtype_numbers: dict[str, int] | None = None,
) -> None:
    """A one-shard checkpoint of `tensors` (keys in SSTable order), with CRCs."""
    dtypes = {
        np.dtype(np.float32): 1,
        np.dtype(np.int64): 9,
        np.dtype(np.bool_): 10,
        np.dtype(ml_dtypes.bfloat16): 14,
        np.dtype(np.float16): 19,
    }
    entries, data = [(b"", _field(1, 1) + _field(2, int(big_endian)))], b""
    for name, array in tensors.items():
        raw = (array.byteswap() if big_endian else array).tobytes()
        shape = b"".join(_field(2, _field(1, size)) for size in array.shape)
        dtype = (dtype_numbers or {}).get(name, dtypes[array.dtype])
        entry = _field(1, dtype) + _field(2, shape) + _field(4, len(data)) + _field(5, len(raw))
        entries.append(
            (name.encode(), entry + _varint(6 << 3 | 5) + struct.pack("<I", _masked_crc(raw)))
        )
        data += raw
    data_block = _block(entries, compression)
    index_block = _block([(entries[-1][0], _varint(0) + _varint(len(data_block) - 5))], 0)
    meta_block = _block([], 0)
    handles = _varint(len(data_block) + len(index_block)) + _varint(len(meta_block) - 5)
    handles += _varint(len(data_block)) + _varint(len(index_block) - 5)
    footer = handles.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(data_block + index_block + meta_block + footer)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)


_TENSORS = {
    "a/kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "a/step": np.array(-7, np.int64),
    "b/brain": np.array([[0.5, 3.0]], ml_dtypes.bfloat16),
    "b/half": np.array([1.5, -2.25], np.float16),
    "c/mask": np.array([True, False, True]),
}


@pytest.mark.parametrize("big_endian", [False, True])
def test_reader_round_trips_dtypes_and_byte_order(tmp_path: Path, big_endian: bool) -> None:
    _write_checkpoint(tmp_path / "model", _TENSORS, big_endian=big_endian)
    arrays = read_tf_checkpoint(tmp_path / "model")
    assert list(arrays) == list(_TENSORS)
    for name, expected in _TENSORS.items():
        assert arrays[name].dtype == expected.dtype and arrays[name].shape == expected.shape
        np.testing.assert_array_equal(arrays[name], expected)


def _copy_of_musicnn(tmp_path: Path) -> Path:
    folder = tmp_path / "MTT_vgg"
    shutil.copytree(musicnn_checkpoint_path("MTT_vgg"), folder)
    return folder


def _flip_bit(offset: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


_DATA = ".data-00000-of-00001"


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        pytest.param(".index", lambda data: data[:-10], "SSTable magic", id="index-cut"),
        pytest.param(".index", lambda data: data[:20], "shorter than an SSTable footer", id="stub"),
        pytest.param(".index", _flip_bit(100), "fails its CRC-32C", id="index-bit-flipped"),
        pytest.param(_DATA, lambda data: data[:-1000], "is cut off", id="data-cut"),
        pytest.param(_DATA, _flip_bit(5000), "fails its CRC-32C", id="data-bit-flipped"),
    ],
)
def test_broken_files_are_refused_naming_the_file(
    tmp_path: Path, file: str, edit, message: str
) -> None:
    folder = _copy_of_musicnn(tmp_path)
    (folder / file).write_bytes(edit((folder / file).read_bytes()))
    with pytest.raises(WeightsFileError, match=message) as error:
        read_tf_checkpoint(folder)
    assert str(folder / file) in str(error.value)


def test_missing_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match=r"index .*nothing\.index does not exist"):
        read_tf_checkpoint(tmp_path / "nothing")
    folder = _copy_of_musicnn(tmp_path)
    (folder / _DATA).unlink()
    with pytest.raises(WeightsFileError, match=r"data file .*\.data-00000-of-00001 does not exist"):
        read_tf_checkpoint(folder)


def test_unsupported_dtype_and_compression_are_refused_by_name(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path / "strings", _TENSORS, dtype_numbers={"a/kernel": 7})
    with pytest.raises(WeightsFileError, match=r"strings\.index.*'a/kernel' has dtype string"):
        read_tf_checkpoint(tmp_path / "strings")
    _write_checkpoint(tmp_path / "snappy", _TENSORS, compression=1)
    with pytest.raises(WeightsFileError, match=r"snappy\.index.*is Snappy-compressed"):
        read_tf_checkpoint(tmp_path / "snappy")


# --- Parity with the original TensorFlow network -----------------------------------------


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_tag_probabilities_match_tensorflow(
    models, reference, spectrograms, checkpoint: str
) -> None:
    model = models[checkpoint]
    probabilities = jax.nn.sigmoid(model(spectrograms))
    np.testing.assert_allclose(
        probabilities, reference[f"{checkpoint}/probabilities"], rtol=0, atol=PROBABILITY_TOLERANCE
    )
    last_pool = model.run_groups(spectrograms, 0, None)
    np.testing.assert_allclose(
        last_pool, reference[f"{checkpoint}/pool5"], rtol=0, atol=LAST_POOL_TOLERANCE
    )


def test_tag_names_are_the_packages() -> None:
    configuration = musicnn_checkpoint_path().parent / "configuration.py"
    labels = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(configuration.read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert tuple(labels["MTT_LABELS"]) == MTT_TAGS and tuple(labels["MSD_LABELS"]) == MSD_TAGS


# --- A real drum loop --------------------------------------------------------------------


def _mel_filters(sample_rate: int, n_fft: int, mel_bands: int) -> np.ndarray:
    """librosa's default (Slaney) mel filter bank: (mel_bands, n_fft // 2 + 1)."""
    linear_step, log_start_hz, log_step = 200 / 3, 1000.0, np.log(6.4) / 27
    log_start_mel = log_start_hz / linear_step

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        logarithmic = log_start_hz * np.exp(log_step * (mel - log_start_mel))
        return np.where(mel >= log_start_mel, logarithmic, linear_step * mel)

    top_mel = log_start_mel + np.log(sample_rate / 2 / log_start_hz) / log_step
    edges = mel_to_hz(np.linspace(0, top_mel, mel_bands + 2))
    fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    rising = (fft_hz - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - fft_hz) / np.diff(edges)[1:, None]
    area_normalisation = 2 / (edges[2:] - edges[:-2])
    return np.maximum(0, np.minimum(rising, falling)) * area_normalisation[:, None]


def _musicnn_log_mel(audio: np.ndarray) -> np.ndarray:
    """musicnn's input (frames, 96): librosa.feature.melspectrogram at 16 kHz (centred
    frames, n_fft 512, hop 256, Hann window, power 2), then log10(1 + 10000·x)."""
    n_fft, hop = 512, 256
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(audio, n_fft // 2), n_fft)[::hop]
    power = np.abs(np.fft.rfft(frames * signal.get_window("hann", n_fft), axis=1)) ** 2
    return np.log10(1 + 10000 * power @ _mel_filters(16_000, n_fft, 96).T)


def _one_shot(name: str) -> np.ndarray:
    with wave.open(str(DRUM_KIT / name)) as file:  # 16-bit mono at 44.1 kHz
        audio = np.frombuffer(file.readframes(file.getnframes()), "<i2") / 32768
    return signal.resample_poly(audio, 160, 441)  # to 16 kHz


def _rock_beat(seconds: float, sample_rate: int = 16_000) -> np.ndarray:
    """Kick on beats 1 and 3, snare on 2 and 4, closed hi-hat on every eighth, at 120 bpm."""
    kick, snare = _one_shot("PearlKick-Hard.wav"), _one_shot("PearlSnare-Hard.wav")
    hat = _one_shot("SabianHatClosed-Hard.wav")
    loop = np.zeros(int(seconds * sample_rate))
    eighth = sample_rate // 4
    for step, start in enumerate(range(0, len(loop), eighth)):
        hits = [hat] + [kick] * (step % 4 == 0) + [snare] * (step % 4 == 2)
        for hit in hits:
            length = min(len(hit), len(loop) - start)
            loop[start : start + length] += hit[:length]
    return loop / np.abs(loop).max()


def test_a_real_drum_loop_is_tagged_drums_and_beat(models) -> None:
    if not DRUM_KIT.is_dir():
        pytest.fail(f"{DRUM_KIT} is missing: run `make assets` (scripts/fetch_assets.sh)")
    spectrogram = _musicnn_log_mel(_rock_beat(6.5)).astype(np.float32)
    # musicnn's tagger: consecutive 3 s patches, probabilities averaged over the patches.
    starts = range(0, len(spectrogram) - TRAINED_FRAMES + 1, TRAINED_FRAMES)
    patches = np.stack([spectrogram[start : start + TRAINED_FRAMES] for start in starts])
    probabilities = np.mean(jax.nn.sigmoid(models["MTT_vgg"](patches[..., None])), axis=0)
    top_tags = [MTT_TAGS[index] for index in np.argsort(-probabilities)[:3]]
    assert {"drums", "beat"} <= set(top_tags), top_tags
    assert probabilities[MTT_TAGS.index("drums")] > 0.4


# --- The common backbone interface -------------------------------------------------------


def _paths(model: nnx.Module) -> list[str]:
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    return ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)]


def test_group_patterns_cover_every_backbone_variable_once(models) -> None:
    model = models["MTT_vgg"]
    patterns = model.group_patterns()
    assert len(patterns) == 5
    for path in _paths(model):
        matches = [index for index, pattern in enumerate(patterns) if re.search(pattern, path)]
        assert len(matches) == (0 if path.startswith("classifier/") else 1), path
    sizes = [v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sum(sizes) == PARAMETERS_WITH_TOP


def test_headless_backbone_loads_every_variable_and_pools_256_features(spectrograms) -> None:
    model = nnx.eval_shape(lambda: MusicnnVGG(include_top=False, rngs=nnx.Rngs(0)))
    report = load_musicnn_weights(model, read_tf_checkpoint(musicnn_checkpoint_path()))
    assert report.unexpected == ["dense/bias", "dense/kernel"] and report.missing == []
    assert not any(
        isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))
    )
    features = model(spectrograms[..., 0])  # (N, frames, 96) works as well
    assert features.shape == (3, MusicnnVGG.feature_dim)
    split = model.run_groups(model.run_groups(spectrograms, 0, 2), 2, None)
    # One frequency row is left after the last block: its mean and spread over time (the
    # spread's square root taken of the variance + 1e-6).
    spread = jnp.sqrt(jnp.var(split, axis=(1, 2)) + 1e-6)
    expected = jnp.concatenate([jnp.mean(split, axis=(1, 2)), spread], -1)
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)


def test_cut_backbone_and_classifier_taps(models, spectrograms) -> None:
    backbone = nnx.clone(models["MTT_vgg"])
    backbone.classifier = None
    # Pooled over time, each tap keeps its frequency rows (24 after block 2, 6 after block 4),
    # two moments of each.
    classifier = ImageClassifier(
        backbone, Head(2 * (24 + 6) * 128, 4, rngs=nnx.Rngs(0)), taps=(2, 4)
    )
    prefix = classifier.run_prefix(spectrograms, 1)
    np.testing.assert_allclose(
        classifier.from_prefix(prefix, 1), classifier(spectrograms), atol=1e-5
    )
    backbone.keep_groups(3)
    assert backbone.run_groups(spectrograms, 0, None).shape == (3, 23, 12, 128)


def test_pooling_summarises_time_and_keeps_the_frequency_rows(models, spectrograms) -> None:
    backbone = models["MTT_vgg"]
    pooled = pooled_after_each_group(backbone, spectrograms)
    assert [features.shape for features in pooled] == [
        (3, 2 * rows * 128) for rows in (48, 24, 12, 6, 1)
    ]
    after_two = np.asarray(backbone.run_groups(spectrograms, 0, 2), np.float64)
    # (3, 24 frequency rows, 128 channels) each: numpy's moments over time.
    by_row, spread = after_two.mean(axis=1), np.sqrt(after_two.var(axis=1) + 1e-6)
    expected = np.concatenate([by_row.reshape(3, -1), spread.reshape(3, -1)], axis=1)
    np.testing.assert_allclose(pooled[1], expected, rtol=1e-4, atol=1e-4)
    # Rows differ: averaging frequency away as well would lose what the rows tell apart.
    assert np.abs(by_row - by_row.mean(axis=1, keepdims=True)).max() > 0.1
    # The spread is not the mean again: units that are on as often can come and go
    # differently over the clip.
    assert np.corrcoef(by_row.ravel(), spread.ravel())[0, 1] < 0.99
    # The last group has one row left: the final features are the last group's pooled output.
    np.testing.assert_allclose(pooled[-1], backbone.features(spectrograms), rtol=1e-5, atol=1e-6)
    half = spectrograms[:, :94]
    assert [f.shape[1] for f in pooled_after_each_group(backbone, half)] == [
        f.shape[1] for f in pooled
    ]


def test_pooling_has_a_finite_gradient_where_a_unit_never_changes(models) -> None:
    # Silence through the whole clip: every unit is constant over time, its spread 0.
    silent = jnp.zeros((2, 40, 96, 1), jnp.float32)
    backbone = models["MTT_vgg"]

    def spread_sum(spectrograms):
        return jnp.sum(backbone.pool(backbone.run_groups(spectrograms, 0, 1)))

    gradient = jax.grad(spread_sum)(silent)
    assert np.all(np.isfinite(np.asarray(gradient)))


def test_the_original_top_needs_3_seconds_and_features_take_any_length(
    models, spectrograms
) -> None:
    assert last_pool_size(TRAINED_FRAMES) == (2, 1)
    three_halves_seconds = spectrograms[:, :94]
    with pytest.raises(ValueError, match="takes 187 frames"):
        models["MTT_vgg"](three_halves_seconds)
    assert models["MTT_vgg"].features(three_halves_seconds).shape == (3, 256)
