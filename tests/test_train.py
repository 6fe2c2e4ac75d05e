"""The transfer engine on tiny real data (scikit-learn digits): head, fine-tune, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from tlflax.checkpoint import TrainingCheckpoints
from tlflax.config import AugmentParams, FinetuneParams, TrainHeadParams, TransferRule
from tlflax.data.pipeline import iterate_batches
from tlflax.finetuner import Finetuner, run_finetuning
from tlflax.loop import NonFiniteLossError
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.layers import set_batchnorm_training
from tlflax.models.small_cnn import SmallCNN
from tlflax.train import create_head, masked_cross_entropy, mixed_cross_entropy, train_head
from tlflax.transfer import parameter_names
from tlflax.vision import extract_features, image_forward


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


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
        num_train_examples=len(train["label"]),
        group_patterns=model.backbone.group_patterns(),
    )


def _killed_after_first_epoch(cfg, train, validation, directory, **callbacks):
    """A run interrupted right after its first epoch (checkpoint saved), as a kill would."""

    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    checkpoints = TrainingCheckpoints(directory, keep_best=1)
    with pytest.raises(KeyboardInterrupt):
        run_finetuning(
            _finetuner(cfg, train),
            train,
            validation,
            checkpoints,
            eval_batch_size=64,
            on_epoch_end=interrupt,
            **callbacks,
        )
    checkpoints.close()


def _resumed(cfg, train, validation, directory, **callbacks):
    checkpoints = TrainingCheckpoints(directory, keep_best=1)
    state, history = run_finetuning(
        _finetuner(cfg, train), train, validation, checkpoints, eval_batch_size=64, **callbacks
    )
    checkpoints.close()
    return state, history


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
    # Training beat the random start on validation: the run ends on its best epoch.
    assert history.kept_start is None
    assert history.summary()["best_epoch"] == history.best_epoch >= 0


def _trained_classifier(train, validation, directory):
    """A classifier fine-tuned for 8 epochs: a start that validation scores well above
    chance (about 0.55 against 0.1)."""
    cfg = _finetune_cfg(learning_rate=3e-2, epochs=8, patience=8)
    finetuner = _finetuner(cfg, train)
    checkpoints = TrainingCheckpoints(directory, keep_best=1)
    state, _ = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=64)
    checkpoints.close()
    return finetuner.model(state)


@pytest.mark.parametrize("strategy", ["auto", "scratch"])
def test_a_start_no_epoch_beats_is_kept_unless_it_is_random(digits, tmp_path, strategy):
    train, validation = digits
    start = _trained_classifier(train, validation, tmp_path / "start")
    # A random-number stream in the model's state, as a transformer's dropout holds one: the
    # kept start must carry its key (a key array has no plain host form).
    start.rngs = nnx.Rngs(dropout=7)
    start_weights = [_host(x) for x in jax.tree_util.tree_leaves(nnx.state(start))]
    # A learning rate far too high: every epoch wrecks what the start knew.
    cfg = _finetune_cfg(learning_rate=3.0, warmup_fraction=0.0, epochs=2)
    # As a plan (tlflax.plan.TrainingPlan) records it: the strategy beside its rules.
    cfg = cfg.model_copy(update={"strategy": strategy})
    finetuner = _finetuner(cfg, train, model=start)
    start_score = finetuner.evaluate(finetuner.initial, validation, 64)
    checkpoints = TrainingCheckpoints(tmp_path / "wrecked", keep_best=1)
    state, history = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=64)
    checkpoints.close()
    best_epoch = history.epochs[history.best_epoch]["validation_accuracy"]
    assert best_epoch < start_score["accuracy"] - 0.2
    ended = finetuner.model(state)
    if strategy == "scratch":  # a random start is never what a run should end on
        assert history.kept_start is None
        assert finetuner.evaluate(state, validation, 64)["accuracy"] == best_epoch
        return
    assert history.kept_start == {f"validation_{k}": v for k, v in start_score.items()}
    assert history.summary() == {
        "best_epoch": -1,
        "kept_start": True,
        "epochs_run": 2,
        "stopped_early": False,
        "validation_accuracy": start_score["accuracy"],
        "validation_loss": start_score["loss"],
    }
    for before, after in zip(
        start_weights, jax.tree_util.tree_leaves(nnx.state(ended)), strict=True
    ):
        np.testing.assert_array_equal(before, _host(after))


def test_weight_mixes_are_validated_and_the_best_is_saved(digits, tmp_path):
    """WiSE-FT: the start, each listed mix and the best epoch are scored on validation; the
    saved weights are the winner's, and a mix is exactly (1 - s) * start + s * fine-tuned."""
    train, validation = digits
    start = _trained_classifier(train, validation, tmp_path / "start")
    # Host copies: a run donates its start's device buffers to the first train step.
    start_state = jax.tree_util.tree_map(np.array, nnx.state(start))
    start_weights = jax.tree_util.tree_map(np.array, nnx.state(start, nnx.Param))
    # A step large enough that the fine-tuned end loses to its start on validation accuracy
    # (0.49 against 0.55) while the half-way mix leads both (0.56).
    cfg = _finetune_cfg(
        learning_rate=0.1, warmup_fraction=0.0, epochs=2, monitor="validation_accuracy"
    )

    def start_copy():
        model = _classifier()
        nnx.update(model, jax.tree_util.tree_map(jnp.asarray, start_state))
        return model

    def run(config, directory):
        finetuner = _finetuner(config, train, model=start_copy())
        checkpoints = TrainingCheckpoints(directory, monitor=config.monitor, keep_best=1)
        state, history = run_finetuning(
            finetuner, train, validation, checkpoints, eval_batch_size=64
        )
        checkpoints.close()
        return finetuner, state, history

    # The fine-tuned end alone: strategy scratch trains the same, but never keeps its start.
    end_finetuner, end_state, end_history = run(
        cfg.model_copy(update={"strategy": "scratch"}), tmp_path / "end"
    )
    assert end_history.weight_mixes == [] and "weight_mixes" not in end_history.summary()
    mixed_cfg = cfg.model_copy(update={"weight_mixes": [0.75, 0.25, 0.5]})
    finetuner, state, history = run(mixed_cfg, tmp_path / "mixed")

    shares = [candidate["fine_tuned_share"] for candidate in history.weight_mixes]
    assert shares == [0.0, 0.25, 0.5, 0.75, 1.0]
    start_evaluator = _finetuner(cfg, train, model=start_copy())
    start_score = start_evaluator.evaluate(start_evaluator.initial, validation, 64)
    assert history.weight_mixes[0]["validation_loss"] == start_score["loss"]
    end_score = end_finetuner.evaluate(end_state, validation, 64)
    assert history.weight_mixes[-1]["validation_loss"] == pytest.approx(end_score["loss"])

    # Each mix, rebuilt here from the two ends' weights, scores what the run recorded.
    end_weights = jax.tree_util.tree_map(
        np.asarray, nnx.state(end_finetuner.model(end_state), nnx.Param)
    )
    for candidate in history.weight_mixes[1:-1]:
        share = candidate["fine_tuned_share"]
        model = start_copy()
        mixed = jax.tree_util.tree_map(
            lambda a, b, s=share: (1 - s) * a + s * b, start_weights, end_weights
        )
        nnx.update(model, mixed)
        evaluator = _finetuner(cfg, train, model=model)
        rebuilt = evaluator.evaluate(evaluator.initial, validation, 64)
        assert rebuilt["loss"] == pytest.approx(candidate["validation_loss"], rel=1e-5)

    # The saved model is the most accurate candidate (a tie: the smaller share), here a mix
    # that beats both ends; the summary says which.
    best = max(history.weight_mixes, key=lambda c: c["validation_accuracy"])
    assert 0.0 < best["fine_tuned_share"] < 1.0
    saved = finetuner.evaluate(state, validation, 64)
    assert saved["loss"] == pytest.approx(best["validation_loss"], rel=1e-5)
    assert history.kept_start is None
    summary = history.summary()
    assert summary["fine_tuned_share"] == best["fine_tuned_share"]
    assert summary["validation_accuracy"] == best["validation_accuracy"]
    assert summary["weight_mixes"] == history.weight_mixes


