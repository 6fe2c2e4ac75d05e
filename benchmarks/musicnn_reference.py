"""Reference outputs of musicnn's original VGG taggers, the oracle of tests/test_musicnn.py.

Runs the original network - `musicnn.models.define_model`, restored with TensorFlow's own
`Saver` exactly as `musicnn.extractor` does - on a few fixed log-mel spectrograms, and
writes the inputs (float16, as musicnn stores spectrograms) with each checkpoint's tag
probabilities and last-pool activations to tests/data/musicnn_reference.npz (~110 KB).

TensorFlow is no dependency of tlflax, so this runs once, in a throwaway environment:

    python3.11 -m venv /tmp/musicnn-reference
    /tmp/musicnn-reference/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0
    /tmp/musicnn-reference/bin/pip install --no-deps musicnn==0.1.0
    TF_USE_LEGACY_KERAS=1 /tmp/musicnn-reference/bin/python benchmarks/musicnn_reference.py

(`tf.compat.v1.layers`, which musicnn's model code uses, needs Keras 2: `tf-keras` with
`TF_USE_LEGACY_KERAS=1`.) Nothing from tlflax is imported, so the oracle shares no code
with the port it checks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "musicnn_reference.npz"
CHECKPOINTS = ("MTT_vgg", "MSD_vgg")
FRAMES, MEL_BANDS, NUM_TAGS = 187, 96, 50


def log_compress(mel_power: np.ndarray) -> np.ndarray:
    """musicnn's compression of mel power (musicnn.extractor.batch_data)."""
    return np.log10(10000 * mel_power + 1)


def reference_inputs(seed: int = 0) -> np.ndarray:
    """Three log-mel spectrograms (3, 187, 96), float16: noise, a drum-like pulse train
    (a broadband hit every 12 frames decaying over a few frames, strongest in the low
    bands), and a held chord (three harmonic stacks) over a quiet floor."""
    rng = np.random.default_rng(seed)
    noise = rng.exponential(1e-3, (FRAMES, MEL_BANDS))
    frames, bands = np.arange(FRAMES)[:, None], np.arange(MEL_BANDS)[None, :]
    decay = np.exp(-(frames % 12) / 2.0)
    pulses = 1e-5 + 0.05 * decay * np.exp(-bands / 30.0) * rng.uniform(0.5, 1.5, (FRAMES, 1))
    chord = np.full((FRAMES, MEL_BANDS), 1e-5)
    for fundamental in (18, 22, 27):
        for harmonic in (1, 2, 3):
            band = min(fundamental * harmonic // 2 + harmonic * 8, MEL_BANDS - 1)
            chord[:, band] += 0.02 / harmonic
    spectrograms = np.stack([noise, pulses, chord])
    return log_compress(spectrograms).astype(np.float16)


def run_original(checkpoint: str, spectrograms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tag probabilities (N, 50), last pool (N, 2, 1, 128)) of the original graph."""
    import tensorflow as tf
    from musicnn import models

    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.reset_default_graph()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, FRAMES, MEL_BANDS])
        is_training = tf.compat.v1.placeholder(tf.bool)
        logits, *_, pool5 = models.define_model(x, is_training, checkpoint, NUM_TAGS)
        probabilities = tf.nn.sigmoid(logits)
    folder = Path(next(iter(importlib.util.find_spec("musicnn").submodule_search_locations)))
    with tf.compat.v1.Session() as session:
        tf.compat.v1.train.Saver().restore(session, f"{folder / checkpoint}/")
        feed = {x: spectrograms.astype(np.float32), is_training: False}
        return tuple(session.run([probabilities, pool5], feed_dict=feed))


def main() -> None:
    spectrograms = reference_inputs()
    arrays = {"spectrograms": spectrograms}
    for checkpoint in CHECKPOINTS:
        probabilities, pool5 = run_original(checkpoint, spectrograms)
        arrays[f"{checkpoint}/probabilities"] = probabilities.astype(np.float32)
        arrays[f"{checkpoint}/pool5"] = pool5.astype(np.float32)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUTPUT, **arrays)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")
    for checkpoint in CHECKPOINTS:
        print(checkpoint, np.round(arrays[f"{checkpoint}/probabilities"][:, :8], 4))


if __name__ == "__main__":
    main()
