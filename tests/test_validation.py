"""Tests of tlflax.validation: real Great Expectations runs over small real manifests.

The manifests come from scikit-learn's 8x8 digits (a few hundred rows), so every GX run
takes about a second after the one-off import. One slow test runs the validate stage itself,
in two copies of a tiny project, to check that its metrics file does not depend on the folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from tests.conftest import RAW_FASHION_MNIST, TINY_PARAMS, make_project_copy, run
from tests.small_project import copy_project
from tlflax.data.manifest import image_manifest
from tlflax.data.subsets import stratified_subset
from tlflax.validation import ValidationSummary, ValidationThresholds, validate_manifest

CLASSES = [f"digit {digit}" for digit in range(10)]
# Thresholds for splits of 100-200 records: feature KL over 10 bins has sampling noise
# of about 9 / (2 N) ~ 0.045 at N = 100, so the split KL limit sits above it.
THRESHOLDS = ValidationThresholds(
    expected_classes=CLASSES,
    max_label_kl_divergence=0.05,
    max_class_ratio=1.5,
    min_examples_per_class=5,
    max_split_kl_divergence=0.25,
    max_duplicate_fraction=0.0,
    max_mean_intensity_shift=0.15,
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.images * 15).astype(np.uint8)[..., np.newaxis], data.target.astype(np.int64)


def _manifest(
    images: np.ndarray, labels: np.ndarray, per_split: dict[str, np.ndarray]
) -> pd.DataFrame:
    return image_manifest(
        {split: (images[indices], labels[indices]) for split, indices in per_split.items()},
        CLASSES,
    )


@pytest.fixture(scope="module")
def split_indices(digits) -> dict[str, np.ndarray]:
    """Disjoint, balanced index sets: 20 / 10 / 10 digits per class."""
    _, labels = digits
    train = stratified_subset(labels, per_class=20, seed=0)
    validation = stratified_subset(labels, per_class=10, seed=1, exclude=train)
    test = stratified_subset(
        labels, per_class=10, seed=2, exclude=np.concatenate([train, validation])
    )
    return {"train": train, "validation": validation, "test": test}


@pytest.fixture(scope="module")
def good_manifest(digits, split_indices) -> pd.DataFrame:
    return _manifest(*digits, split_indices)


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    # One Data Docs site shared by the module's runs, as a pipeline would keep it.
    return tmp_path_factory.mktemp("validation") / "data_docs"


def _failed(summary: ValidationSummary) -> dict[str, str]:
    return {check.name: check.severity for check in summary.failures}


def _check(summary: ValidationSummary, name: str):
    (check,) = [check for check in summary.checks if check.name == name]
    return check


def test_good_manifest_passes_and_writes_data_docs(good_manifest, docs_dir: Path) -> None:
    summary = validate_manifest(good_manifest, THRESHOLDS, docs_dir=docs_dir)
    assert summary.success, summary.format_report()
    assert summary.failures == []
    assert summary.data_docs_index == docs_dir / "index.html"
    assert summary.data_docs_index.is_file()
    assert "PASSED" in summary.format_report()
    payload = json.loads(json.dumps(summary.to_dict()))
    assert payload["success"] is True and payload["num_checks"] == len(summary.checks)
    names = {check.name for check in summary.checks}
    assert {
        "schema.columns",
        "records.label_known",
        "balance.test.class_ratio",
        "duplicates.train",
        "representativeness.test.label_kl",
        "representativeness.test.mean_intensity_kl",
        "representativeness.validation.std_intensity_mean_shift",
        "leakage.test_vs_train",
    } <= names
    # GX ran the checks it has expectations for; the rest are computed.
    assert _check(summary, "balance.train.label_kl").source.startswith("expect_column_kl")
    assert _check(summary, "leakage.test_vs_train").source == "computed"


def test_heavy_imbalance_is_critical(digits, split_indices, docs_dir: Path) -> None:
    images, labels = digits
    zeros = np.flatnonzero(labels == 0)
    extra = np.setdiff1d(zeros, np.concatenate(list(split_indices.values())))[:180]
    train = np.union1d(split_indices["train"], extra)  # class 0: 20 -> 200 examples
    manifest = _manifest(images, labels, {**split_indices, "train": train})
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=docs_dir)
    assert not summary.success
    failed = _failed(summary)
    assert failed["balance.train.class_ratio"] == "critical"
    assert failed["balance.train.label_kl"] == "critical"
    assert _check(summary, "balance.train.class_ratio").observed["largest"] == "digit 0"
    assert "balance.train.class_ratio" in summary.format_report()
    # Without a remedy, the failure says which params key turns one on.
    assert "class_balance.remedy" in _check(summary, "balance.train.class_ratio").note
    assert "set class_balance.remedy to logit_adjustment" in summary.format_report()


def test_imbalance_with_a_remedy_in_force_only_warns(digits, split_indices, docs_dir: Path) -> None:
    images, labels = digits
    zeros = np.flatnonzero(labels == 0)
    extra = np.setdiff1d(zeros, np.concatenate(list(split_indices.values())))[:180]
    train = np.union1d(split_indices["train"], extra)
    manifest = _manifest(images, labels, {**split_indices, "train": train})
    remedy = "logit_adjustment (auto: largest/smallest 10.00 > validate.max_class_ratio 1.5; tau 1)"
    thresholds = dataclasses.replace(THRESHOLDS, class_balance_remedy=remedy)
    summary = validate_manifest(manifest, thresholds, docs_dir=docs_dir)
    assert summary.success, summary.format_report()
    failed = _failed(summary)
    assert failed["balance.train.class_ratio"] == "warning"
    assert failed["balance.train.label_kl"] == "warning"
    assert _check(summary, "balance.train.class_ratio").note.endswith(remedy)
    assert f"remedy in force: class balance {remedy}" in summary.format_report()
    # Checks that passed carry no note, so a balanced run's validate.json is as before.
    assert "note" not in summary.to_dict()["checks"][0]


def test_single_class_dataset_names_missing_classes(digits, docs_dir: Path) -> None:
    images, labels = digits
    threes = np.flatnonzero(labels == 3)
    manifest = _manifest(images, labels, {"train": threes[:100], "test": threes[100:150]})
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=docs_dir)
    assert not summary.success
    assert {"balance.train.min_per_class", "balance.train.class_ratio"} <= set(_failed(summary))
    below = _check(summary, "balance.train.min_per_class").observed["classes_below"]
    assert set(below) == set(CLASSES) - {"digit 3"}
    assert _check(summary, "balance.test.class_ratio").observed["ratio"] == "inf"


def test_unknown_label_names_the_record(good_manifest, docs_dir: Path) -> None:
    manifest = good_manifest.copy()
    row = manifest.index[(manifest["split"] == "test") & (manifest["index"] == 7)][0]
    manifest.loc[row, ["label", "label_name"]] = [12, "digit 12"]
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=docs_dir)
    assert not summary.success
    for name in ("records.label_known", "records.label_in_range", "records.label_matches_name"):
        check = _check(summary, name)
        assert not check.passed
        assert [(r["split"], r["index"]) for r in check.failing_records] == [("test", 7)]
    assert "test[7]" in summary.format_report()


def test_missing_column_is_named(good_manifest, docs_dir: Path) -> None:
    summary = validate_manifest(
        good_manifest.drop(columns=["content_hash"]), THRESHOLDS, docs_dir=docs_dir
    )
    assert not summary.success
    schema = _check(summary, "schema.columns")
    assert schema.severity == "critical" and not schema.passed
    assert schema.observed == {"missing_columns": ["content_hash"]}
    assert not any(name.startswith(("duplicates", "leakage")) for name in _failed(summary))


def test_empty_split_is_critical(
    good_manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = good_manifest[good_manifest["split"] != "test"]
    monkeypatch.chdir(tmp_path)  # a relative docs_dir, as a stage run from the repo gives
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=Path("reports/data_docs"))
    # Still relative, so the stage's metrics file does not depend on the project's folder.
    assert summary.data_docs_index == Path("reports/data_docs/index.html")
    assert (tmp_path / summary.data_docs_index).is_file()
    assert not summary.success
    assert _failed(summary) == {"splits.required_nonempty": "critical"}
    assert _check(summary, "splits.required_nonempty").observed["empty_splits"] == ["test"]


def test_duplicates_and_leakage_name_the_records(good_manifest, docs_dir: Path) -> None:
    manifest = good_manifest.copy()
    train_rows = manifest.index[manifest["split"] == "train"]
    test_rows = manifest.index[manifest["split"] == "test"]
    # test[0..2] are copies of train[3..5]; train[1] is a copy of train[0].
    manifest.loc[test_rows[:3], "content_hash"] = manifest.loc[
        train_rows[3:6], "content_hash"
    ].values
    manifest.loc[train_rows[1], "content_hash"] = manifest.loc[train_rows[0], "content_hash"]
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=docs_dir)
    assert not summary.success
    leakage = _check(summary, "leakage.test_vs_train")
    assert not leakage.passed and leakage.observed["leaked_records"] == 3
    assert [record["same_as"] for record in leakage.failing_records] == [
        "train[3]",
        "train[4]",
        "train[5]",
    ]
    assert "test[0] (same as train[3])" in summary.format_report()
    duplicates = _check(summary, "duplicates.train")
    assert {(r["split"], r["index"]) for r in duplicates.failing_records} == {
        ("train", 0),
        ("train", 1),
    }
    assert _check(summary, "leakage.validation_vs_train").passed


def test_shifted_test_label_distribution(digits, split_indices, docs_dir: Path) -> None:
    images, labels = digits
    used = np.concatenate(list(split_indices.values()))
    # Test keeps 10 of each digit except 0-2, which get 80 each.
    extra = np.concatenate(
        [np.setdiff1d(np.flatnonzero(labels == digit), used)[:70] for digit in (0, 1, 2)]
    )
    test = np.union1d(split_indices["test"], extra)
    manifest = _manifest(images, labels, {**split_indices, "test": test})
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=docs_dir)
    assert not summary.success
    representativeness = _check(summary, "representativeness.test.label_kl")
    assert not representativeness.passed
    assert representativeness.observed > THRESHOLDS.max_split_kl_divergence
    assert _check(summary, "representativeness.validation.label_kl").passed


def test_constant_images_only_warn(digits, split_indices, docs_dir: Path) -> None:
    images, labels = digits
    images = images.copy()
    images[split_indices["train"][:2]] = [[[[0]]], [[[9]]]]  # two blank, distinct images
    manifest = _manifest(images, labels, split_indices)
    summary = validate_manifest(manifest, THRESHOLDS, docs_dir=docs_dir)
    assert summary.success, summary.format_report()
    assert _failed(summary) == {"records.not_constant": "warning"}
    check = _check(summary, "records.not_constant")
    assert [(r["split"], r["index"]) for r in check.failing_records] == [("train", 0), ("train", 1)]
    assert "WARNING" in summary.format_report() and "PASSED" in summary.format_report()


@pytest.mark.slow
def test_the_validate_stage_writes_the_same_metrics_in_any_folder(tmp_path: Path) -> None:
    """``metrics/<experiment>/validate.json`` holds no path of the project's own folder.

    It is a DVC metric that later stages depend on: a path that changes with the folder
    would make every copy of the project (a teammate's clone, a CI checkout) run them again.
    """
    if not RAW_FASHION_MNIST.exists():
        pytest.fail(f"{RAW_FASHION_MNIST} is missing: run `make assets` (scripts/fetch_assets.sh)")
    first = make_project_copy(tmp_path / "first", TINY_PARAMS)
    prepared = run([sys.executable, "-m", "pipelines.stages.prepare"], cwd=first, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    # The same prepared data one level deeper, under another name.
    second = copy_project(first, tmp_path / "elsewhere" / "second", with_history=False)

    metrics = Path("metrics/vision/validate.json")
    for project in (first, second):
        result = run([sys.executable, "-m", "pipelines.stages.validate"], cwd=project, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        content = (project / metrics).read_text()
        assert str(project) not in content and str(tmp_path) not in content
    assert (first / metrics).read_bytes() == (second / metrics).read_bytes()
    summary = json.loads((first / metrics).read_text())
    assert summary["data_docs_index"] == "reports/vision/data_docs/index.html"
    assert (second / summary["data_docs_index"]).is_file()