def _host(leaf) -> np.ndarray:
    """A state leaf as a host array (a random key as its raw words)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def test_resume_after_interruption_gives_identical_parameters(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg(epochs=3)

    uninterrupted_ckpt = TrainingCheckpoints(tmp_path / "a", keep_best=1)
    full, _ = run_finetuning(
        _finetuner(cfg, train), train, validation, uninterrupted_ckpt, eval_batch_size=64
    )
    uninterrupted_ckpt.close()

    # The first run is interrupted right after its first epoch; the second resumes.
    _killed_after_first_epoch(cfg, train, validation, tmp_path / "b")
    resumed, history = _resumed(cfg, train, validation, tmp_path / "b")

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


def test_mixed_precision_trains_with_float32_master_weights(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg(compute_dtype="bfloat16", epochs=2)
    model = _classifier()
    finetuner = Finetuner(
        model,
        image_forward(16, cfg.augment, cfg.compute_dtype),
        cfg,
        num_train_examples=len(train["label"]),
        group_patterns=model.backbone.group_patterns(),
    )
    checkpoints = TrainingCheckpoints(tmp_path / "bf16", keep_best=1)
    state, history = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=64)
    checkpoints.close()
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(state.trainable))
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    # The compiled step really computes in bfloat16 (not silently promoted back to float32).
    batch = next(iterate_batches(train, 32, shuffle=False, seed=0))
    hlo = finetuner.train_step.lower(
        state.trainable, state.opt_state, state.frozen, state.rest, batch, state.key
    ).as_text()
    assert "bf16" in hlo


MULTI_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {root!r})
from tests.test_train import _classifier, _finetune_cfg, load_digits_split
from tlflax.checkpoint import TrainingCheckpoints
from tlflax.data.pipeline import iterate_batches, num_batches
from tlflax.finetuner import Finetuner, run_finetuning
from tlflax.vision import image_forward
train, validation = load_digits_split()
cfg = _finetune_cfg(epochs=2)
model = _classifier()
finetuner = Finetuner(model, image_forward(16, cfg.augment), cfg,
    num_train_examples=len(train["label"]),
    group_patterns=model.backbone.group_patterns())
checkpoints = TrainingCheckpoints({directory!r}, keep_best=1)
state, history = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=64)
checkpoints.close()
leaves = [np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(state.trainable)]
print(json.dumps({{"devices": jax.device_count(), "params": np.concatenate(leaves).tolist()[:5000],
                  "loss": history.epochs[-1]["train_loss"]}}))
"""


