"""SetFit's contrastive stage (tlflax.contrastive) on real reviews and the real MiniLM weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import ROOT
from tlflax.config import ContrastiveParams, ParamsError, TrainHeadParams, parse_params
from tlflax.contrastive import contrastive_pairs, contrastive_start
from tlflax.data.fine_foods import FINE_FOODS_CLASSES, read_fine_foods
from tlflax.errors import InputError
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.small_cnn import SmallCNN
from tlflax.text import build_text_classifier, tokenize_texts

RAW_MODELDATA = ROOT / "data" / "raw" / "modeldata"


def test_pairs_join_each_example_to_its_class_and_to_another() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])  # class 2 has a single example: no partner of its own
    pairs = contrastive_pairs(labels, pair_rounds=3, seed=0)
    first, second, same = pairs.T
    assert np.all(first != second)
    assert np.array_equal(same, (labels[first] == labels[second]).astype(int))
    # Per round: one pair of each kind per example, but no same-class pair for the lone one.
    for index in range(len(labels)):
        own = same[first == index]
        assert own.sum() == (0 if index == 5 else 3) and (own == 0).sum() == 3
    assert np.array_equal(pairs, contrastive_pairs(labels, pair_rounds=3, seed=0))
    assert not np.array_equal(pairs, contrastive_pairs(labels, pair_rounds=3, seed=1))
    with pytest.raises(InputError, match="single class"):
        contrastive_pairs(np.zeros(4, int), pair_rounds=1, seed=0)


def _split(frame, per_class: int, offset: int) -> dict[str, np.ndarray]:
    rows = [
        frame[frame["label"] == name].iloc[offset : offset + per_class]
        for name in FINE_FOODS_CLASSES
    ]
    texts = [text for part in rows for text in part["review"]]
    labels = np.repeat(np.arange(len(FINE_FOODS_CLASSES)), per_class)
    return {**tokenize_texts(texts, max_length=32), "label": labels}


def _class_separation(model, split: dict[str, np.ndarray]) -> float:
    """Mean cosine similarity of same-class pairs minus that of different-class pairs."""
    features = np.asarray(model.head_features(split["input_ids"], split["attention_mask"]))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = split["label"][:, None] == split["label"][None, :]
    off_diagonal = ~np.eye(len(unit), dtype=bool)
    return float(cosine[same & off_diagonal].mean() - cosine[~same].mean())


def test_contrastive_start_separates_the_classes_and_refits_the_head() -> None:
    if not RAW_MODELDATA.exists():
        pytest.fail(f"{RAW_MODELDATA} is missing: run `make assets` (scripts/fetch_assets.sh)")
    frame = read_fine_foods(RAW_MODELDATA)["train"]
    train, validation = _split(frame, 8, 0), _split(frame, 8, 8)
    head_cfg = TrainHeadParams(head="linear", max_epochs=30, patience=5)
    model = build_text_classifier("minilm_l6", 2, head_cfg, pretrained=True, taps=[5, 7])
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    separation_before = _class_separation(model, train)

    cfg = ContrastiveParams(pair_rounds=4, learning_rate=1e-4, batch_size=16)
    summary = contrastive_start(model, train, validation, cfg, head_cfg, batch_size=16, seed=0)

    # 16 examples x 4 rounds x (one pair of each kind) = 128 pairs, in 8 steps of 16.
    assert summary["pairs"] == 128 and summary["steps"] == 8
    assert summary["last_loss"] < summary["first_loss"]
    # What the stage is for: the training examples of one class moved together, apart
    # from the other class, in the space the head reads (the joined taps 5 and 7).
    assert _class_separation(model, train) > separation_before + 0.05
    after = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert changed["backbone"]["layers"][0]["attention"]["query"]["kernel"].value
    # The head is a new one, fitted on the tuned features, and the forward pass uses it.
    assert changed["head"]["output"]["kernel"].value
    assert 0.0 <= summary["head_validation_accuracy"] <= 1.0
    logits = model(validation["input_ids"], validation["attention_mask"])
    features = model.head_features(validation["input_ids"], validation["attention_mask"])
    np.testing.assert_allclose(logits, model.head(features), rtol=1e-5, atol=1e-5)


def test_contrastive_stage_is_for_text_only() -> None:
    model = ImageClassifier(SmallCNN(rngs=nnx.Rngs(0)), Head(128, 2, rngs=nnx.Rngs(0)))
    data = {"image": np.zeros((4, 8, 8, 3), np.float32), "label": np.array([0, 1, 0, 1])}
    with pytest.raises(InputError, match="for text encoders"):
        contrastive_start(
            model,
            data,
            data,
            ContrastiveParams(pair_rounds=1),
            TrainHeadParams(),
            batch_size=4,
            seed=0,
        )
    with pytest.raises(ParamsError, match=r"finetune\.contrastive"):
        parse_params(
            {
                "prepare": {"dataset": "fashion_mnist"},
                "finetune": {"contrastive": {"pair_rounds": 20}},
            }
        )
