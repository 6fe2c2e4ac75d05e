"""A classical scikit-learn baseline: the honest reference every transfer result is compared with.

The baseline sees the same training split as the networks and nothing else: its model and
hyperparameters are chosen by stratified k-fold cross-validation on train alone, and the
winner is refitted on all of train. Validation and test are only ever predicted.

The candidates are the strong classical models for each modality:

- images: an RBF-kernel SVM on the raw pixels (flattened, scaled to [0, 1]) and on
  square-rooted, unit-length pixel vectors, and multinomial logistic regression on the
  pixels. The square root and per-image normalisation (a Hellinger-style kernel) keep large,
  bright images from dominating the distances: on Fashion-MNIST with 100 images per class
  they add 1.5-2 points of test accuracy to the SVM (0.804-0.808 -> 0.827-0.830).
- text: logistic regression on TF-IDF word 1-2-grams plus character 2-5-grams.
- audio: an RBF-kernel SVM and logistic regression on the standardised mean and standard
  deviation over time of each clip's 20 MFCCs (:func:`tlflax.mfcc.mfcc_statistics`, librosa's
  defaults), the zero padding that brings clips to one length left out. On the Asterisk
  prompts (5 languages, 20 training clips each) the SVM scores 0.88-0.91 on the rest; the
  padding's silent frames, counted, would cost it 7 points.

Cost: the representations are refitted on every fold (a fold's vocabulary never sees its
held-out texts) and shared by the candidates of that fold; a clip's MFCC statistics depend on
that clip alone, so they are computed once, before the folds (~1.5 ms per 3 s clip). On 2
cores the image grid takes about 5 s for 1000 Fashion-MNIST images, the text grid about 12 s
for 3600 reviews; an RBF-SVM grows quadratically with the training set, to minutes for
10,000 images.

Example:
    >>> baseline = fit_baseline(images, labels, modality="image", seed=0)  # doctest: +SKIP
    >>> baseline.model, round(baseline.cv_accuracy, 3)  # doctest: +SKIP
    ('sqrt_l2_pixels_rbf_svm(C=10)', 0.83)
    >>> baseline.predict_proba(test_images).shape  # doctest: +SKIP
    (10000, 10)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline, make_union
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from tlflax.data.errors import DataError
from tlflax.mfcc import mfcc_statistics

Modality = Literal["image", "text", "audio"]
# uint8 images (N, H, W[, C]), N texts, or float clips (N, samples).
Inputs = np.ndarray | Sequence[str]
# Coefficients per frame of the audio features, librosa's default.
MFCC_COEFFICIENTS = 20


def _unit_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W[, C]) -> one row of pixel values in [0, 1] per image."""
    return images.reshape(len(images), -1) / 255.0


def _pixels() -> TransformerMixin:
    return FunctionTransformer(_unit_pixels)


def _sqrt_l2_pixels() -> TransformerMixin:
    return make_pipeline(
        FunctionTransformer(_unit_pixels), FunctionTransformer(np.sqrt), Normalizer()
    )


def _tfidf_words_and_characters() -> TransformerMixin:
    # Sublinear term frequencies and n-grams seen in at least two texts: on the fine-food
    # reviews as accurate as keeping every n-gram, with a third of the features.
    return make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
    )


def _clip_features(sample_rate: int | None) -> TransformerMixin:
    """Float clips (N, samples) -> their MFCC statistics (N, 40), zero padding left out."""
    if sample_rate is None:
        raise ValueError("an audio baseline needs the clips' sample_rate")
    return FunctionTransformer(
        mfcc_statistics,
        kw_args={
            "sample_rate": sample_rate,
            "n_mfcc": MFCC_COEFFICIENTS,
            "exclude_zero_padding": True,
        },
    )


# Representation name -> a new, unfitted transformer from the inputs to a feature matrix.
# Audio's inputs reach it as MFCC statistics already (:func:`_clip_features`).
REPRESENTATIONS: dict[str, Callable[[], TransformerMixin]] = {
    "pixels": _pixels,
    "sqrt_l2_pixels": _sqrt_l2_pixels,
    "tfidf_word1-2+char2-5": _tfidf_words_and_characters,
    "mfcc_stats": StandardScaler,
}
# Classifier name -> a new, unfitted classifier with inverse regularisation strength C.
CLASSIFIERS: dict[str, Callable[[float], ClassifierMixin]] = {
    "rbf_svm": lambda C: SVC(C=C, kernel="rbf", gamma="scale"),
    "logreg": lambda C: LogisticRegression(C=C, max_iter=2000),
}
# Classifiers that give scores, not probabilities: their scores are temperature-scaled on
# held-out folds of train. One temperature for all classes keeps every prediction (the
# argmax) as it was; SVC(probability=True) is deprecated since scikit-learn 1.9.
SCORE_CLASSIFIERS = frozenset({"rbf_svm"})
# BLAS threads for fitting and predicting. The matrices are small (thousands of rows):
# OpenBLAS's threads cost more than they save, and on a busy machine far more - a logistic
# regression on 1000 Fashion-MNIST images took 11 s with two threads, 0.5 s with one.
BLAS_THREADS = 1


