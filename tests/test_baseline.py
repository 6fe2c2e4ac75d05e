"""The classical scikit-learn baseline: real fits on real data, its stage, and its reports."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipelines.reports import metrics_section, per_class_rows, summary_line
from pipelines.stages.common import ExperimentPaths
from tests.conftest import TINY_PARAMS, make_project_copy, run
from tlflax.baseline import CANDIDATES, Candidate, fit_baseline
from tlflax.baseline_predictions import read_baseline_predictions
from tlflax.data.errors import DataError
from tlflax.errors import MissingInputError
from tlflax.evaluation import headline_metrics
from tlflax.io import read_arrays, write_arrays, write_json
from tlflax.plots import plot_learning_curves

RAW_MODELDATA = Path(__file__).resolve().parents[1] / "data" / "raw" / "modeldata"
# One cheap candidate, for the tests about inputs rather than about model choice.
QUICK = [Candidate("pixels", "logreg", 1.0)]


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits as the pipeline stores images: uint8 (N, 8, 8).

    500 for training, the other 1297 held out.
    """
    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, data.target, train_size=500, stratify=data.target, random_state=0
    )
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }


# --------------------------------------------------------------------------- the library


def test_image_baseline_chooses_by_cross_validation_and_predicts_well(digits) -> None:
    baseline = fit_baseline(
        digits["train_images"], digits["train_labels"], modality="image", seed=0
    )
    names = [candidate.name for candidate in CANDIDATES["image"]]
    assert list(baseline.candidate_cv_accuracies) == names
    assert baseline.model in names
    assert baseline.cv_accuracy == max(baseline.candidate_cv_accuracies.values())
    assert baseline.hyperparameters["C"] in (0.1, 1.0, 3.0, 10.0)
    assert (baseline.cv_folds, baseline.train_examples, baseline.num_classes) == (3, 500, 10)
    assert 0 < baseline.fit_seconds < 120

    probabilities = baseline.predict_proba(digits["test_images"], location="test")
    assert probabilities.shape == (len(digits["test_labels"]), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    accuracy = (probabilities.argmax(axis=1) == digits["test_labels"]).mean()
    # Chance is 0.1; an RBF-SVM on 50 digits per class reaches about 0.97.
    assert accuracy > 0.9, (baseline.model, accuracy)


def test_the_same_seed_gives_the_same_baseline(digits) -> None:
    def fit(seed: int):
        return fit_baseline(
            digits["train_images"],
            digits["train_labels"],
            modality="image",
            seed=seed,
            candidates=CANDIDATES["image"][3:6],  # the sqrt-l2 RBF-SVMs: quick, and calibrated
        )

    first, again, other_folds = fit(0), fit(0), fit(1)
    assert (first.model, first.candidate_cv_accuracies) == (
        again.model,
        again.candidate_cv_accuracies,
    )
    np.testing.assert_array_equal(
        first.predict_proba(digits["test_images"]), again.predict_proba(digits["test_images"])
    )
    # The seed shuffles the folds: other folds, other held-out scores.
    assert other_folds.candidate_cv_accuracies != first.candidate_cv_accuracies


def test_a_class_missing_from_train_gets_a_column_of_zeros(digits) -> None:
    baseline = fit_baseline(
        digits["train_images"],
        digits["train_labels"],
        modality="image",
        seed=0,
        num_classes=12,
        candidates=QUICK,
    )
    probabilities = baseline.predict_proba(digits["test_images"][:5])
    assert probabilities.shape == (5, 12)
    assert not probabilities[:, 10:].any()


@pytest.mark.skipif(
    not (RAW_MODELDATA / "Rdata.rdb").is_file(), reason=f"raw modeldata not in {RAW_MODELDATA}"
)
def test_text_baseline_on_fine_food_reviews() -> None:
    from tlflax.data.fine_foods import FINE_FOODS_CLASSES, read_fine_foods
    from tlflax.data.subsets import stratified_subset

    reviews = read_fine_foods(RAW_MODELDATA)
    labels = {
        split: frame["label"].map(FINE_FOODS_CLASSES.index).to_numpy(np.int64)
        for split, frame in reviews.items()
    }
    # 800 of the 4000 training reviews keep the test quick (about 3 s of fitting).
    chosen = stratified_subset(labels["train"], fraction=0.2, seed=0)
    baseline = fit_baseline(
        reviews["train"]["review"].to_numpy()[chosen].tolist(),
        labels["train"][chosen],
        modality="text",
        seed=0,
    )
    assert re.fullmatch(r"tfidf_word1-2\+char2-5_logreg\(C=\d+\)", baseline.model)
    assert len(baseline.candidate_cv_accuracies) == len(CANDIDATES["text"])
    probabilities = baseline.predict_proba(reviews["test"]["review"].tolist())
    accuracy = (probabilities.argmax(axis=1) == labels["test"]).mean()
    majority = max(np.bincount(labels["test"])) / len(labels["test"])  # 0.658
    # Measured: 0.782 (the pipeline's 3576 reviews: 0.812).
    assert accuracy > majority + 0.08, (baseline.model, accuracy)


def test_bad_training_splits_name_the_split(digits) -> None:
    images, labels = digits["train_images"], digits["train_labels"]
    one_class = labels == 3
    with pytest.raises(DataError) as error:
        fit_baseline(images[one_class], labels[one_class], modality="image", seed=0)
    assert str(error.value).startswith("train: only one class (label 3, ")
    assert "the baseline needs at least two" in str(error.value)

    with pytest.raises(DataError, match=r"^train: holds no examples"):
        fit_baseline(images[:0], labels[:0], modality="image", seed=0)
    with pytest.raises(DataError, match=r"^train: holds no examples"):
        fit_baseline([], np.zeros(0, np.int64), modality="text", seed=0)

    rare = np.concatenate([np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:2]])
    with pytest.raises(DataError, match=r"^train: class 1 has 2 example\(s\), fewer than the 3"):
        fit_baseline(images[rare], labels[rare], modality="image", seed=0)

    with pytest.raises(DataError, match=r"^train: images must be uint8"):
        fit_baseline(images.astype(np.float32), labels, modality="image", seed=0)
    with pytest.raises(DataError, match=r"^train: 500 examples but labels of shape \(499,\)"):
        fit_baseline(images, labels[:-1], modality="image", seed=0)
    with pytest.raises(DataError, match=r"^train: label 9 out of range for 5 classes"):
        fit_baseline(images, labels, modality="image", seed=0, num_classes=5)
    with pytest.raises(DataError, match=r"^train\[1\]: texts must be strings, got int"):
        fit_baseline(["good", 7, "bad"], np.array([0, 1, 0]), modality="text", seed=0)