def load_digits_split():
    data = load_digits()
    images = (data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    train, validation = order[:300], order[300:400]
    return (
        {"image": images[train], "label": labels[train]},
        {"image": images[validation], "label": labels[validation]},
    )


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    results = {}
    for devices in (1, 4):
        script = MULTI_DEVICE_SCRIPT.format(root=root, directory=str(tmp_path / f"d{devices}"))
        environment = dict(
            os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        results[devices] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results[1]["devices"] == 1 and results[4]["devices"] == 4
    np.testing.assert_allclose(results[4]["params"], results[1]["params"], atol=2e-4, rtol=1e-3)
    assert abs(results[4]["loss"] - results[1]["loss"]) < 1e-3


def test_gradual_unfreezing_moves_one_more_group_per_epoch(digits):
    train, _ = digits
    cfg = _finetune_cfg(gradual_unfreezing=True, epochs=2)
    finetuner = _finetuner(cfg, train)
    assert finetuner.settings["backbone/blocks/1/conv/kernel"].unfreeze_epoch == 1
    assert finetuner.settings["head/output/kernel"].unfreeze_epoch == 0

    def snapshot(state):
        names = parameter_names(state.trainable)
        return {
            n: np.asarray(x)
            for n, x in zip(names, jax.tree_util.tree_leaves(state.trainable), strict=True)
        }

    start = snapshot(finetuner.initial)
    after_first, _ = finetuner.run_epoch(finetuner.initial, train, progress=False)
    first = snapshot(after_first)
    np.testing.assert_array_equal(
        first["backbone/blocks/1/conv/kernel"], start["backbone/blocks/1/conv/kernel"]
    )
    assert not np.array_equal(first["head/output/kernel"], start["head/output/kernel"])
    after_second, _ = finetuner.run_epoch(after_first, train, progress=False)
    second = snapshot(after_second)
    assert not np.array_equal(
        second["backbone/blocks/1/conv/kernel"], first["backbone/blocks/1/conv/kernel"]
    )
    assert finetuner.train_step._cache_size() == 1


def test_monitor_picks_the_best_epoch_and_restores_it(digits, tmp_path):
    train, validation = digits
    picked = {}
    for monitor, better in (("validation_loss", min), ("validation_accuracy", max)):
        # At this rate the loss still falls in the last epoch while accuracy peaks before it.
        cfg = _finetune_cfg(epochs=6, patience=10, learning_rate=3e-2, monitor=monitor)
        finetuner = _finetuner(cfg, train)
        checkpoints = TrainingCheckpoints(tmp_path / monitor, keep_best=1, monitor=monitor)
        state, history = run_finetuning(
            finetuner, train, validation, checkpoints, eval_batch_size=64
        )
        checkpoints.close()
        values = [epoch[monitor] for epoch in history.epochs]
        assert history.best_epoch == values.index(better(values))
        # The returned state is the best epoch's, restored from its checkpoint.
        best = history.epochs[history.best_epoch]
        assert finetuner.evaluate(state, validation, 64) == pytest.approx(
            {"loss": best["validation_loss"], "accuracy": best["validation_accuracy"]}
        )
        picked[monitor] = history.best_epoch
    assert picked["validation_accuracy"] < picked["validation_loss"] == 5


def test_checkpoints_ranking_by_another_metric_are_refused(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg(epochs=1, monitor="validation_accuracy")
    checkpoints = TrainingCheckpoints(tmp_path / "ckpt", keep_best=1)
    with pytest.raises(ValueError, match="validation_loss.*validation_accuracy"):
        run_finetuning(_finetuner(cfg, train), train, validation, checkpoints, eval_batch_size=64)
    checkpoints.close()


def _batchnorm_statistics(state) -> dict[str, np.ndarray]:
    names = parameter_names(state.rest)
    return {
        name: np.asarray(leaf)
        for name, leaf in zip(names, jax.tree_util.tree_leaves(state.rest), strict=True)
        if name.endswith(("mean", "var"))
    }


def test_validation_judges_the_model_as_it_is_saved(digits, tmp_path):
    """With BatchNorm training, validation uses running statistics, as the saved model does.

    Validation on batch statistics once picked a from-scratch epoch at 0.975 validation
    accuracy whose saved model scored chance on test.
    """
    train, validation = digits
    cfg = _finetune_cfg(batchnorm="train", rules=[TransferRule(pattern=".*")], epochs=2)
    model = _classifier()
    set_batchnorm_training(model, True)  # as a from-scratch run's model comes
    finetuner = _finetuner(cfg, train, model)
    checkpoints = TrainingCheckpoints(tmp_path / "ckpt", keep_best=1)
    state, history = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=64)
    checkpoints.close()
    saved = finetuner.model(state)
    assert all(
        module.use_running_average
        for _, module in nnx.iter_graph(saved)
        if isinstance(module, nnx.BatchNorm)
    )
    # The saved model, evaluated on its own, scores what validation reported for it (its
    # epoch's, or the start's where no epoch beat it).
    logits = image_forward(16, cfg.augment)(saved, {"image": validation["image"]}, False, None)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == validation["label"]))
    assert accuracy == pytest.approx(history.summary()["validation_accuracy"])


