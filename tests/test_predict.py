"""``python -m pipelines.predict``: inputs in, label and probability out, clear input errors.

The image path runs on a tiny real project: scikit-learn's digits as the stored dataset and
a small CNN classifier saved where the fine-tune stage saves its model. The text path end
to end is in tests/test_text.py (after the real text pipeline).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from PIL import Image
from sklearn.datasets import load_digits

from pipelines.predict import Prediction, predict, read_images, read_texts
from pipelines.stages.common import ExperimentPaths
from tests.conftest import run
from tlflax.calibration import apply_temperature
from tlflax.checkpoint import save_tree
from tlflax.config import parse_params
from tlflax.data.errors import DataError
from tlflax.data.tfds_store import write_image_dataset
from tlflax.tasks import class_probabilities, task_for

DIGIT_NAMES = [f"digit {digit}" for digit in range(10)]
VISION_PARAMS = {
    "prepare": {"dataset": "fashion_mnist"},
    "extract": {"backbone": "small_cnn", "pretrained": False, "image_size": 32},
}


@pytest.fixture(scope="module")
def vision_project(tmp_path_factory) -> Path:
    """A project folder with a stored digits dataset and a saved (untrained) classifier."""
    project = tmp_path_factory.mktemp("predict")
    (project / "params.yaml").write_text(yaml.safe_dump(VISION_PARAMS))
    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    paths = ExperimentPaths("vision")
    write_image_dataset(
        project / paths.dataset_dir, "fashion_mnist", {"test": (images, labels)}, DIGIT_NAMES
    )
    task = task_for(parse_params(VISION_PARAMS), paths.dataset_dir)
    model = task.build_classifier(10, pretrained=False, seed=0)
    # A random output kernel instead of the zero init, so predictions depend on the image.
    kernel = model.head.output.kernel
    kernel[...] = jax.random.normal(jax.random.key(0), kernel.shape)
    save_tree(project / paths.finetune / "model", nnx.state(model))
    for index in range(3):
        Image.fromarray(images[index, ..., 0]).save(project / f"digit{index}.png")
    Image.fromarray(images[0, ..., 0]).convert("RGB").save(project / "digit0_rgb.png")
    (project / "notes.png").write_bytes(b"not an image at all")
    return project


def test_image_files_predict_as_the_stored_images_do(vision_project, monkeypatch) -> None:
    monkeypatch.chdir(vision_project)
    params = parse_params(VISION_PARAMS)
    paths = ExperimentPaths("vision")
    files = ["digit0.png", "digit1.png", "digit2.png", "digit0_rgb.png"]
    predictions = predict(params, paths, files)
    assert [p.source for p in predictions] == files
    # The PNGs hold the stored digits; the path from file to model must not change them.
    task = task_for(params, paths.dataset_dir)
    images, _ = task.read_split("test")
    model, forward = task.load_classifier(10, paths.finetune / "model")
    expected = class_probabilities(model, forward, {"image": images[:3]}, batch_size=8)
    for prediction, row in zip(predictions, expected, strict=False):
        assert prediction.label == DIGIT_NAMES[row.argmax()]
        assert prediction.probability == pytest.approx(row.max(), abs=1e-5)
    # An RGB copy of a grayscale image converts back to the same grayscale pixels.
    assert predictions[3].label == predictions[0].label


def test_bad_image_stops_with_one_line_naming_the_file(vision_project) -> None:
    result = run(
        [
            sys.executable,
            "-m",
            "pipelines.predict",
            "--params",
            "params.yaml",
            "digit0.png",
            "notes.png",
        ],
        vision_project,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("predict: error: notes.png: not an image Pillow can read")
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_read_images_errors_and_conversion(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.jpg")
    (gray,) = read_images([tmp_path / "red.jpg"], (8, 8, 1))
    assert gray.shape == (8, 8, 1) and gray.dtype == np.uint8
    assert abs(int(gray[4, 4, 0]) - 76) <= 2  # ITU-R 601 luma of pure red
    with pytest.raises(DataError, match="missing.png: no such file"):
        read_images([tmp_path / "missing.png"], (8, 8, 3))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: not an image"):
        read_images([tmp_path / "empty.png"], (8, 8, 3))


def test_read_texts_from_sentences_and_files(tmp_path: Path) -> None:
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("Lovely tea.\n\n  \nToo sweet for me.\n", encoding="utf-8")
    texts, sources = read_texts(["Great snack!"], [reviews])
    assert texts == ["Great snack!", "Lovely tea.", "Too sweet for me."]
    assert sources == ["Great snack!", f"{reviews}:1", f"{reviews}:4"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not valid UTF-8 \(byte 3\)"):
        read_texts([], [latin1])
    with pytest.raises(DataError, match="absent.txt: no such file"):
        read_texts([], [tmp_path / "absent.txt"])
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="blank.txt: holds no text"):
        read_texts([], [tmp_path / "blank.txt"])
    with pytest.raises(DataError, match="input 2: the text is blank"):
        read_texts(["fine", "  "], [])


def test_prediction_line_format() -> None:
    line = Prediction("x" * 100, "great", 0.98765).format()
    label, probability, shown = line.split("\t")
    assert (label, probability) == ("great", "0.988")
    assert len(shown) == 60 and shown.endswith("...")


def test_probabilities_are_scaled_by_the_calibrated_temperature(vision_project, monkeypatch):
    monkeypatch.chdir(vision_project)
    params = parse_params(VISION_PARAMS)
    paths = ExperimentPaths("vision")
    files = ["digit0.png", "digit1.png", "digit2.png"]
    unscaled = predict(params, paths, files)
    calibration = paths.finetune.parent / "calibration.json"
    try:
        calibration.write_text('{"finetune": {"temperature": 3.0}}')
        scaled = predict(params, paths, files)
        calibration.write_text('{"head_only": {"temperature": 3.0}}')
        with pytest.raises(DataError, match="calibration.json: 'finetune.temperature' is missing"):
            predict(params, paths, files)
    finally:
        calibration.unlink()
    task = task_for(params, paths.dataset_dir)
    images, _ = task.read_split("test")
    model, forward = task.load_classifier(10, paths.finetune / "model")
    expected = apply_temperature(
        class_probabilities(model, forward, {"image": images[:3]}, batch_size=8), 3.0
    )
    assert [p.label for p in scaled] == [p.label for p in unscaled]
    for prediction, row in zip(scaled, expected, strict=True):
        assert prediction.probability == pytest.approx(row.max(), abs=1e-5)
    # A temperature above 1 softens: the top class keeps its place, less sure of itself.
    assert all(s.probability < u.probability for s, u in zip(scaled, unscaled, strict=True))
