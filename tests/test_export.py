"""The export stage and its forms: StableHLO and ONNX agree with Flax, and a server without
JAX serves the ONNX model.

The image path runs on a tiny real project (scikit-learn's digits stored as the dataset, a
small CNN classifier saved where the fine-tune stage saves its model, a calibration file),
through the stage's own command. EfficientNet's layers (depthwise convolutions, TF "same"
padding, pointwise products) and MiniLM's (embedding lookup, masked attention, layer norm,
GELU) are each checked on a small module built from the same code; the real fine-tuned
EfficientNet over the whole test split is ``python -m benchmarks.export``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest
import soundfile
import yaml
from flax import nnx
from PIL import Image
from sklearn.datasets import load_digits

from pipelines.stages.common import ExperimentPaths
from tests.conftest import RAW_ASTERISK, ROOT, run
from tlflax.checkpoint import save_tree
from tlflax.config import TrainHeadParams, parse_params
from tlflax.data.audio_folder import ClipSettings, load_clip
from tlflax.data.pipeline import prepare_images
from tlflax.data.tfds_store import write_image_dataset
from tlflax.export import (
    export_onnx_program,
    export_stablehlo,
    inference_program,
    load_stablehlo,
    write_export,
)
from tlflax.export_classifier import FORMAT_VERSION
from tlflax.export_onnx import UnsupportedPrimitiveError, export_onnx
from tlflax.models.layers import Conv2d, DepthwiseConv2d
from tlflax.models.minilm import load_tokenizer
from tlflax.sound import audio_forward, build_audio_classifier
from tlflax.tasks import task_for

TOLERANCE = 1e-4
DIGIT_NAMES = [f"digit {digit}" for digit in range(10)]
VISION_PARAMS = {
    "prepare": {"dataset": "fashion_mnist"},
    "extract": {"backbone": "small_cnn", "pretrained": False, "image_size": 32},
}
TEMPERATURE = 2.0
# Runs tlflax.serving's command line with JAX and Flax unimportable.
WITHOUT_JAX = (
    "import sys; sys.modules['jax'] = None; sys.modules['flax'] = None; "
    "from tlflax.serving import main; main()"
)


def onnx_logits(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def assert_same_logits(logits: np.ndarray, reference: np.ndarray) -> None:
    assert logits.shape == reference.shape
    np.testing.assert_allclose(logits, reference, atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(logits.argmax(axis=1), reference.argmax(axis=1))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Digits as the stored dataset, a saved small-CNN classifier, a calibration file."""
    project = tmp_path_factory.mktemp("export")
    (project / "params.yaml").write_text(yaml.safe_dump(VISION_PARAMS))
    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., None]
    paths = ExperimentPaths("vision")
    write_image_dataset(
        project / paths.dataset_dir,
        "fashion_mnist",
        {"test": (images, digits.target.astype(np.int64))},
        DIGIT_NAMES,
    )
    task = task_for(parse_params(VISION_PARAMS), project / paths.dataset_dir)
    model = task.build_classifier(10, pretrained=False, seed=0)
    kernel = model.head.output.kernel  # random, not the zero init: logits depend on the image
    kernel[...] = jax.random.normal(jax.random.key(0), kernel.shape)
    save_tree(project / paths.finetune / "model", nnx.state(model))
    calibration = {"finetune": {"temperature": TEMPERATURE}}
    (project / "models" / "vision" / "calibration.json").write_text(json.dumps(calibration))
    for index in range(3):
        Image.fromarray(images[index, ..., 0]).save(project / f"digit{index}.png")
    np.save(project / "wrong_size.npy", np.zeros((2, 16, 16, 1), np.uint8))
    (project / "notes.png").write_bytes(b"not an image at all")
    return project


@pytest.fixture(scope="module")
def exported(project) -> Path:
    """The export stage run in the project, as DVC runs it."""
    result = run([sys.executable, "-m", "pipelines.stages.export"], cwd=project)
    assert result.returncode == 0, result.stderr
    return project / "models" / "vision" / "export"


@pytest.fixture(scope="module")
def flax_logits(project) -> tuple[np.ndarray, np.ndarray]:
    """The saved classifier's logits of the first 40 digits, computed by Flax."""
    task = task_for(parse_params(VISION_PARAMS), project / ExperimentPaths("vision").dataset_dir)
    model, forward = task.load_classifier(10, project / "models/vision/finetune/model")
    images, _ = task.read_split("test")
    return images[:40], np.asarray(forward(model, {"image": images[:40]}, False, None))