def test_batchnorm_of_frozen_groups_keeps_its_statistics(digits):
    train, _ = digits
    cfg = _finetune_cfg(batchnorm="train")  # block 0 frozen, the rest trains
    finetuner = _finetuner(cfg, train)
    assert finetuner.trained_batchnorms == ["backbone/blocks/1/norm"]
    before = _batchnorm_statistics(finetuner.initial)
    after, _ = finetuner.run_epoch(finetuner.initial, train, progress=False)
    after = _batchnorm_statistics(after)
    for name in before:
        moved = not np.array_equal(before[name], after[name])
        assert moved == name.startswith("backbone/blocks/1/"), name


def test_padding_rows_never_enter_batch_statistics(digits):
    """While BatchNorm trains, an epoch is full batches only: no padded row is normalised."""
    train, _ = digits  # 300 examples: batches of 32 leave 12
    cfg = _finetune_cfg(batchnorm="train")
    finetuner = _finetuner(cfg, train)
    assert finetuner.steps_per_epoch(300) == 9
    seen = []
    step = finetuner.train_step

    def recording_step(trainable, opt_state, frozen, rest, batch, key):
        seen.append(np.asarray(batch["mask"]))
        return step(trainable, opt_state, frozen, rest, batch, key)

    finetuner.train_step = recording_step
    finetuner.run_epoch(finetuner.initial, train, progress=False)
    assert len(seen) == 9 and all(mask.min() == 1.0 for mask in seen)
    # With BatchNorm on running statistics the padded last batch still trains (masked loss).
    frozen_batchnorm = _finetuner(_finetune_cfg(), train)
    assert frozen_batchnorm.steps_per_epoch(300) == 10


