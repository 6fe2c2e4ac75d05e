"""Temperature scaling: one temperature per model, fitted on validation, that makes its
probabilities honest without changing a single prediction.

A network trained to a low training loss is overconfident: its top probability is higher
than its accuracy. Dividing its logits by one temperature ``T > 0`` (Guo et al., 2017,
"On Calibration of Modern Neural Networks") fixes most of that; ``T`` is fitted by
minimising the negative log-likelihood of the validation labels. The models hand over
probabilities, not logits: ``log(p)`` differs from the logits by a constant per example,
which softmax ignores, so ``softmax(log(p) / T)`` is the temperature-scaled model.

Example:
    >>> calibration = fit_calibration(validation_probabilities, validation_labels)
    >>> calibrated = apply_temperature(test_probabilities, calibration.temperature)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from tlflax.data.errors import DataError
from tlflax.metrics import expected_calibration_error

# Where the calibrate stage writes every model's fit, in the experiment's models folder.
CALIBRATION_FILE_NAME = "calibration.json"
# The models that are temperature-scaled (the baseline's probabilities are scikit-learn's).
CALIBRATED_MODELS = ("head_only", "finetune", "scratch")
# The search range of T: wide enough for real models (a from-scratch audio model right 27%
# of the time and sure of itself needed 30), and bounded so that a validation split the
# model classifies perfectly, whose likelihood only grows as T shrinks, cannot drive T to 0.
TEMPERATURE_BOUNDS = (0.05, 100.0)
# Probabilities a float32 softmax rounded to 0 still get a finite logit.
_SMALLEST_PROBABILITY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Calibration:
    """One model's temperature and what it did to the validation split it was fitted on."""

    temperature: float
    validation_nll_before: float
    validation_nll_after: float
    validation_ece_before: float
    validation_ece_after: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def logits_of(probabilities: np.ndarray) -> np.ndarray:
    """Logits (float64) whose softmax is ``probabilities``, up to a constant per row."""
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), _SMALLEST_PROBABILITY))


