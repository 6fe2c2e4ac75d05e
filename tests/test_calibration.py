"""Temperature scaling: the fit recovers a known temperature, never changes a prediction,
lowers held-out ECE; the calibrate and evaluate stages use it on a real small pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from pipelines.stages import calibrate, evaluate
from pipelines.stages.common import run_command
from tests.small_project import copy_project
from tlflax.calibration import (
    apply_temperature,
    fit_calibration,
    fit_temperature,
    negative_log_likelihood,
    read_temperatures,
    reliability_diagram,
)
from tlflax.data.errors import DataError
from tlflax.metrics import expected_calibration_error

TRUE_TEMPERATURE = 2.5


def overconfident_model(examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 probabilities of a model whose logits are a calibrated model's times
    :data:`TRUE_TEMPERATURE`, and labels drawn from the calibrated model."""
    rng = np.random.default_rng(seed)
    classes = 10
    truth = rng.integers(0, classes, examples)
    calibrated_logits = rng.normal(size=(examples, classes)) + 2.5 * np.eye(classes)[truth]
    calibrated = softmax(calibrated_logits, axis=1)
    labels = (rng.random((examples, 1)) > calibrated.cumsum(axis=1)).sum(axis=1)
    sharpened = softmax(calibrated_logits * TRUE_TEMPERATURE, axis=1).astype(np.float32)
    return sharpened, labels


def test_fit_recovers_the_temperature_that_sharpened_a_calibrated_model() -> None:
    probabilities, labels = overconfident_model(20_000, seed=0)
    temperature = fit_temperature(probabilities, labels)
    assert temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.05)
    # Deterministic: the same data give the same temperature, bit for bit.
    assert fit_temperature(probabilities, labels) == temperature


def test_scaling_never_changes_a_prediction() -> None:
    probabilities, _ = overconfident_model(5_000, seed=1)
    # Rows with float32 underflow (zeros) and exact ties are kept as the softmax made them.
    probabilities[:3] = np.array([1.0] + [0.0] * 9, dtype=np.float32)
    probabilities[3:6] = np.array([0.5, 0.5] + [0.0] * 8, dtype=np.float32)
    for temperature in (0.05, 0.3, 1.0, 2.5, 20.0):
        scaled = apply_temperature(probabilities, temperature)
        np.testing.assert_array_equal(scaled.argmax(axis=1), probabilities.argmax(axis=1))
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-6)
    assert apply_temperature(probabilities, 1.0) is probabilities


def test_calibration_fitted_on_one_half_lowers_ece_and_nll_on_the_other() -> None:
    probabilities, labels = overconfident_model(4_000, seed=2)
    fit, held_out = slice(0, 2_000), slice(2_000, None)
    calibration = fit_calibration(probabilities[fit], labels[fit])
    assert calibration.validation_nll_after < calibration.validation_nll_before
    assert calibration.validation_ece_after < calibration.validation_ece_before
    scaled = apply_temperature(probabilities[held_out], calibration.temperature)
    before = expected_calibration_error(probabilities[held_out], labels[held_out])
    after = expected_calibration_error(scaled, labels[held_out])
    assert after <= before and after < 0.03 < before
    assert negative_log_likelihood(
        probabilities[held_out], labels[held_out], calibration.temperature
    ) < negative_log_likelihood(probabilities[held_out], labels[held_out])