def test_predicting_an_empty_split_names_it(digits) -> None:
    baseline = fit_baseline(
        digits["train_images"], digits["train_labels"], modality="image", seed=0, candidates=QUICK
    )
    with pytest.raises(DataError, match=r"^validation: holds no examples"):
        baseline.predict_proba(digits["test_images"][:0], location="validation")


# ------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def prepared_project(tmp_path_factory) -> Path:
    """A tiny copy of the project (6 training images per class) after its prepare stage."""
    project = make_project_copy(tmp_path_factory.mktemp("baseline_project"), TINY_PARAMS)
    result = run([sys.executable, "-m", "pipelines.stages.prepare"], cwd=project, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return project


def test_the_stage_writes_predictions_choice_and_metrics(
    prepared_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(
        [sys.executable, "-m", "pipelines.stages.baseline"], cwd=prepared_project, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("baseline:")]
    assert re.fullmatch(
        r"baseline: \S+ \(CV accuracy 0\.\d{4} on train\), validation accuracy 0\.\d{4}, "
        r"\d+\.\d s",
        line,
    ), line

    folder = prepared_project / "models/vision/baseline"
    # Predictions and JSON only: no fitted model, so nothing pickled.
    assert sorted(path.name for path in folder.iterdir()) == ["model.json", "predictions.npz"]
    predictions = read_arrays(folder / "predictions.npz", required=("validation", "test"))
    assert predictions["validation"].shape == (30, 10)
    assert predictions["test"].shape == (10000, 10)
    np.testing.assert_allclose(predictions["test"].sum(axis=1), 1.0, atol=1e-9)

    choice = json.loads((folder / "model.json").read_text())
    assert choice["model"] in choice["candidates_cv_accuracy"]
    assert choice["cv_accuracy"] == max(choice["candidates_cv_accuracy"].values())
    assert (choice["cv_folds"], choice["seed"], choice["train_examples"]) == (3, 0, 60)
    assert set(choice["hyperparameters"]) == {"representation", "classifier", "C", "probabilities"}

    metrics = json.loads((prepared_project / "metrics/vision/baseline.json").read_text())
    assert set(metrics) == {"model", "cv_accuracy", "validation_accuracy", "fit_seconds"}
    assert metrics["model"] == choice["model"]
    # 60 training images of 10 classes: well above chance (0.1), far from the 1000-image 0.83.
    assert 0.3 < metrics["validation_accuracy"] <= 1.0

    # What evaluate reads back: the model's name and both splits' probabilities.
    monkeypatch.chdir(prepared_project)
    model, probabilities = read_baseline_predictions(
        ExperimentPaths("vision").baseline, 10, {"validation": 30, "test": 10000}
    )
    assert model == choice["model"]
    np.testing.assert_array_equal(probabilities["test"], predictions["test"])


def test_the_stage_fits_a_stratified_subset_of_a_large_training_split(
    prepared_project: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(prepared_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["baseline"]["max_train_examples"] = 30
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    result = run([sys.executable, "-m", "pipelines.stages.baseline"], cwd=project, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline: fitted on 30 of 60 training examples" in result.stdout
    choice = json.loads((project / "models/vision/baseline/model.json").read_text())
    assert choice["train_examples"] == 30
    predictions = read_arrays(project / "models/vision/baseline/predictions.npz")
    assert predictions["test"].shape == (10000, 10)  # every split is still predicted


def test_the_stage_refuses_a_single_class_train_split_in_one_line(
    prepared_project: Path, tmp_path: Path
) -> None:
    from tlflax.data.tfds_store import read_class_names, read_image_split, write_image_dataset

    project = Path(
        shutil.copytree(
            prepared_project, tmp_path / "project", ignore=shutil.ignore_patterns(".git", ".dvc")
        )
    )
    # Whatever an earlier test's baseline run wrote: this run must write nothing.
    shutil.rmtree(project / "models/vision/baseline", ignore_errors=True)
    (project / "metrics/vision/baseline.json").unlink(missing_ok=True)
    data_dir = project / "data/vision/tfds"
    splits = {
        split: read_image_split(data_dir, "fashion_mnist", split)
        for split in ("train", "validation", "test")
    }
    images, labels = splits["train"]
    splits["train"] = (images, np.zeros_like(labels))
    write_image_dataset(
        data_dir, "fashion_mnist", splits, read_class_names(data_dir, "fashion_mnist")
    )

    result = run([sys.executable, "-m", "pipelines.stages.baseline"], cwd=project, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (message,) = result.stderr.strip().splitlines()
    assert message.startswith(
        "baseline: error: train: only one class (label 0, 60 examples) - the baseline needs "
        "at least two"
    ), message
    assert not (project / "models/vision/baseline").exists()
    assert not (project / "metrics/vision/baseline.json").exists()


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_without_baseline_predictions_says_which_stage_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingInputError) as error:
        read_baseline_predictions(ExperimentPaths("vision").baseline, 10, {"test": 4})
    assert isinstance(error.value, FileNotFoundError)
    assert str(error.value).startswith("models/vision/baseline/predictions.npz: not found; ")
    assert "run the baseline stage first" in str(error.value)


def test_evaluate_refuses_baseline_predictions_for_other_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = ExperimentPaths("vision").baseline
    write_arrays(folder / "predictions.npz", validation=np.full((3, 2), 0.5), test=np.ones((4, 2)))
    write_json(folder / "model.json", {"model": "pixels_rbf_svm(C=3)"})
    model, probabilities = read_baseline_predictions(
        ExperimentPaths("vision").baseline, 2, {"validation": 3, "test": 4}
    )
    assert model == "pixels_rbf_svm(C=3)"
    assert probabilities["test"].shape == (4, 2)
    with pytest.raises(
        DataError,
        match="'test' probabilities have shape \\(4, 2\\), but the test "
        "split holds 5 examples of 2 classes \\(run the baseline stage again\\)",
    ):
        read_baseline_predictions(ExperimentPaths("vision").baseline, 2, {"test": 5})


def test_every_model_is_scored_against_the_baseline() -> None:
    per_class = {"a": {"precision": 0.9, "recall": 0.7, "f1": 0.79, "support": 5}}
    minority = {"balanced_accuracy": 0.7, "min_recall": 0.7, "per_class": per_class}
    reports = {
        "baseline": {"accuracy": 0.812, "macro_f1": 0.81, "ece": 0.05, **minority},
        "head_only": {"accuracy": 0.7952, "macro_f1": 0.79, "ece": 0.03, **minority},
        "finetune": {"accuracy": 0.83, "macro_f1": 0.82, "ece": 0.04, **minority},
    }
    metrics = headline_metrics(reports, "pixels_rbf_svm(C=10)")
    assert metrics["baseline"] == {
        "accuracy": 0.812,
        "macro_f1": 0.81,
        "ece": 0.05,
        "balanced_accuracy": 0.7,
        "min_recall": 0.7,
        "per_class_recall": {"a": 0.7},
        "model": "pixels_rbf_svm(C=10)",
    }
    assert metrics["head_only"]["gain_over_baseline"] == -0.0168
    assert metrics["finetune"]["gain_over_baseline"] == 0.018
    assert "per_class" not in metrics["finetune"]


def test_learning_curves_draw_the_baseline_as_a_reference_line(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    plot_learning_curves(
        {"fine-tuned": [0.6, 0.7, 0.75]},
        path,
        reference_lines={"baseline: pixels_rbf_svm(C=10)": 0.72},
    )
    assert path.read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------ reports

METRICS = {
    "baseline": {"accuracy": 0.812, "macro_f1": 0.8101, "model": "pixels_rbf_svm(C=10)"},
    "head_only": {"accuracy": 0.7952, "macro_f1": 0.79, "gain_over_baseline": -0.0168},
    "finetune": {"accuracy": 0.83, "macro_f1": 0.8201, "gain_over_baseline": 0.018},
    "n_train": 1000,
    "n_test": 10000,
}


def test_summary_line_puts_the_baseline_first_and_each_gain_over_it() -> None:
    assert summary_line(METRICS) == (
        "test set: 10000 examples, trained on 1000; "
        "baseline (pixels_rbf_svm(C=10)) accuracy 0.8120 (macro-F1 0.8101); "
        "head-only accuracy 0.7952 (macro-F1 0.7900, -1.68 pts vs baseline); "
        "fine-tuned accuracy 0.8300 (macro-F1 0.8201, +1.80 pts vs baseline)"
    )
    # Metrics written before the baseline existed read as they did.
    older = {key: METRICS[key] for key in ("n_train", "n_test")}
    older["head_only"] = {"accuracy": 0.6, "macro_f1": 0.55}
    assert summary_line(older) == (
        "test set: 10000 examples, trained on 1000; head-only accuracy 0.6000 (macro-F1 0.5500)"
    )


def test_report_table_has_the_baseline_row_and_a_gain_column(tmp_path: Path) -> None:
    lines = metrics_section(METRICS)
    assert lines[2:7] == [
        "| model | accuracy | macro-F1 | vs baseline (pts) |",
        "|---|---|---|---|",
        "| baseline (pixels_rbf_svm(C=10)) | 0.8120 | 0.8101 | reference |",
        "| head-only | 0.7952 | 0.7900 | -1.68 |",
        "| fine-tuned | 0.8300 | 0.8201 | +1.80 |",
    ]
    report = tmp_path / "plots/vision/classification_report.json"
    scores = {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 10}
    write_json(report, {"baseline": {"per_class": {"cat": scores}}})
    rows = per_class_rows(tmp_path, "vision", warn=pytest.fail)
    assert rows == [{"model": "baseline", "class": "cat", **scores}]