def negative_log_likelihood(
    probabilities: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean ``-log softmax(log(p) / temperature)[label]`` over the examples."""
    log_probabilities = log_softmax(logits_of(probabilities) / temperature, axis=1)
    return float(-log_probabilities[np.arange(len(labels)), labels].mean())


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / temperature)`` in float64; the most probable class of every row
    stays the same (checked).

    A temperature of 1 returns ``probabilities`` untouched, so a model without a fitted
    temperature scores exactly as before.
    """
    if temperature == 1.0:
        return probabilities
    scaled = np.exp(log_softmax(logits_of(probabilities) / temperature, axis=1))
    # Float64 keeps distinct float32 probabilities distinct after scaling, so no tie (and
    # no changed prediction) can appear; a changed prediction would be a bug here.
    if not np.array_equal(scaled.argmax(axis=1), np.asarray(probabilities).argmax(axis=1)):
        raise AssertionError("temperature scaling changed a predicted class")
    return scaled


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in :data:`TEMPERATURE_BOUNDS` minimising the negative log-likelihood
    of ``labels``; deterministic (bounded Brent search over ``log T``)."""
    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_temperature: negative_log_likelihood(
            probabilities, labels, math.exp(log_temperature)
        ),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def fit_calibration(
    probabilities: np.ndarray, labels: np.ndarray, *, bins: int = 15
) -> Calibration:
    """Fit a temperature on ``probabilities`` of a validation split and report its negative
    log-likelihood and ECE (``bins`` equal-width bins) before and after."""
    temperature = fit_temperature(probabilities, labels)
    calibrated = apply_temperature(probabilities, temperature)
    return Calibration(
        temperature=temperature,
        validation_nll_before=negative_log_likelihood(probabilities, labels),
        validation_nll_after=negative_log_likelihood(probabilities, labels, temperature),
        validation_ece_before=expected_calibration_error(probabilities, labels, bins=bins),
        validation_ece_after=expected_calibration_error(calibrated, labels, bins=bins),
    )


def reliability_diagram(
    probabilities: np.ndarray, labels: np.ndarray, *, bins: int = 15
) -> dict[str, list]:
    """Per confidence bin: mean confidence, accuracy and count of the examples in it.

    The bins are those of :func:`~tlflax.metrics.expected_calibration_error`: ``bins``
    equal-width intervals ``(i/bins, (i+1)/bins]``, a confidence of 0 in the first; the
    count-weighted mean gap between confidence and accuracy is that ECE. An empty bin's
    confidence and accuracy are ``None``.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    confidence_sum = np.bincount(which, weights=confidence, minlength=bins)
    correct_sum = np.bincount(which, weights=correct, minlength=bins)
    return {
        "bin_confidence": [
            float(s / n) if n else None for s, n in zip(confidence_sum, count, strict=True)
        ],
        "bin_accuracy": [
            float(s / n) if n else None for s, n in zip(correct_sum, count, strict=True)
        ],
        "bin_count": count.tolist(),
    }


@dataclass(frozen=True)
class CalibratedModels:
    """Models' probabilities of one split, temperature-scaled, and what scaling changed.

    Attributes:
      probabilities: model -> its scaled class probabilities.
      scores: model -> its ``temperature`` and ``ece_uncalibrated`` (before scaling).
      reliability: model -> its ``calibrated`` and ``uncalibrated``
        :func:`reliability_diagram`.
    """

    probabilities: dict[str, np.ndarray]
    scores: dict[str, dict[str, float]]
    reliability: dict[str, dict[str, dict[str, list]]]


def calibrate_models(
    probabilities: Mapping[str, np.ndarray],
    labels: np.ndarray,
    temperatures: Mapping[str, float],
    *,
    bins: int = 15,
) -> CalibratedModels:
    """Scale each model's ``probabilities`` by its temperature (absent: 1, unscaled) and
    describe its calibration on ``labels`` before and after."""
    calibrated = CalibratedModels({}, {}, {})
    for name, uncalibrated in probabilities.items():
        temperature = temperatures.get(name, 1.0)
        scaled = apply_temperature(uncalibrated, temperature)
        calibrated.probabilities[name] = scaled
        calibrated.scores[name] = {
            "ece_uncalibrated": expected_calibration_error(uncalibrated, labels, bins=bins),
            "temperature": temperature,
        }
        calibrated.reliability[name] = {
            "calibrated": reliability_diagram(scaled, labels, bins=bins),
            "uncalibrated": reliability_diagram(uncalibrated, labels, bins=bins),
        }
    return calibrated


def read_temperatures(path: Path, models: Iterable[str]) -> dict[str, float]:
    """Each of ``models``' temperature from the calibrate stage's ``path``; every model at
    temperature 1 (no scaling) where ``path`` does not exist (a pipeline without the stage).

    Raises:
      DataError: naming ``path`` and the key when it is not JSON, lacks one of ``models``
        or its ``temperature``, or holds a temperature that is not a positive number.
    """
    models = list(models)
    if not path.exists():
        return dict.fromkeys(models, 1.0)
    rerun = "run the calibrate stage again"
    try:
        fits = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"not valid JSON ({error})", rerun) from None
    if not isinstance(fits, dict):
        raise DataError(path, "must hold an object of models", rerun)
    temperatures = {}
    for model in models:
        fit = fits.get(model)
        if not isinstance(fit, dict) or "temperature" not in fit:
            raise DataError(path, f"'{model}.temperature' is missing", rerun)
        temperature = fit["temperature"]
        valid = isinstance(temperature, int | float) and not isinstance(temperature, bool)
        if not valid or not math.isfinite(temperature) or temperature <= 0:
            raise DataError(
                path, f"'{model}.temperature' must be a positive number, not {temperature!r}", rerun
            )
        temperatures[model] = float(temperature)
    return temperatures