def test_export_json_describes_inputs_classes_and_temperature(exported):
    description = json.loads((exported / "export.json").read_text())
    assert description["inputs"] == [
        {"name": "image", "shape": ["batch", 8, 8, 1], "dtype": "uint8"}
    ]
    assert description["output"] == {"name": "logits", "shape": ["batch", 10], "dtype": "float32"}
    assert description["class_names"] == DIGIT_NAMES
    assert description["temperature"] == TEMPERATURE
    assert description["image"]["pillow_mode"] == "L"
    assert "resize to 32x32" in description["preprocessing"]["in_graph"]
    assert {path.name for path in exported.iterdir()} == {"export.json", *description["files"]}


def test_stablehlo_matches_flax_at_any_batch_size(exported, flax_logits):
    images, reference = flax_logits
    call = load_stablehlo((exported / "model.stablehlo").read_bytes())
    assert_same_logits(np.asarray(call(images)), reference)
    assert_same_logits(np.asarray(call(images[:1])), reference[:1])


def test_onnx_matches_flax_at_any_batch_size(exported, flax_logits):
    images, reference = flax_logits
    model_bytes = (exported / "model.onnx").read_bytes()
    assert_same_logits(onnx_logits(model_bytes, {"image": images}), reference)
    assert_same_logits(onnx_logits(model_bytes, {"image": images[:1]}), reference[:1])