def test_batchnorm_training_needs_one_full_batch(digits):
    train, _ = digits
    cfg = _finetune_cfg(batchnorm="train", batch_size=512)
    with pytest.raises(ValueError, match=r"finetune\.batch_size. \(512"):
        _finetuner(cfg, train)


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    logits = jax.numpy.asarray([[4.0, 0.0, -2.0], [0.5, 1.5, 0.0]])
    labels = jax.numpy.asarray([0, 2])
    mask = jax.numpy.asarray([1.0, 1.0])
    smoothing = 0.3
    targets = np.full((2, 3), smoothing / 3) + (1 - smoothing) * np.eye(3)[[0, 2]]
    log_probabilities = np.asarray(jax.nn.log_softmax(logits))
    expected = float(np.mean(-(targets * log_probabilities).sum(axis=1)))
    assert float(masked_cross_entropy(logits, labels, mask, smoothing)) == pytest.approx(expected)
    # Without smoothing it is the plain loss; confident right answers cost more with it.
    plain = float(masked_cross_entropy(logits, labels, mask))
    assert plain == pytest.approx(float(np.mean(-log_probabilities[[0, 1], [0, 2]])))
    confident = jax.numpy.asarray([[20.0, 0.0, 0.0]])
    one = jax.numpy.asarray([1.0])
    assert float(masked_cross_entropy(confident, labels[:1], one, smoothing)) > float(
        masked_cross_entropy(confident, labels[:1], one)
    )


def test_mixed_cross_entropy_mixes_the_two_labels_losses_by_share():
    logits = jax.numpy.asarray([[4.0, 0.0, -2.0], [0.5, 1.5, 0.0], [1.0, 1.0, 1.0]])
    labels = jax.numpy.asarray([0, 2, 1])
    partners = jax.numpy.asarray([1, 0, 2])
    mask = jax.numpy.asarray([1.0, 1.0, 0.0])  # the padding row counts for nothing
    share = jax.numpy.asarray([0.25, 0.0, 0.9])
    log_probabilities = np.asarray(jax.nn.log_softmax(logits))
    expected = np.mean(
        [
            -(0.75 * log_probabilities[0, 0] + 0.25 * log_probabilities[0, 1]),
            -log_probabilities[1, 2],
        ]
    )
    got = mixed_cross_entropy(logits, labels, partners, share, mask)
    assert float(got) == pytest.approx(float(expected))
    # No share: the plain loss, with class weights applied per label as there.
    weights = jax.numpy.asarray([2.0, 0.5, 1.0])
    zero = jax.numpy.zeros(3)
    assert float(
        mixed_cross_entropy(logits, labels, partners, zero, mask, class_weights=weights)
    ) == pytest.approx(float(masked_cross_entropy(logits, labels, mask, class_weights=weights)))


def test_cutmix_fine_tuning_trains_and_its_batches_mix_labels(digits, tmp_path):
    train, validation = digits
    # A small network from random weights: 10 epochs at a high rate to learn anything.
    settings = {"epochs": 10, "learning_rate": 3e-2}
    cfg = _finetune_cfg(
        **settings, augment=AugmentParams(random_crop=False, flip=False, cutmix=1.0)
    )
    finetuner = _finetuner(cfg, train)
    checkpoints = TrainingCheckpoints(tmp_path / "ckpt", keep_best=1)
    state, history = run_finetuning(finetuner, train, validation, checkpoints, eval_batch_size=64)
    checkpoints.close()
    first, best = history.epochs[0], history.epochs[history.best_epoch]
    # Mixed targets keep the training loss well above what the same steps reach on whole
    # images, yet the network still learns the digits (chance: 0.1; measured 0.39).
    assert best["validation_accuracy"] > 0.25
    assert best["validation_loss"] < first["validation_loss"]
    plain_cfg = _finetune_cfg(**settings)
    plain_checkpoints = TrainingCheckpoints(tmp_path / "plain", keep_best=1)
    _, plain = run_finetuning(
        _finetuner(plain_cfg, train), train, validation, plain_checkpoints, eval_batch_size=64
    )
    plain_checkpoints.close()
    assert history.epochs[-1]["train_loss"] > plain.epochs[-1]["train_loss"]


