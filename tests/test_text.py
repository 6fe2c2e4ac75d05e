"""The text path on tiny real data: TFDS text store, text manifest and validation, the text
classifier, feature extraction, the prefix cache, and the whole text pipeline under DVC."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from sklearn.datasets import load_digits

from tests.conftest import ROOT, _merge, make_project_copy, run
from tlflax.checkpoint import TrainingCheckpoints
from tlflax.config import AugmentParams, FinetuneParams, TransferRule
from tlflax.data.errors import DataError
from tlflax.data.fine_foods import FINE_FOODS_CLASSES, read_fine_foods
from tlflax.data.manifest import (
    TEXT_MANIFEST_SCHEMA,
    duplicate_records,
    text_content_hash,
    text_manifest,
)
from tlflax.data.tfds_store import read_class_names
from tlflax.data.tfds_text import read_text_split, write_text_dataset
from tlflax.finetuner import Finetuner, run_finetuning
from tlflax.models.heads import Head, ImageClassifier, TextClassifier
from tlflax.models.minilm import MiniLM
from tlflax.models.small_cnn import SmallCNN
from tlflax.prefix_cache import (
    PREFIX_KEY,
    cache_prefix,
    frozen_prefix_groups,
    image_prefix_cut,
    text_prefix_cut,
)
from tlflax.text import _features_step, count_tokens, extract_features, text_forward, tokenize_texts
from tlflax.validation import ValidationThresholds, validate_manifest
from tlflax.vision import image_forward

RAW_MODELDATA = ROOT / "data" / "raw" / "modeldata"
CLASSES = list(FINE_FOODS_CLASSES)
REVIEWS = [
    "Great coffee, smooth and rich. Will buy again!",
    "",
    "Les crêpes étaient délicieuses <br /> très bon goût.",
    "Stale chips, arrived crushed. 日本語 too.",
]


@pytest.fixture(scope="module")
def fine_foods() -> dict:
    if not RAW_MODELDATA.exists():
        pytest.fail(f"{RAW_MODELDATA} is missing: run `make assets` (scripts/fetch_assets.sh)")
    return read_fine_foods(RAW_MODELDATA)


# ---------------------------------------------------------------- TFDS text store


def test_text_dataset_round_trip_without_tensorflow(tmp_path: Path) -> None:
    splits = {"train": (REVIEWS, np.array([0, 1, 0, 1])), "test": (REVIEWS[:1], np.array([1]))}
    write_text_dataset(tmp_path, "reviews", splits, CLASSES, "four reviews")
    for split, (texts, labels) in splits.items():
        read_texts, read_labels = read_text_split(tmp_path, "reviews", split)
        assert read_texts == list(texts)
        np.testing.assert_array_equal(read_labels, labels)
    assert read_class_names(tmp_path, "reviews") == CLASSES
    assert "tensorflow" not in sys.modules


def test_text_dataset_refuses_bad_records(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\[1\]: text is not valid Unicode"):
        write_text_dataset(
            tmp_path, "bad", {"train": (["ok", "\udcff"], np.array([0, 1]))}, CLASSES
        )
    with pytest.raises(DataError, match="split 'train'.*labels span"):
        write_text_dataset(tmp_path, "bad", {"train": (["a", "b"], np.array([0, 2]))}, CLASSES)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- manifest


def test_text_manifest_describes_every_text() -> None:
    texts = [*REVIEWS, b"caf\xe9 au lait", "   \n"]
    manifest = text_manifest(
        {"train": (texts, np.array([0, 1, 0, 1, 0, 5]))}, CLASSES, count_tokens=count_tokens
    )
    assert list(manifest.columns) == list(TEXT_MANIFEST_SCHEMA.columns)
    assert manifest["text_length"].tolist() == [len(text) for text in REVIEWS] + [12, 4]
    assert manifest["is_empty"].tolist() == [False, True, False, False, False, True]
    assert manifest["valid_utf8"].tolist() == [True, True, True, True, False, True]
    assert manifest["label_name"].isna().tolist() == [False] * 5 + [True]
    assert manifest["content_hash"][0] == text_content_hash(REVIEWS[0].encode("utf-8"))
    # [CLS] + WordPiece tokens + [SEP]; an empty text still has the two special tokens.
    assert manifest["token_count"][1] == 2
    assert manifest["token_count"][0] > 10


def test_duplicate_records_keeps_first_copy_and_drops_reference_matches() -> None:
    drop = duplicate_records(["a", "b", "a", "c", "b", "d"], reference_hashes=["d"])
    assert drop.tolist() == [False, False, True, False, True, True]


# ---------------------------------------------------------------- validation


def _reviews_manifest(fine_foods, overrides=None):
    """60 train / 20 validation / 40 test real reviews, with optional replaced records."""
    frames = {"train": fine_foods["train"][:60], "validation": fine_foods["train"][60:80]}
    frames["test"] = fine_foods["test"][:40]
    splits = {}
    for split, frame in frames.items():
        texts = list(frame["review"])
        labels = np.array(frame["label"].map(CLASSES.index))
        for (where, index), (text, label) in (overrides or {}).items():
            if where == split:
                texts[index], labels[index] = text, label
        splits[split] = (texts, labels)
    return text_manifest(splits, CLASSES, count_tokens=count_tokens)


TEXT_THRESHOLDS = ValidationThresholds(
    expected_classes=CLASSES,
    expected_class_weights=[0.65, 0.35],
    max_label_kl_divergence=0.1,
    max_class_ratio=3.0,
    min_examples_per_class=5,
    max_split_kl_divergence=0.5,
    max_duplicate_fraction=0.0,
    max_mean_intensity_shift=None,
    schema=TEXT_MANIFEST_SCHEMA,
)


def test_real_reviews_pass_text_validation(fine_foods, tmp_path: Path) -> None:
    summary = validate_manifest(
        _reviews_manifest(fine_foods), TEXT_THRESHOLDS, docs_dir=tmp_path / "docs"
    )
    assert summary.success, summary.format_report()
    names = {check.name for check in summary.checks}
    assert {"records.is_empty", "records.valid_utf8", "leakage.test_vs_train"} <= names
    assert "representativeness.test.text_length_kl" in names


def test_bad_texts_fail_validation_naming_each_record(fine_foods, tmp_path: Path) -> None:
    leaked = fine_foods["train"]["review"][7]
    manifest = _reviews_manifest(
        fine_foods,
        {
            ("train", 3): ("", 0),
            ("train", 5): (b"bad \xff\xfe bytes", 1),
            ("test", 2): (leaked, 0),
        },
    )
    row = manifest.index[(manifest["split"] == "test") & (manifest["index"] == 4)][0]
    manifest.loc[row, ["label", "label_name"]] = [2, "meh"]
    summary = validate_manifest(manifest, TEXT_THRESHOLDS, docs_dir=tmp_path / "docs")
    assert not summary.success
    failed = {check.name: check for check in summary.failures}
    expected = {
        "records.is_empty": [("train", 3)],
        "records.valid_utf8": [("train", 5)],
        "records.label_known": [("test", 4)],
        "leakage.test_vs_train": [("test", 2)],
    }
    for name, records in expected.items():
        assert failed[name].severity == "critical"
        assert [(r["split"], r["index"]) for r in failed[name].failing_records] == records
    report = summary.format_report()
    assert "test[2] (same as train[7])" in report
    for name in expected:
        assert name in report


# ---------------------------------------------------------------- model and prefix cache


def _tiny_minilm(seed: int = 0, dropout_rate: float = 0.1) -> MiniLM:
    return MiniLM(
        num_layers=2,
        hidden=16,
        heads=2,
        intermediate=32,
        vocab_size=30522,
        max_positions=64,
        dropout_rate=dropout_rate,
        rngs=nnx.Rngs(seed),
    )


def _tiny_text_classifier(dropout_rate: float = 0.1) -> TextClassifier:
    head = Head(16, 2, kind="mlp", hidden_dim=8, dropout_rate=dropout_rate, rngs=nnx.Rngs(1))
    # A random (not zero) output kernel, so the logits depend on the input.
    head.output.kernel[...] = jax.random.normal(jax.random.key(2), head.output.kernel.shape)
    return TextClassifier(_tiny_minilm(dropout_rate=dropout_rate), head)


@pytest.fixture(scope="module")
def review_tokens(fine_foods) -> dict[str, np.ndarray]:
    frame = fine_foods["train"][:70]
    tokens = tokenize_texts(list(frame["review"]), max_length=24)
    return {**tokens, "label": frame["label"].map(CLASSES.index).to_numpy()}


def test_tokenize_fixed_length(review_tokens) -> None:
    assert review_tokens["input_ids"].shape == (70, 24)
    assert review_tokens["input_ids"].dtype == np.int32
    assert review_tokens["attention_mask"][:, 0].all()  # [CLS] always there


def test_extract_features_compiles_once_across_splits(review_tokens) -> None:
    backbone = _tiny_minilm()
    before = _features_step._cache_size()
    first = extract_features(backbone, review_tokens, batch_size=32)
    second = extract_features(
        backbone, {key: value[:5] for key, value in review_tokens.items()}, batch_size=32
    )
    assert first.shape == (70, 16) and second.shape == (5, 16)
    assert _features_step._cache_size() == before + 1
    direct = backbone.features(review_tokens["input_ids"], review_tokens["attention_mask"])
    np.testing.assert_allclose(first, np.asarray(direct), atol=1e-5)
    np.testing.assert_allclose(second, first[:5], atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_text_prefix_cut_gives_the_full_models_logits(review_tokens, groups: int) -> None:
    model = _tiny_text_classifier()
    cut = text_prefix_cut(groups)
    cached = cache_prefix(model, cut, review_tokens, batch_size=32)
    assert "input_ids" not in cached and cached[PREFIX_KEY].shape == (70, 24, 16)
    full = text_forward()(model, review_tokens, False, None)
    from_cache = cut.forward(model, cached, False, None)
    np.testing.assert_allclose(np.asarray(from_cache), np.asarray(full), atol=1e-5)


def test_image_prefix_cut_gives_the_full_models_logits() -> None:
    digits = load_digits()
    images = (digits.images[:40] * 15).astype(np.uint8)[..., None]
    rngs = nnx.Rngs(0)
    model = ImageClassifier(SmallCNN(widths=(8, 16), rngs=rngs), Head(16, 10, rngs=rngs))
    model.head.output.kernel[...] = 0.1
    arrays = {"image": images, "label": digits.target[:40]}
    cut = image_prefix_cut(16, 1)
    cached = cache_prefix(model, cut, arrays, batch_size=16)
    no_augmentation = AugmentParams(random_crop=False, flip=False)
    full = image_forward(16, no_augmentation)(model, arrays, False, None)
    np.testing.assert_allclose(
        np.asarray(cut.forward(model, cached, False, None)), np.asarray(full), atol=1e-5
    )


def test_frozen_prefix_groups_follow_the_rules() -> None:
    model = _tiny_text_classifier()

    def groups(*rules: TransferRule) -> int:
        return frozen_prefix_groups(model, [*rules, TransferRule(pattern=".*")])

    assert groups() == 0
    assert groups(TransferRule(pattern="^backbone/embeddings/", freeze=True)) == 1
    assert groups(TransferRule(pattern="^backbone/(embeddings|layers/0)/", freeze=True)) == 2
    # A frozen layer above a trained one is not part of the prefix.
    assert groups(TransferRule(pattern="^backbone/layers/0/", freeze=True)) == 0
    assert groups(TransferRule(pattern="^backbone/", lr_multiplier=0.0)) == 3


# Freeze the embeddings and the first of the tiny model's two layers: a 2-group prefix.
FREEZE_BOTTOM = [
    TransferRule(pattern="^backbone/(embeddings|layers/0)/", freeze=True),
    TransferRule(pattern=".*"),
]


def _finetune_from(forward, train, validation, tmp_path: Path):
    model = _tiny_text_classifier(dropout_rate=0.0)
    cfg = FinetuneParams(learning_rate=1e-2, batch_size=16, epochs=2, rules=FREEZE_BOTTOM)
    finetuner = Finetuner(
        model,
        forward,
        cfg,
        num_train_examples=len(train["label"]),
        group_patterns=model.backbone.group_patterns(),
    )
    checkpoints = TrainingCheckpoints(tmp_path, keep_best=1)
    state, history = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=32)
    checkpoints.close()
    assert finetuner.train_step._cache_size() == 1
    return nnx.state(finetuner.model(state), nnx.Param), history


def test_training_from_the_cache_matches_training_the_whole_model(review_tokens, tmp_path):
    """Without dropout the frozen prefix is deterministic: the cache changes cost, not results."""
    train = {key: value[:50] for key, value in review_tokens.items()}
    validation = {key: value[50:] for key, value in review_tokens.items()}
    full_params, full_history = _finetune_from(text_forward(), train, validation, tmp_path / "a")
    model = _tiny_text_classifier(dropout_rate=0.0)
    cut = text_prefix_cut(frozen_prefix_groups(model, FREEZE_BOTTOM))
    assert cut.groups == 2
    cached = [cache_prefix(model, cut, split, batch_size=32) for split in (train, validation)]
    cached_params, cached_history = _finetune_from(cut.forward, *cached, tmp_path / "b")
    for full, from_cache in zip(
        jax.tree_util.tree_leaves(full_params),
        jax.tree_util.tree_leaves(cached_params),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(full), np.asarray(from_cache), atol=1e-4)
    assert cached_history.epochs[-1]["train_loss"] == pytest.approx(
        full_history.epochs[-1]["train_loss"], rel=1e-4
    )


# ---------------------------------------------------------------- the pipeline under DVC

# Small enough for the whole text pipeline in about a minute and a half on 2 cores.
TINY_TEXT_PARAMS = {
    "prepare": {
        "train_per_class": 20,
        "train_fraction": None,
        "validation_per_class": 10,
        "validation_fraction": None,
    },
    "validate": {
        # 20 + 20 balanced train reviews against a 66/34 test split: loose on purpose.
        "expected_class_weights": None,
        "max_label_kl_divergence": 0.1,
        "min_examples_per_class": 5,
        "max_split_kl_divergence": 0.5,
        "max_feature_mean_shift": 0.5,
    },
    # The final features and the bottom 5 groups frozen: the run below must take the
    # frozen-prefix cache path (the shipped job fine-tunes everything, so has no prefix).
    "extract": {"max_length": 32, "batch_size": 128, "taps": "last"},
    "train_head": {"max_epochs": 5, "patience": 5},
    "finetune": {
        "epochs": 1,
        "batch_size": 16,
        "strategy": "auto",
        "cache_frozen_prefix": True,
        "rules": [
            {"pattern": "^head/"},
            {"pattern": "^backbone/(embeddings|layers/[0-3])/", "freeze": True},
            {"pattern": "^backbone/"},
        ],
    },
    "evaluate": {"batch_size": 250},
}
TEXT_PARAMS = "experiments/text/params.yaml"


@pytest.fixture(scope="module")
def tiny_text_project(tmp_path_factory, fine_foods) -> Path:
    project = make_project_copy(tmp_path_factory.mktemp("text_project"), {})
    shutil.copytree(RAW_MODELDATA, project / "data" / "raw" / "modeldata")
    params = yaml.safe_load((ROOT / TEXT_PARAMS).read_text())
    (project / TEXT_PARAMS).write_text(
        yaml.safe_dump(_merge(params, TINY_TEXT_PARAMS), sort_keys=False)
    )
    return project


@pytest.mark.slow
def test_text_pipeline_runs_under_dvc_then_predicts(tiny_text_project: Path) -> None:
    project = tiny_text_project
    repro = run(
        [sys.executable, "-m", "dvc", "repro", "experiments/text/dvc.yaml"], project, timeout=900
    )
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert "cached the outputs of the 5 frozen bottom layer groups" in repro.stdout
    metrics = json.loads((project / "metrics/text/evaluate.json").read_text())
    assert metrics["n_train"] == 40 and metrics["n_test"] == 1000
    for phase in ("head_only", "finetune"):
        assert 0.0 <= metrics[phase]["macro_f1"] <= 1.0
        # 40 reviews through a pretrained sentence encoder beat a coin flip.
        assert metrics[phase]["accuracy"] > 0.55, metrics
    validation = json.loads((project / "metrics/text/validate.json").read_text())
    assert validation["success"] and validation["num_critical_failures"] == 0
    # The vision pipeline at the root is untouched by the text run.
    assert not (project / "metrics/vision").exists()

    predict = run(
        [
            sys.executable,
            "-m",
            "pipelines.predict",
            "--params",
            TEXT_PARAMS,
            "Delicious, fresh and fast shipping. Highly recommended!",
        ],
        project,
        timeout=300,
    )
    assert predict.returncode == 0, predict.stderr
    label, probability, echoed = predict.stdout.strip().split("\t")
    assert label in CLASSES and 0.5 <= float(probability) <= 1.0
    assert echoed.startswith("Delicious")

    again = run(
        [sys.executable, "-m", "dvc", "repro", "experiments/text/dvc.yaml"], project, timeout=300
    )
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