@dataclass(frozen=True)
class Candidate:
    """One model the cross-validation compares: a classifier on a representation."""

    representation: str
    classifier: str
    C: float

    @property
    def name(self) -> str:
        """E.g. ``pixels_rbf_svm(C=10)``, ``tfidf_word1-2+char2-5_logreg(C=3)``."""
        return f"{self.representation}_{self.classifier}(C={self.C:g})"

    @property
    def hyperparameters(self) -> dict[str, Any]:
        probabilities = (
            "temperature-scaled decision function"
            if self.classifier in SCORE_CLASSIFIERS
            else "predict_proba"
        )
        return {
            "representation": self.representation,
            "classifier": self.classifier,
            "C": self.C,
            "probabilities": probabilities,
        }

    def build(self) -> BaseEstimator:
        """The unfitted pipeline: representation, then classifier."""
        return make_pipeline(
            REPRESENTATIONS[self.representation](), CLASSIFIERS[self.classifier](self.C)
        )


# The grid for each modality, in order of preference on a tie.
CANDIDATES: dict[Modality, tuple[Candidate, ...]] = {
    "image": (
        *(Candidate("pixels", "rbf_svm", C) for C in (1.0, 3.0, 10.0)),
        *(Candidate("sqrt_l2_pixels", "rbf_svm", C) for C in (1.0, 3.0, 10.0)),
        *(Candidate("pixels", "logreg", C) for C in (0.1, 1.0)),
    ),
    "text": tuple(Candidate("tfidf_word1-2+char2-5", "logreg", C) for C in (1.0, 3.0, 10.0, 30.0)),
    "audio": (
        *(Candidate("mfcc_stats", "rbf_svm", C) for C in (1.0, 3.0, 10.0)),
        *(Candidate("mfcc_stats", "logreg", C) for C in (0.1, 1.0)),
    ),
}


@dataclass(frozen=True)
class Baseline:
    """The chosen candidate, refitted on all of train, and how it was chosen.

    Attributes:
      model: the chosen candidate's name, e.g. ``sqrt_l2_pixels_rbf_svm(C=10)``.
      hyperparameters: its representation, classifier, C and source of probabilities.
      cv_accuracy: its mean held-out accuracy over the cross-validation folds of train.
      candidate_cv_accuracies: every candidate's name -> its mean held-out accuracy.
      cv_folds: the number of folds.
      train_examples: how many examples it was refitted on.
      num_classes: the columns of :meth:`predict_proba`.
      fit_seconds: wall time of the selection and the refit.
      modality: the kind of inputs it takes, ``"image"``, ``"text"`` or ``"audio"``.
      estimator: the fitted scikit-learn estimator (inputs -> probabilities of its classes);
        for audio its first step computes the clips' MFCC statistics at train's sample rate.
    """

    model: str
    hyperparameters: dict[str, Any]
    cv_accuracy: float
    candidate_cv_accuracies: dict[str, float]
    cv_folds: int
    train_examples: int
    num_classes: int
    fit_seconds: float
    modality: Modality
    estimator: BaseEstimator = field(repr=False)

    def predict_proba(self, inputs: Inputs, *, location: str = "inputs") -> np.ndarray:
        """Class probabilities (N, num_classes), one row per input, in order.

        A class absent from train gets probability 0.

        Args:
          inputs: images, texts or clips of the same kind and shape as train's.
          location: names the inputs in errors, e.g. the split ``"test"``.

        Raises:
          DataError: naming ``location``: no inputs, or inputs of the wrong kind.
        """
        rows = _as_inputs(inputs, self.modality, location)
        probabilities = np.zeros((len(rows), self.num_classes))
        with threadpool_limits(BLAS_THREADS, user_api="blas"):
            probabilities[:, self.estimator.classes_] = self.estimator.predict_proba(rows)
        return probabilities


def fit_baseline(
    train_inputs: Inputs,
    train_labels: np.ndarray,
    *,
    modality: Modality,
    seed: int,
    cv_folds: int = 3,
    num_classes: int | None = None,
    candidates: Sequence[Candidate] | None = None,
    sample_rate: int | None = None,
) -> Baseline:
    """Choose the best candidate by stratified k-fold cross-validation on train; refit it.

    Args:
      train_inputs: the training split: uint8 images (N, H, W[, C]), N texts, or float
        clips (N, samples) (zero-padded to one length: the padding is left out).
      train_labels: int labels (N,) in [0, num_classes).
      modality: ``"image"``, ``"text"`` or ``"audio"``; picks the candidates.
      seed: shuffles the folds; the same seed and data give the same baseline.
      cv_folds: folds of the cross-validation (and of the temperature scaling).
      num_classes: the dataset's classes; None: the largest label plus one.
      candidates: the grid to choose from; None: ``CANDIDATES[modality]``.
      sample_rate: audio only, and needed there: the clips' rate in Hz.

    Returns:
      The refitted winner; ties go to the earlier candidate.

    Raises:
      DataError: naming ``train``: no examples, a single class, a class with fewer
        examples than folds, labels that do not fit the inputs, inputs of the wrong kind.
      ValueError: audio without a sample rate.
    """
    started = time.perf_counter()
    features = _clip_features(sample_rate) if modality == "audio" else None
    inputs = _as_inputs(train_inputs, modality, "train")
    labels = _checked_labels(train_labels, len(inputs), num_classes)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    _check_classes(labels, cv_folds)
    candidates = CANDIDATES[modality] if candidates is None else tuple(candidates)
    folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        if features is not None:
            inputs = features.fit_transform(inputs)
        accuracies = _cross_validate(candidates, inputs, labels, folds)
        best = max(candidates, key=lambda candidate: accuracies[candidate.name])  # first on a tie
        estimator = _refit(best, inputs, labels, folds)
    if features is not None:
        estimator = make_pipeline(features, estimator)
    return Baseline(
        model=best.name,
        hyperparameters=best.hyperparameters,
        cv_accuracy=accuracies[best.name],
        candidate_cv_accuracies=accuracies,
        cv_folds=cv_folds,
        train_examples=len(labels),
        num_classes=num_classes,
        fit_seconds=time.perf_counter() - started,
        modality=modality,
        estimator=estimator,
    )