def test_weight_ema_is_validated_saved_and_resumed(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg(epochs=2, ema_decay=0.9)
    finetuner = _finetuner(cfg, train)
    # By hand: the moving average of the weights after each step of the first epoch (copied:
    # the step donates the buffers it is given).
    expected = jax.tree_util.tree_map(np.array, finetuner.initial.ema)
    state = finetuner.initial
    steps = []

    step = finetuner.train_step

    def recording_step(trainable, opt_state, frozen, rest, batch, key):
        result = step(trainable, opt_state, frozen, rest, batch, key)
        steps.append(jax.tree_util.tree_map(np.array, result[0]))
        return result

    finetuner.train_step = recording_step
    state, _ = finetuner.run_epoch(state, train, progress=False)
    for index, weights in enumerate(steps):
        decay = min(0.9, (1 + index) / (10 + index))
        expected = jax.tree_util.tree_map(
            lambda e, w, d=decay: d * e + (1 - d) * w, expected, weights
        )
    for got, want in zip(
        jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert any(
        not np.allclose(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree_util.tree_leaves(state.ema),
            jax.tree_util.tree_leaves(state.trainable),
            strict=True,
        )
    )
    # The model that is validated and saved holds the averaged weights.
    saved = nnx.state(finetuner.model(state), nnx.Param)
    for name, value in zip(
        parameter_names(state.ema), jax.tree_util.tree_leaves(state.ema), strict=True
    ):
        path = tuple(int(p) if p.isdigit() else p for p in name.split("/"))
        leaf = saved
        for part in path:
            leaf = leaf[part]
        np.testing.assert_array_equal(np.asarray(leaf.value), np.asarray(value))
    # A run killed after its first epoch resumes with the same average as an unbroken one.
    whole = TrainingCheckpoints(tmp_path / "whole", keep_best=1)
    full, _ = run_finetuning(_finetuner(cfg, train), train, validation, whole, eval_batch_size=64)
    whole.close()
    _killed_after_first_epoch(cfg, train, validation, tmp_path / "broken")
    resumed, _ = _resumed(cfg, train, validation, tmp_path / "broken")
    for a, b in zip(
        jax.tree_util.tree_leaves(full.ema), jax.tree_util.tree_leaves(resumed.ema), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_test_time_flip_averages_each_image_with_its_mirror(digits):
    _, validation = digits
    model = _classifier()
    images = validation["image"][:16]
    plain = image_forward(16, AugmentParams(random_crop=False, flip=False))
    flipped = image_forward(16, AugmentParams(random_crop=False, flip=False, test_time_flip=True))
    probabilities = jax.nn.softmax(plain(model, {"image": images}, False, None))
    mirrored = jax.nn.softmax(plain(model, {"image": images[:, :, ::-1, :]}, False, None))
    averaged = jax.nn.softmax(flipped(model, {"image": images}, False, None))
    np.testing.assert_allclose(averaged, (probabilities + mirrored) / 2, rtol=1e-5, atol=1e-6)
    # A mirror image gets the same prediction as its original.
    np.testing.assert_allclose(
        averaged,
        jax.nn.softmax(flipped(model, {"image": images[:, :, ::-1, :]}, False, None)),
        rtol=1e-5,
        atol=1e-6,
    )
    # Training steps never see the averaging.
    np.testing.assert_allclose(
        flipped(model, {"image": images}, True, None), plain(model, {"image": images}, True, None)
    )


def test_the_history_callback_sees_every_epoch_so_far_a_resumed_runs_included(digits, tmp_path):
    train, validation = digits
    cfg = _finetune_cfg(epochs=3)
    seen: list[int] = []
    _killed_after_first_epoch(
        cfg, train, validation, tmp_path / "ckpt", on_history=lambda h: seen.append(len(h.epochs))
    )
    assert seen == []  # the kill came before the history callback of epoch 0
    histories: list[list[dict]] = []
    _, history = _resumed(
        cfg,
        train,
        validation,
        tmp_path / "ckpt",
        on_history=lambda h: histories.append(list(h.epochs)),
    )
    # Resumed after epoch 0: the first call already holds it, then one more per epoch.
    assert [len(epochs) for epochs in histories] == [2, 3]
    assert histories[-1] == history.epochs
