"""The transfer engine on tiny real data (scikit-learn digits): head, fine-tune, resume."""

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from tlflax.checkpoint import TrainingCheckpoints
from tlflax.config import AugmentParams, FinetuneParams, TrainHeadParams, TransferRule
from tlflax.data.pipeline import num_batches
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.small_cnn import SmallCNN
from tlflax.train import (
    Finetuner,
    NonFiniteLossError,
    create_head,
    run_finetuning,
    train_head,
)
from tlflax.transfer import parameter_names
from tlflax.vision import extract_features, image_forward


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = (data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    train, validation = order[:300], order[300:400]
    return (
        {"image": images[train], "label": labels[train]},
        {"image": images[validation], "label": labels[validation]},
    )


def _classifier(seed=0):
    rngs = nnx.Rngs(seed)
    return ImageClassifier(SmallCNN(widths=(8, 16), rngs=rngs), Head(16, 10, rngs=rngs))


def _finetune_cfg(**overrides):
    values = dict(
        learning_rate=3e-3,
        batch_size=32,
        epochs=3,
        warmup_fraction=0.1,
        patience=5,
        augment=AugmentParams(random_crop=False, flip=False),
        rules=[
            TransferRule(pattern="^backbone/blocks/0/", freeze=True),
            TransferRule(pattern=".*"),
        ],
    )
    values.update(overrides)
    return FinetuneParams(**values)


def _finetuner(cfg, train, model=None):
    model = model or _classifier()
    return Finetuner(
        model,
        image_forward(16, cfg.augment),
        cfg,
        steps_per_epoch=num_batches(len(train["label"]), cfg.batch_size, drop_remainder=False),
        group_patterns=model.backbone.group_patterns(),
    )


def test_head_learns_on_cached_features(digits):
    train, validation = digits
    backbone = SmallCNN(widths=(16, 32, 64), rngs=nnx.Rngs(0))
    features = {
        name: {
            "features": extract_features(backbone, split["image"], image_size=32, batch_size=64),
            "label": split["label"],
        }
        for name, split in (("train", train), ("validation", validation))
    }
    assert features["train"]["features"].shape == (300, 64)
    cfg = TrainHeadParams(learning_rate=3e-2, max_epochs=60, patience=60, dropout=0.0)
    head = create_head(64, 10, cfg)
    history = train_head(head, features["train"], features["validation"], cfg)
    best = history.epochs[history.best_epoch]
    # Random conv features of digits are still far above chance (10%) for a linear probe.
    assert best["validation_accuracy"] > 0.5
    assert best["validation_loss"] < history.epochs[0]["validation_loss"]


def test_finetune_trains_only_unfrozen_and_compiles_once(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg()
    finetuner = _finetuner(cfg, train)
    before = {
        n: np.asarray(x)
        for n, x in zip(
            parameter_names(finetuner.initial.frozen),
            jax.tree_util.tree_leaves(finetuner.initial.frozen),
            strict=True,
        )
    }
    assert all(n.startswith("backbone/blocks/0/") for n in before)
    checkpoints = TrainingCheckpoints(tmp_path / "ckpt", keep_best=1)
    state, history = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=64)
    checkpoints.close()
    # One compilation per step function for the whole run (300 examples → a padded last batch).
    assert finetuner.train_step._cache_size() == 1
    assert finetuner.eval_step._cache_size() == 1
    after = dict(
        zip(parameter_names(state.frozen), jax.tree_util.tree_leaves(state.frozen), strict=True)
    )
    for name, value in before.items():
        np.testing.assert_array_equal(value, np.asarray(after[name]))
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    assert len(history.epochs) == 3


def test_resume_after_interruption_gives_identical_parameters(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg(epochs=3)

    uninterrupted_ckpt = TrainingCheckpoints(tmp_path / "a", keep_best=1)
    full, _ = run_finetuning(
        _finetuner(cfg, train), train, validation, uninterrupted_ckpt, eval_batch_size=64
    )
    uninterrupted_ckpt.close()

    # The first run is interrupted right after its first epoch; the second resumes.
    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    partial_ckpt = TrainingCheckpoints(tmp_path / "b", keep_best=1)
    with pytest.raises(KeyboardInterrupt):
        run_finetuning(
            _finetuner(cfg, train),
            train,
            validation,
            partial_ckpt,
            eval_batch_size=64,
            on_epoch_end=interrupt,
        )
    partial_ckpt.close()
    resumed_ckpt = TrainingCheckpoints(tmp_path / "b", keep_best=1)
    resumed, history = run_finetuning(
        _finetuner(cfg, train), train, validation, resumed_ckpt, eval_batch_size=64
    )
    resumed_ckpt.close()

    assert len(history.epochs) == 3
    for a, b in zip(
        jax.tree_util.tree_leaves(full.trainable),
        jax.tree_util.tree_leaves(resumed.trainable),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_stops_with_the_step(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg(learning_rate=1e9, gradient_clip_norm=1e9, epochs=2)
    broken = dict(train, image=train["image"].copy())
    finetuner = _finetuner(cfg, broken)
    checkpoints = TrainingCheckpoints(tmp_path / "c", keep_best=1)
    with pytest.raises(
        NonFiniteLossError, match=r"finetune: training loss became (nan|inf) at epoch \d+, step \d+"
    ):
        run_finetuning(finetuner, broken, validation, checkpoints, eval_batch_size=64)
