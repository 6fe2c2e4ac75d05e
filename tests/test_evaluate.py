"""Metrics checked against scikit-learn on random predictions."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from tlflax.metrics import classification_report, expected_calibration_error


def test_report_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    logits = rng.normal(size=(500, 4)) + 2.0 * np.eye(4)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    report = classification_report(probabilities, labels, ["a", "b", "c", "d"])
    predictions = probabilities.argmax(1)
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert report["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert report["confusion_matrix"] == confusion_matrix(labels, predictions).tolist()
    assert sum(c["support"] for c in report["per_class"].values()) == 500


def test_calibration_error():
    labels = np.array([0, 0, 1, 1])
    perfect = np.eye(2)[labels]
    assert expected_calibration_error(perfect, labels) == 0.0
    # Always 90% confident, right half the time: ECE = |0.9 - 0.5|.
    confident = np.tile([0.9, 0.1], (4, 1))
    assert expected_calibration_error(confident, labels) == pytest.approx(0.4)


def test_learning_curves_png(tmp_path):
    from tlflax.plots import plot_learning_curves

    path = tmp_path / "curves.png"
    plot_learning_curves({"fine-tuned": [0.7, 0.8, 0.85], "from scratch": [0.3, 0.5]}, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert not list(tmp_path.glob(".*tmp*"))