class DepthwiseNet(nnx.Module):
    """EfficientNet's layer kinds: strided 3x3 conv, BatchNorm, ReLU6, depthwise 5x5 (both
    implementations), pointwise product, mean pooling, a linear head."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = Conv2d(3, 8, 3, stride=2, rngs=rngs)
        self.norm = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.shifted = DepthwiseConv2d(8, 5, stride=2, impl="shifted", rngs=rngs)
        self.grouped = DepthwiseConv2d(8, 3, impl="xla", rngs=rngs)
        self.pointwise = Conv2d(8, 12, 1, rngs=rngs)
        self.head = nnx.Linear(12, 4, rngs=rngs)

    def __call__(self, images):
        x = jnp.clip(self.norm(self.stem(prepare_images(images, 20))), 0.0, 6.0)
        x = self.pointwise(jax.nn.silu(self.grouped(self.shifted(x))))
        return self.head(jnp.mean(x, axis=(1, 2)))


def test_a_test_time_flip_model_exports_to_matching_forms(project):
    # The mirror-image averaging is inside the graph: both forms average as Flax does.
    task = task_for(parse_params(VISION_PARAMS), project / ExperimentPaths("vision").dataset_dir)
    model, _ = task.load_classifier(10, project / "models/vision/finetune/model")
    forward = task.forward(test_time_flip=True)
    images = task.read_split("test")[0][:12]
    reference = np.asarray(forward(model, {"image": images}, False, None))
    plain = np.asarray(task.forward()(model, {"image": images}, False, None))
    assert not np.allclose(reference, plain)  # the flip changes the logits
    program = inference_program(model, forward, {"image": images[:1]})
    assert_same_logits(np.asarray(load_stablehlo(export_stablehlo(program))(images)), reference)
    model_bytes = export_onnx_program(program).SerializeToString()
    assert_same_logits(onnx_logits(model_bytes, {"image": images}), reference)


def test_depthwise_network_exports_to_matching_forms():
    # Built and run jitted: eagerly, each initializer and layer compiles on its own (seconds).
    model = nnx.jit(lambda: DepthwiseNet(nnx.Rngs(0)))()
    model.norm.mean[...] = jax.random.normal(jax.random.key(1), (8,))
    images = np.random.default_rng(0).integers(0, 256, (6, 13, 13, 1), dtype=np.uint8)
    program = inference_program(model, lambda m, batch, *_: m(batch["image"]), {"image": images})
    reference = np.asarray(nnx.jit(lambda model, images: model(images))(model, images))
    logits = load_stablehlo(export_stablehlo(program))(images)
    assert_same_logits(np.asarray(logits), reference)
    model_bytes = export_onnx_program(program).SerializeToString()
    assert_same_logits(onnx_logits(model_bytes, {"image": images}), reference)


class TinyEncoder(nnx.Module):
    """MiniLM's layer kinds at toy size: embedding lookup, masked softmax attention, layer
    norm, GELU (erf), masked mean pooling and a head, over its WordPiece vocabulary."""

    def __init__(self, rngs: nnx.Rngs, vocabulary: int = 30522, width: int = 8):
        self.embed = nnx.Embed(vocabulary, width, rngs=rngs)
        self.query = nnx.Linear(width, width, rngs=rngs)
        self.key = nnx.Linear(width, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        scores = jnp.einsum("bqd,bkd->bqk", self.query(x), self.key(x)) / 3.0
        scores = jnp.where(attention_mask[:, None, :] > 0, scores, -1e9)
        x = self.norm(x + jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores), x))
        x = jax.nn.gelu(x, approximate=False)
        mask = attention_mask[..., None].astype(jnp.float32)
        return self.head(jnp.sum(x * mask, axis=1) / jnp.sum(mask, axis=1))


@pytest.fixture(scope="module")
def text_export(tmp_path_factory) -> tuple[Path, TinyEncoder]:
    """A tiny encoder exported with the MiniLM tokenizer, as the stage exports a text model."""
    model, tokenizer = nnx.jit(lambda: TinyEncoder(nnx.Rngs(0)))(), load_tokenizer(12)
    tokens = {
        "input_ids": np.zeros((1, 12), np.int32),
        "attention_mask": np.ones((1, 12), np.int32),
    }

    def forward(model, batch, train, key):
        return model(batch["input_ids"], batch["attention_mask"])

    directory = tmp_path_factory.mktemp("text") / "export"
    description = {
        "format_version": FORMAT_VERSION,
        "modality": "text",
        "class_names": ["negative", "positive"],
        "temperature": 1.0,
        "text": {"tokenizer": "tokenizer.json", "max_length": 12},
    }
    tokenizer_json = {"tokenizer.json": tokenizer.to_str().encode()}
    write_export(inference_program(model, forward, tokens), directory, description, tokenizer_json)
    return directory, model


def test_text_encoder_onnx_matches_flax(text_export):
    directory, model = text_export
    texts = ["Stale and overpriced.", "Lovely tea, will buy it again and again and again!"]
    encodings = load_tokenizer(12).encode_batch(texts)
    tokens = {
        "input_ids": np.array([e.ids for e in encodings], np.int32),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int32),
    }
    reference = np.asarray(model(tokens["input_ids"], tokens["attention_mask"]))
    model_bytes = (directory / "model.onnx").read_bytes()
    assert_same_logits(onnx_logits(model_bytes, tokens), reference)
    stablehlo = load_stablehlo((directory / "model.stablehlo").read_bytes())
    assert_same_logits(np.asarray(stablehlo(*tokens.values())), reference)


@pytest.fixture(scope="module")
def audio_classifier():
    """The real musicnn (pretrained, cut after its second block as the job's taps cut it)
    with a random head: logits that depend on the clip, of order 1."""
    model = build_audio_classifier(
        "musicnn_vgg", 5, TrainHeadParams(head="linear"), pretrained=True, taps=[2, 3]
    )
    kernel = model.head.output.kernel
    # Scaled by the fan-in: logits of order 1, where the shared absolute tolerance fits.
    kernel[...] = jax.random.normal(jax.random.key(0), kernel.shape) / kernel.shape[0] ** 0.5
    return model


def test_audio_classifier_onnx_matches_flax(audio_classifier):
    # Behind the log-mel front end: reflect padding, framing, the real FFT, the mel
    # filterbank, then convolutions and max pooling.
    rng = np.random.default_rng(0)
    clips = (0.1 * rng.standard_normal((3, 48000))).astype(np.float32)
    clips[1, 24000:] = 0.0  # a padded clip, as short prompts are stored
    program = inference_program(audio_classifier, audio_forward(), {"audio": clips[:1]})
    reference = np.asarray(audio_forward()(audio_classifier, {"audio": clips}, False, None))
    assert_same_logits(np.asarray(load_stablehlo(export_stablehlo(program))(clips)), reference)
    model_bytes = export_onnx_program(program).SerializeToString()
    assert_same_logits(onnx_logits(model_bytes, {"audio": clips}), reference)


# None: an export written before clip_padding existed, which padded with zeros.
@pytest.mark.parametrize("padding", [None, "repeat"])
def test_server_without_jax_reads_sound_files_as_prepare_stores_them(
    audio_classifier, tmp_path, padding
):
    if not RAW_ASTERISK.exists():
        pytest.fail(f"{RAW_ASTERISK} is missing: run `make assets` (scripts/fetch_assets.sh)")
    # The audio job's: 16 kHz, 3 s, start-aligned.
    settings = ClipSettings(padding=padding or "zeros")
    directory = tmp_path / "export"
    audio = {"sample_rate": 16000, "samples": 48000, "clip_align": "start"}
    description = {
        "format_version": FORMAT_VERSION,
        "modality": "audio",
        "class_names": ["en", "es", "fr", "it", "ru"],
        "temperature": 1.0,
        "audio": audio if padding is None else audio | {"clip_padding": padding},
    }
    example = {"audio": np.zeros((1, 48000), np.float32)}
    write_export(
        inference_program(audio_classifier, audio_forward(), example), directory, description
    )
    # A real 8 kHz prompt, and the same prompt as a 44.1 kHz stereo FLAC.
    prompt = sorted((RAW_ASTERISK / "fr").rglob("*.wav"))[0]
    samples, rate = soundfile.read(prompt, dtype="float32")
    assert samples.shape[0] < 3 * rate  # short enough to be padded, so padding tells
    stereo = np.stack([samples, 0.5 * samples], axis=1).repeat(2, axis=0)  # 16 kHz, 2 channels
    soundfile.write(tmp_path / "stereo.flac", stereo, 2 * rate)
    np.save(tmp_path / "two.npy", np.zeros((2, 48000), np.float32))
    inputs = [str(prompt), "stereo.flac", "two.npy"]
    result = serve(directory, *inputs, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [line[2][-20:] for line in lines] == [
        str(prompt)[-20:],
        "stereo.flac",
        "two.npy[0]",
        "two.npy[1]",
    ]
    # Each file as prepare stores it (load_clip), classified by Flax: the same labels.
    clips = [
        load_clip(Path(path), path, settings)[0] for path in (prompt, tmp_path / "stereo.flac")
    ]
    clips += [np.zeros(48000, np.float32)] * 2
    logits = audio_forward()(audio_classifier, {"audio": np.stack(clips)}, False, None)
    assert [line[0] for line in lines] == [
        description["class_names"][i] for i in np.argmax(logits, 1)
    ]
    expected = jax.nn.softmax(np.asarray(logits), axis=1).max(axis=1)
    np.testing.assert_allclose([float(line[1]) for line in lines], expected, atol=1e-3)
    # A file that is not audio: one line naming it, exit 2.
    (tmp_path / "notes.wav").write_text("not a sound")
    bad = serve(directory, "notes.wav", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("serving: error: notes.wav: not a readable WAV")


def test_complex_values_reach_only_real_and_imag():
    spec = {"x": jax.ShapeDtypeStruct((2, 16), jnp.float32)}
    with pytest.raises(NotImplementedError, match="primitive 'abs' is not supported .*complex"):
        export_onnx(lambda x: jnp.abs(jnp.fft.rfft(x)), spec)
    with pytest.raises(NotImplementedError, match="primitive 'fft' .*only a real FFT"):
        export_onnx(lambda x: jnp.real(jnp.fft.fft(x.astype(jnp.complex64))), spec)


def test_uncovered_primitive_raises_naming_it():
    spec = {"x": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
    with pytest.raises(NotImplementedError, match="primitive 'cumsum' is not supported"):
        export_onnx(lambda x: jnp.cumsum(x, axis=1), spec)
    assert issubclass(UnsupportedPrimitiveError, NotImplementedError)


def serve(export_dir: Path, *inputs: str, cwd: Path):
    return run([sys.executable, "-c", WITHOUT_JAX, str(export_dir), *inputs], cwd=cwd)


def test_server_without_jax_predicts_flax_labels(project, exported, flax_logits):
    _, reference = flax_logits
    result = serve(exported, "digit0.png", "digit1.png", "digit2.png", cwd=project)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [line[2] for line in lines] == ["digit0.png", "digit1.png", "digit2.png"]
    assert [line[0] for line in lines] == [DIGIT_NAMES[i] for i in reference[:3].argmax(1)]
    # The calibrated temperature divides the logits before the softmax.
    expected = jax.nn.softmax(reference[:3] / TEMPERATURE, axis=1).max(axis=1)
    np.testing.assert_allclose([float(line[1]) for line in lines], expected, atol=1e-3)


def test_server_without_jax_tokenizes_texts(text_export):
    directory, model = text_export
    result = serve(directory, "Stale and overpriced.", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    tokens = load_tokenizer(12).encode_batch(["Stale and overpriced."])[0]
    reference = model(np.array([tokens.ids], np.int32), np.array([tokens.attention_mask], np.int32))
    label = ["negative", "positive"][int(np.argmax(reference))]
    assert result.stdout.split("\t")[0] == label


@pytest.mark.parametrize(
    ("inputs", "named"),
    [
        (["missing.png"], "missing.png: no such file"),
        (["notes.png"], "notes.png: not an image"),
        (
            ["wrong_size.npy"],
            "wrong_size.npy: holds uint8 (2, 16, 16, 1); expected uint8 (8, 8, 1)",
        ),
    ],
)
def test_server_rejects_bad_images_in_one_line(project, exported, inputs, named):
    result = serve(exported, *inputs, cwd=project)
    assert result.returncode == 2
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_server_rejects_blank_text_in_one_line(text_export):
    result = serve(text_export[0], "fine", "   ", cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == "serving: error: input 2: the text is blank"
