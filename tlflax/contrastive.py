"""Contrastive tuning of a text encoder before its head is fitted: SetFit's first stage.

Tunstall et al. (2022), "Efficient Few-Shot Learning Without Prompts": with a handful of
examples a class, a cross-entropy step has little to learn from, but pairs of examples are
many. The encoder first trains on pairs - the cosine similarity of the two features the
head reads pulled towards 1 for two examples of one class, towards 0 for two of different
classes - so that the classes move apart in the space the head reads; a fresh head is then
fitted on the tuned features. The run's strategy trains from there as it would from the
pretrained network (``feature_extraction``: SetFit's frozen body and head).

    model = task.build_classifier(num_classes, pretrained=True, taps=taps)
    summary = contrastive_start(model, train, validation, cfg.contrastive, head_cfg,
                                batch_size=64, seed=0)
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlflax.balance import NO_REMEDY, ClassBalance
from tlflax.config import ContrastiveParams, TrainHeadParams
from tlflax.data.pipeline import map_batches
from tlflax.errors import InputError
from tlflax.models.heads import TextClassifier
from tlflax.text import TOKEN_KEYS
from tlflax.train import create_head, train_head

__all__ = ["contrastive_pairs", "contrastive_start", "tune_contrastively"]

# What the pairs train: the encoder; the head is refitted afterwards (contrastive_start).
_ENCODER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("backbone"))


def contrastive_pairs(labels: np.ndarray, pair_rounds: int, seed: int) -> np.ndarray:
    """The training pairs, shuffled: (P, 3) int64 rows of (first, second, same class 1/0).

    In each round every example is paired once with another example of its class (none
    when it is its class's only example) and once with an example of another class.
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise InputError(
            "finetune.contrastive: the training split holds a single class; pairs of "
            "different classes need two (set pair_rounds: 0)"
        )
    random = np.random.default_rng(seed)
    positions = np.arange(len(labels))
    same_class = [
        positions[(labels == label) & (positions != index)] for index, label in enumerate(labels)
    ]
    other_class = [positions[labels != label] for label in labels]
    pairs = []
    for _ in range(pair_rounds):
        for index in positions:
            if len(same_class[index]):
                pairs.append((index, random.choice(same_class[index]), 1))
            pairs.append((index, random.choice(other_class[index]), 0))
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 3)
    return pairs[random.permutation(len(pairs))]


def _cosine_loss(model: TextClassifier, first: dict, second: dict, same: jax.Array) -> jax.Array:
    # Dropout on (train=True), as SetFit's sentence-transformers training has it.
    u = model.head_features(first["input_ids"], first["attention_mask"], train=True)
    v = model.head_features(second["input_ids"], second["attention_mask"], train=True)
    cosine = jnp.sum(u * v, axis=-1) / (
        jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1) + 1e-12
    )
    return jnp.mean((cosine - same) ** 2)


@nnx.jit
def _contrastive_step(
    model: TextClassifier, optimizer: nnx.Optimizer, first: dict, second: dict, same: jax.Array
) -> jax.Array:
    loss, grads = nnx.value_and_grad(_cosine_loss, argnums=nnx.DiffState(0, _ENCODER_PARAMS))(
        model, first, second, same
    )
    optimizer.update(model, grads)
    return loss


def tune_contrastively(
    model: TextClassifier, train: dict[str, np.ndarray], cfg: ContrastiveParams, *, seed: int
) -> np.ndarray:
    """Train ``model``'s encoder in place on pairs of ``train`` examples (one pass, AdamW);
    returns the loss of each step. The head is untouched (:func:`contrastive_start` refits it).

    Pairs that do not fill the last batch are left out: every step has one shape and
    compiles once.
    """
    pairs = contrastive_pairs(train["label"], cfg.pair_rounds, seed)
    if len(pairs) < cfg.batch_size:
        raise InputError(
            f"finetune.contrastive: {len(pairs)} pairs fill no batch of batch_size "
            f"{cfg.batch_size}; lower batch_size or raise pair_rounds"
        )
    optimizer = nnx.Optimizer(model, optax.adamw(cfg.learning_rate), wrt=_ENCODER_PARAMS)
    tokens = {key: np.asarray(train[key]) for key in TOKEN_KEYS}
    losses = []
    for start in range(0, len(pairs) - cfg.batch_size + 1, cfg.batch_size):
        batch = pairs[start : start + cfg.batch_size]
        first = {key: value[batch[:, 0]] for key, value in tokens.items()}
        second = {key: value[batch[:, 1]] for key, value in tokens.items()}
        same = jnp.asarray(batch[:, 2], jnp.float32)
        losses.append(_contrastive_step(model, optimizer, first, second, same))
    return np.asarray(jax.device_get(losses), dtype=np.float64)


@nnx.jit
def _features_step(model: TextClassifier, batch: dict) -> jax.Array:
    return model.head_features(batch["input_ids"], batch["attention_mask"], train=False)


def _head_inputs(model: TextClassifier, split: dict[str, np.ndarray], batch_size: int) -> dict:
    features = map_batches(
        lambda batch: _features_step(model, batch),
        {key: split[key] for key in TOKEN_KEYS},
        batch_size=batch_size,
        description="contrastive features",
    )
    return {"features": np.asarray(features, np.float32), "label": split["label"]}


def contrastive_start(
    model: TextClassifier,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    cfg: ContrastiveParams,
    head_cfg: TrainHeadParams,
    *,
    batch_size: int,
    seed: int,
    balance: ClassBalance = NO_REMEDY,
) -> dict[str, Any]:
    """SetFit's start: tune ``model``'s encoder on pairs (:func:`tune_contrastively`), then
    fit a fresh head on the tuned features (``head_cfg``, as ``train_head`` does; early
    stopping on ``validation``). ``model`` changes in place; returns what happened.

    Args:
      model: a text classifier, pretrained encoder (its head is replaced).
      train, validation: token ids, masks and labels (:func:`tlflax.text.tokenize_texts`).
      cfg: ``finetune.contrastive``; ``pair_rounds`` must be positive.
      batch_size: texts per feature-extraction call.
    """
    if not isinstance(model, TextClassifier):
        raise InputError(
            f"finetune.contrastive: contrastive tuning is for text encoders; this run's model "
            f"is a {type(model).__name__} (set pair_rounds: 0)"
        )
    started = time.perf_counter()
    losses = tune_contrastively(model, train, cfg, seed=seed)
    head_train = _head_inputs(model, train, batch_size)
    head_validation = _head_inputs(model, validation, batch_size)
    num_classes = int(model.head.output.out_features)
    head = create_head(head_train["features"].shape[1], num_classes, head_cfg)
    history = train_head(head, head_train, head_validation, head_cfg, balance=balance)
    nnx.update(model.head, nnx.state(head, nnx.Param))
    best = history.summary()
    tenth = max(1, len(losses) // 10)  # tune_contrastively runs at least one step
    return {
        "pairs": int(len(losses) * cfg.batch_size),
        "steps": int(len(losses)),
        # The first and last tenth of the steps: the pair loss the tuning started and ended at.
        "first_loss": float(losses[:tenth].mean()),
        "last_loss": float(losses[-tenth:].mean()),
        "head_validation_accuracy": float(best["validation_accuracy"]),
        "head_validation_loss": float(best["validation_loss"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