def _refit(
    best: Candidate, inputs: np.ndarray, labels: np.ndarray, folds: StratifiedKFold
) -> BaseEstimator:
    """``best`` fitted on all of train; its scores, if not probabilities, temperature-scaled."""
    estimator = best.build()
    if best.classifier in SCORE_CLASSIFIERS:
        estimator = CalibratedClassifierCV(
            estimator, method="temperature", cv=folds, ensemble=False
        )
    return estimator.fit(inputs, labels)


def _cross_validate(
    candidates: Sequence[Candidate],
    inputs: np.ndarray,
    labels: np.ndarray,
    folds: StratifiedKFold,
) -> dict[str, float]:
    """Mean held-out accuracy of every candidate over ``folds``.

    Each fold fits each representation once, on its training part only, and every
    candidate of that representation on it: a TF-IDF vocabulary costs more than the
    classifiers on it.
    """
    scores: dict[str, list[float]] = {candidate.name: [] for candidate in candidates}
    for fit_rows, held_out_rows in folds.split(np.zeros(len(labels)), labels):
        for representation in dict.fromkeys(candidate.representation for candidate in candidates):
            features = REPRESENTATIONS[representation]()
            fit_features = features.fit_transform(inputs[fit_rows])
            held_out_features = features.transform(inputs[held_out_rows])
            for candidate in candidates:
                if candidate.representation == representation:
                    classifier = CLASSIFIERS[candidate.classifier](candidate.C)
                    classifier.fit(fit_features, labels[fit_rows])
                    predictions = classifier.predict(held_out_features)
                    scores[candidate.name].append(
                        accuracy_score(labels[held_out_rows], predictions)
                    )
    return {name: float(np.mean(values)) for name, values in scores.items()}


def _as_inputs(inputs: Inputs, modality: Modality, location: str) -> np.ndarray:
    """``inputs`` as an array indexable by rows (texts: an object array), once checked."""
    if modality == "image":
        rows = np.asarray(inputs)
        if rows.dtype != np.uint8 or rows.ndim not in (3, 4):
            raise DataError(
                location,
                f"images must be uint8 arrays of shape (N, H, W) or (N, H, W, C), got "
                f"{rows.dtype} {rows.shape}",
            )
    elif modality == "audio":
        rows = np.asarray(inputs)
        if not np.issubdtype(rows.dtype, np.floating) or rows.ndim != 2:
            raise DataError(
                location,
                f"clips must be float arrays of shape (N, samples), got {rows.dtype} {rows.shape}",
            )
    else:
        rows = np.empty(len(inputs), dtype=object)
        rows[:] = list(inputs)
        not_text = [i for i, text in enumerate(rows) if not isinstance(text, str)]
        if not_text:
            raise DataError(
                f"{location}[{not_text[0]}]",
                f"texts must be strings, got {type(rows[not_text[0]]).__name__}",
            )
    if len(rows) == 0:
        raise DataError(location, "holds no examples (an empty split)")
    return rows


def _checked_labels(labels: np.ndarray, count: int, num_classes: int | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError("train", f"{count} examples but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError("train", f"labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise DataError("train", f"labels must be >= 0, got {labels.min()}")
    if num_classes is not None and labels.max() >= num_classes:
        raise DataError("train", f"label {labels.max()} out of range for {num_classes} classes")
    return labels


def _check_classes(labels: np.ndarray, cv_folds: int) -> None:
    """Two classes at least, each in every fold."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(
            "train",
            f"only one class (label {classes[0]}, {counts[0]} examples) - the baseline needs "
            "at least two",
            "the training split must hold examples of every class it is to predict",
        )
    rarest = int(counts.argmin())
    if counts[rarest] < cv_folds:
        raise DataError(
            "train",
            f"class {classes[rarest]} has {counts[rarest]} example(s), fewer than the "
            f"{cv_folds} cross-validation folds: some folds would lack it",
            "use fewer folds, or add examples of that class",
        )
