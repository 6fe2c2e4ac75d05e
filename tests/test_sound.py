"""The audio task on real voice prompts: musicnn's classifier, its forward pass from stored
waveforms, features, taps, the prefix cache, a few fine-tuning steps, and the task's checks.

The clips are the same six prompts in English, French and Russian from the asterisk sound
packages (data/raw/asterisk, fetched by `make assets`), at 16 kHz and 3 s as `prepare`
stores them.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import RAW_ASTERISK
from tlflax import sound
from tlflax.audio import log_mel_spectrogram
from tlflax.checkpoint import TrainingCheckpoints
from tlflax.config import AugmentParams, FinetuneParams, ParamsError, TrainHeadParams, parse_params
from tlflax.data.audio_folder import ClipSettings, load_clip
from tlflax.data.errors import DataError
from tlflax.data.tfds_audio import write_audio_dataset
from tlflax.finetuner import Finetuner, run_finetuning
from tlflax.models.musicnn import load_pretrained
from tlflax.prefix_cache import PREFIX_KEY, audio_prefix_cut, cache_prefix
from tlflax.taps import joined_numpy
from tlflax.tasks import AudioTask, task_for

LANGUAGES = ("en", "fr", "ru")
PROMPTS = ("activated", "added", "agent-pass", "auth-thankyou", "calling", "call-forwarding")
HEAD = TrainHeadParams(head="linear", dropout=0.0)
TOLERANCE = 1e-4  # float32 logits of a 5-block network, computed along two paths


@pytest.fixture(scope="module")
def voices() -> dict[str, np.ndarray]:
    """``audio`` float32 (18, 48000) at 16 kHz and ``label`` (the language), in order."""
    if not RAW_ASTERISK.is_dir():
        pytest.fail(f"{RAW_ASTERISK} is missing: run `make assets` (scripts/fetch_assets.sh)")
    clips, labels = [], []
    for label, language in enumerate(LANGUAGES):
        for prompt in PROMPTS:
            path = RAW_ASTERISK / language / f"{prompt}.wav"
            clips.append(load_clip(path, path, ClipSettings(sample_rate=16000, clip_seconds=3))[0])
            labels.append(label)
    return {"audio": np.stack(clips), "label": np.asarray(labels, np.int64)}


def _classifier(taps=None, *, pretrained=True, seed=0):
    model = sound.build_audio_classifier(
        "musicnn_vgg", len(LANGUAGES), HEAD, pretrained=pretrained, seed=seed, taps=taps
    )
    # A non-zero head (new heads start at zero), so the logits depend on every feature.
    kernel = model.head.output.kernel
    kernel.value = 0.1 * jax.random.normal(jax.random.key(seed + 1), kernel.value.shape)
    return model


def _logits(model, audio: np.ndarray) -> np.ndarray:
    return np.asarray(sound.audio_forward()(model, {"audio": audio}, False, None))


def test_spectrograms_are_the_first_three_seconds_of_the_front_end(voices) -> None:
    clips = voices["audio"][:2]
    patches = sound.prepare_spectrograms(clips)
    assert patches.shape == (2, sound.PATCH_FRAMES, 96, 1) and patches.dtype == jnp.float32
    whole = log_mel_spectrogram(clips)  # 188 frames of a 3 s clip; musicnn reads 187
    np.testing.assert_allclose(patches[..., 0], whole[:, :187], rtol=0, atol=1e-5)
    longer = np.concatenate([clips, clips], axis=1)
    np.testing.assert_allclose(sound.prepare_spectrograms(longer), patches, rtol=0, atol=1e-5)
    shorter = sound.prepare_spectrograms(clips[:, :24000])  # padded with silence
    assert shorter.shape == patches.shape and float(jnp.abs(shorter[:, 100:]).max()) == 0.0


def test_masks_silence_one_run_of_frames_and_one_of_bands_per_clip() -> None:
    ones = jnp.ones((64, sound.PATCH_FRAMES, 96, 1))
    masked = np.asarray(sound.mask_spectrograms(jax.random.key(0), ones))[..., 0]
    for spectrogram in masked:
        silent_frames = np.flatnonzero((spectrogram == 0).all(axis=1))
        silent_bands = np.flatnonzero((spectrogram == 0).all(axis=0))
        for silent, limit in ((silent_frames, 20), (silent_bands, 12)):
            assert len(silent) <= limit
            assert len(silent) == 0 or silent[-1] - silent[0] == len(silent) - 1  # one run
    widths = [np.sum((spectrogram == 0).all(axis=1)) for spectrogram in masked]
    assert len(set(widths)) > 5  # drawn per clip


def test_only_training_steps_mask_and_only_when_asked(voices) -> None:
    model, batch, key = _classifier(), {"audio": voices["audio"][:4]}, jax.random.key(3)
    masking = sound.audio_forward(spec_augment=True)
    plain = np.asarray(sound.audio_forward()(model, batch, True, key))
    assert not np.allclose(masking(model, batch, True, key), plain, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(masking(model, batch, False, key), _logits(model, batch["audio"]))


def test_classifier_builds_pretrained_or_random_with_taps(voices) -> None:
    model = sound.build_audio_classifier("musicnn_vgg", 3, HEAD, pretrained=True, taps=(2, 4))
    assert len(model.backbone.group_patterns()) == 4  # cut at its highest tap
    # Taps pooled over time keep their frequency rows (24 after block 2, 6 after block 4),
    # mean and standard deviation of each.
    assert model.head.output.kernel.shape == (2 * (24 + 6) * 128, 3)
    packaged = nnx.eval_shape(lambda: type(model.backbone)(rngs=nnx.Rngs(0)))
    load_pretrained(packaged)
    np.testing.assert_array_equal(
        model.backbone.blocks[1].conv.kernel.value, packaged.blocks[1].conv.kernel.value
    )
    random = sound.build_audio_classifier("musicnn_vgg_msd", 3, HEAD, pretrained=False)
    assert random.head.output.kernel.shape == (256, 3) and random.taps is None
    abstract = sound.abstract_audio_classifier("musicnn_vgg", 3, HEAD, (2, 4))
    assert jax.tree.structure(nnx.state(abstract)) == jax.tree.structure(nnx.state(model))
    assert _logits(model, voices["audio"][:4]).shape == (4, 3)


def test_features_are_what_the_cut_classifier_reads(voices) -> None:
    taps, audio = (2, 4), voices["audio"][:6]
    uncut = _classifier()
    pooled = sound.pooled_after_each_group(uncut.backbone, audio)
    assert [p.shape for p in pooled] == [(6, 2 * rows * 128) for rows in (48, 24, 12, 6, 1)]
    features = sound.extract_features(uncut.backbone, audio, batch_size=4)
    np.testing.assert_allclose(features, pooled[-1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        _logits(uncut, audio), uncut.head(jnp.asarray(features)), rtol=0, atol=TOLERANCE
    )
    model = _classifier(taps)
    stored = joined_numpy([np.asarray(p) for p in pooled], taps)
    expected = np.asarray(model.head(jnp.asarray(stored)))
    np.testing.assert_allclose(_logits(model, audio), expected, rtol=0, atol=TOLERANCE)
    assert sound.extract_features(uncut.backbone, audio[:0], batch_size=4).shape == (0, 256)


@pytest.mark.parametrize(("taps", "groups"), [(None, 3), ((2, 5), 2)])
def test_prefix_cut_forward_equals_the_full_forward(voices, taps, groups) -> None:
    model = _classifier(taps)
    cut = audio_prefix_cut(groups)
    cached = cache_prefix(model, cut, voices, batch_size=8)
    assert "audio" not in cached and cached[PREFIX_KEY].shape[0] == len(voices["label"])
    np.testing.assert_allclose(
        cut.forward(model, cached, False, None),
        _logits(model, voices["audio"]),
        rtol=0,
        atol=TOLERANCE,
    )


@pytest.mark.slow
def test_a_few_fine_tuning_steps_reduce_the_training_loss(voices, tmp_path: Path) -> None:
    model = sound.build_audio_classifier("musicnn_vgg", 3, HEAD, pretrained=True, taps=(3, 5))
    cfg = FinetuneParams(
        learning_rate=3e-3,
        batch_size=6,
        epochs=5,
        warmup_fraction=0.0,
        patience=4,
        augment=AugmentParams(random_crop=False, flip=False, spec_augment=True),
    )
    finetuner = Finetuner(
        model,
        sound.audio_forward(cfg.augment.spec_augment),
        cfg,
        num_train_examples=len(voices["label"]),
        group_patterns=model.backbone.group_patterns(),
    )
    checkpoints = TrainingCheckpoints(tmp_path / "checkpoints", keep_best=1)
    _, history = run_finetuning(finetuner, voices, voices, checkpoints, eval_batch_size=18)
    checkpoints.close()
    train_losses = [epoch["train_loss"] for epoch in history.epochs]
    assert train_losses[-1] < train_losses[0], train_losses
    # The same clips in inference mode (validation), from log(3) for the new, zero head.
    clip_losses = [epoch["validation_loss"] for epoch in history.epochs]
    assert clip_losses[-1] < 0.85 * np.log(3), clip_losses
    assert finetuner.train_step._cache_size() == 1


def _audio_task(tmp_path: Path, sample_rate: int, **params) -> AudioTask:
    params = parse_params(
        {
            "prepare": {"dataset": "audio_folder", "raw_dir": str(tmp_path / "clips")},
            "extract": {"backbone": "musicnn_vgg", "batch_size": 8},
            **params,
        }
    )
    clips = np.zeros((4, 3 * sample_rate), np.float32)
    clips[:, ::50] = 0.5  # a click train: not silent
    split = (clips, np.array([0, 1, 0, 1]))
    write_audio_dataset(
        tmp_path, params.prepare.stored_name, {"train": split}, ["a", "b"], sample_rate
    )
    return AudioTask(params, tmp_path)


def test_the_task_reads_16_khz_clips_and_refuses_other_rates(tmp_path: Path) -> None:
    task = _audio_task(tmp_path / "16k", 16000)
    inputs = task.read_inputs("train")
    assert inputs["audio"].shape == (4, 48000) and inputs["audio"].dtype == np.float32
    assert task.class_names() == ["a", "b"]
    backbone = task.build_classifier(2, pretrained=True, seed=0).backbone
    assert task.extract_features(backbone, inputs, "extract").shape == (4, 256)
    batch = {"audio": jnp.asarray(inputs["audio"])}
    assert len(task.pooled_after_each_group(backbone, batch)) == 5
    with pytest.raises(DataError, match=r"8000 Hz; the audio backbones take 16000 Hz") as error:
        _audio_task(tmp_path / "8k", 8000).read_split("train")
    assert str(tmp_path / "8k") in str(error.value)


def test_masking_and_the_prefix_cache_exclude_each_other(tmp_path: Path) -> None:
    masked = _audio_task(tmp_path, 16000, finetune={"augment": {"spec_augment": True}})
    with pytest.raises(ParamsError, match="spec_augment off"):
        masked.prefix_cut(2)


def test_an_audio_backbone_for_image_data_is_refused() -> None:
    params = parse_params({"extract": {"backbone": "musicnn_vgg"}})
    with pytest.raises(ParamsError, match=r"'musicnn_vgg' takes audio input .* efficientnet"):
        task_for(params, Path("unused"))