def test_reliability_diagram_bins_are_those_of_the_ece() -> None:
    probabilities, labels = overconfident_model(3_000, seed=3)
    diagram = reliability_diagram(probabilities, labels, bins=15)
    counts = np.array(diagram["bin_count"])
    assert len(counts) == 15 and counts.sum() == 3_000
    gaps = [
        count * abs(confidence - accuracy)
        for count, confidence, accuracy in zip(
            counts, diagram["bin_confidence"], diagram["bin_accuracy"], strict=True
        )
        if count
    ]
    assert sum(gaps) / 3_000 == pytest.approx(expected_calibration_error(probabilities, labels))
    # An empty bin has no confidence or accuracy (JSON null), not a made-up 0.
    empty = int(np.flatnonzero(counts == 0)[0])
    assert diagram["bin_confidence"][empty] is None and diagram["bin_accuracy"][empty] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"head_only": {"temperature": 1.2}}', "'finetune.temperature' is missing"),
        ('{"finetune": {"nll": 1}, "head_only": {"temperature": 1}}', "'finetune.temperature'"),
        (
            '{"finetune": {"temperature": 0}, "head_only": {"temperature": 1}}',
            "'finetune.temperature' must be a positive number, not 0",
        ),
        ('{"finetune": {"temperature": -2.0}}', "'finetune.temperature' must be a positive"),
        ('{"finetune": {"temperature": NaN}}', "must be a positive number, not nan"),
        ('{"finetune": {"temperature": "2"}}', "must be a positive number, not '2'"),
        ("[1, 2]", "must hold an object of models"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_calibration_file_is_named_with_its_key(tmp_path: Path, content, message) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as raised:
        read_temperatures(path, ["finetune", "head_only"])
    assert str(raised.value).startswith(f"{path}: ") and "\n" not in str(raised.value)


def test_without_a_calibration_file_every_temperature_is_one(tmp_path: Path) -> None:
    absent = tmp_path / "calibration.json"
    assert read_temperatures(absent, ["head_only", "finetune"]) == {
        "head_only": 1.0,
        "finetune": 1.0,
    }


# ------------------------------------------------------------- the stages, on a real project


@pytest.fixture(scope="module")
def calibrated_project(small_project: Path, tmp_path_factory) -> Path:
    """A copy of the built small project (evaluated without calibration), calibrated and
    evaluated again by the stages' entries, in this process."""
    project = copy_project(
        small_project, tmp_path_factory.mktemp("calibration") / "project", with_history=False
    )
    (project / "metrics/vision/evaluate.json").rename(project / "uncalibrated.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        run_command("calibrate", "params.yaml", calibrate.run)
        run_command("evaluate", "params.yaml", evaluate.run)
    return project


def test_calibrate_stage_fits_every_trained_model_on_validation(calibrated_project) -> None:
    fits = json.loads((calibrated_project / "models/vision/calibration.json").read_text())
    trained = {"head_only", "finetune"} | (
        {"scratch"} if (calibrated_project / "models/vision/scratch/model").exists() else set()
    )
    assert set(fits) == trained
    for fit in fits.values():
        assert set(fit) == {
            "temperature",
            "validation_nll_before",
            "validation_nll_after",
            "validation_ece_before",
            "validation_ece_after",
        }
        assert fit["temperature"] > 0
        # The fit minimises the validation NLL, and T = 1 is one of the candidates.
        assert fit["validation_nll_after"] <= fit["validation_nll_before"] + 1e-9


def test_evaluate_reports_calibrated_ece_and_keeps_every_prediction(calibrated_project) -> None:
    before = json.loads((calibrated_project / "uncalibrated.json").read_text())
    after = json.loads((calibrated_project / "metrics/vision/evaluate.json").read_text())
    fits = json.loads((calibrated_project / "models/vision/calibration.json").read_text())
    reliability = json.loads((calibrated_project / "plots/vision/reliability.json").read_text())
    assert set(reliability) == set(fits)
    assert after["baseline"] == before["baseline"]
    for name, fit in fits.items():
        # Without calibration.json evaluate scaled nothing.
        assert before[name]["temperature"] == 1.0
        assert before[name]["ece"] == before[name]["ece_uncalibrated"]
        assert after[name]["temperature"] == fit["temperature"]
        assert after[name]["ece_uncalibrated"] == pytest.approx(before[name]["ece"])
        for key in ("accuracy", "macro_f1", "gain_over_baseline"):
            assert after[name][key] == before[name][key], (name, key)
        for form in ("calibrated", "uncalibrated"):
            diagram = reliability[name][form]
            assert set(diagram) == {"bin_confidence", "bin_accuracy", "bin_count"}
            assert sum(diagram["bin_count"]) == after["n_test"]
            assert len(diagram["bin_confidence"]) == len(diagram["bin_accuracy"]) == 15
        calibrated = reliability[name]["calibrated"]
        gaps = [
            count * abs(confidence - accuracy)
            for count, confidence, accuracy in zip(
                calibrated["bin_count"],
                calibrated["bin_confidence"],
                calibrated["bin_accuracy"],
                strict=True,
            )
            if count
        ]
        assert sum(gaps) / after["n_test"] == pytest.approx(after[name]["ece"])


def test_evaluate_stops_on_a_bad_calibration_file(calibrated_project, capsys, monkeypatch):
    calibration = calibrated_project / "models/vision/calibration.json"
    good = calibration.read_text()
    fits = json.loads(good)
    fits["finetune"]["temperature"] = -1.0
    calibration.write_text(json.dumps(fits))
    monkeypatch.chdir(calibrated_project)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as stop:
            run_command("evaluate", "params.yaml", evaluate.run)
    finally:
        calibration.write_text(good)
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "evaluate: error: models/vision/calibration.json: 'finetune.temperature' must be a "
        "positive number, not -1.0 (run the calibrate stage again)"
    )
