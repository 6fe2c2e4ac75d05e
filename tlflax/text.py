"""The text task: tokenization, the text classifier, feature extraction, the forward pass.

The counterpart of :mod:`tlflax.vision`. Texts are tokenized once on the host, padded or
truncated to one fixed ``max_length``, and travel as int32 ``input_ids`` and
``attention_mask`` arrays: every batch has one shape, so each jitted function compiles
once, and no step ever tokenizes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from tlflax.config import TrainHeadParams
from tlflax.data.pipeline import map_batches
from tlflax.models.bert_folder import folder_tokenizer
from tlflax.models.heads import TextClassifier
from tlflax.models.minilm import (
    load_tokenizer,
    minilm_tokenizer_path,
    pad_to_fixed_length,
    tokenize,
)
from tlflax.models.registry import create_backbone
from tlflax.taps import tap_widths
from tlflax.train import Batch, Forward, create_head

TOKEN_KEYS = ("input_ids", "attention_mask")


@functools.lru_cache(maxsize=4)
def _fixed_length_tokenizer(
    max_length: int, folder: str | None = None, truncation_side: str = "right"
) -> tokenizers.Tokenizer:
    if folder is None:
        return load_tokenizer(max_length, truncation_side)
    return pad_to_fixed_length(folder_tokenizer(folder), max_length, truncation_side)


@functools.lru_cache(maxsize=1)
def _untruncated_tokenizer() -> tokenizers.Tokenizer:
    # The packaged tokenizer.json pads and truncates to 128 by itself; counting needs neither.
    tokenizer = tokenizers.Tokenizer.from_file(str(minilm_tokenizer_path()))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenize_texts(
    texts: Sequence[str],
    max_length: int,
    checkpoint_folder: str | Path | None = None,
    truncation_side: str = "right",
) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask``, int32 (N, max_length), of MiniLM's WordPiece,
    or of the tokenizer in ``checkpoint_folder`` (a Hugging Face folder, backbone ``bert``);
    a longer text loses its end (``truncation_side`` "right") or its beginning ("left")."""
    return tokenize(fixed_length_tokenizer(max_length, checkpoint_folder, truncation_side), texts)


def fixed_length_tokenizer(
    max_length: int, checkpoint_folder: str | Path | None = None, truncation_side: str = "right"
) -> tokenizers.Tokenizer:
    """The tokenizer of :func:`tokenize_texts` (shared: do not change its settings)."""
    folder = None if checkpoint_folder is None else str(Path(checkpoint_folder).absolute())
    return _fixed_length_tokenizer(max_length, folder, truncation_side)


def count_tokens(texts: Sequence[str]) -> np.ndarray:
    """Untruncated WordPiece token counts, [CLS] and [SEP] included, int64 (N,)."""
    encodings = _untruncated_tokenizer().encode_batch(list(texts))
    return np.array([len(encoding.ids) for encoding in encodings], dtype=np.int64)


def build_text_classifier(
    backbone_name: str,
    num_classes: int,
    head_cfg: TrainHeadParams,
    *,
    pretrained: bool,
    seed: int = 0,
    taps: Sequence[int] | None = None,
    weights_path: str | Path | None = None,
) -> TextClassifier:
    """Text encoder from the backbone registry, plus a new head shaped by ``head_cfg``.

    ``seed`` also seeds the encoder's dropout stream, so a fine-tuning run is repeatable.
    ``taps``: the head reads the joined pooled outputs after these layer groups
    (:mod:`tlflax.taps`), and the layers above the highest tap are dropped; None, the
    encoder's final pooled features. ``weights_path``: the weights to load instead of the
    packaged ones (for ``bert``, the Hugging Face folder, also read with ``pretrained=False``
    for the encoder's size); see :func:`tlflax.models.registry.create_backbone`.
    """
    backbone, _ = create_backbone(
        backbone_name,
        pretrained=pretrained,
        weights_path=weights_path,
        require_every_tensor=True,
        rngs=nnx.Rngs(seed),
    )
    in_features = backbone.feature_dim
    if taps is not None:
        # The encoder is cut at its highest tap: the layers above it never run.
        backbone.keep_groups(max(taps))
        shapes = jax.eval_shape(
            lambda: pooled_after_each_group(
                backbone, jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
            )
        )
        in_features = sum(tap_widths(shapes)[tap - 1] for tap in taps)
    return TextClassifier(backbone, create_head(in_features, num_classes, head_cfg), taps)


def abstract_text_classifier(
    backbone_name: str,
    num_classes: int,
    head_cfg: TrainHeadParams,
    taps: Sequence[int] | None = None,
    weights_path: str | Path | None = None,
) -> TextClassifier:
    """The classifier's structure with shape-only weights, to restore a checkpoint into."""
    return nnx.eval_shape(
        lambda: build_text_classifier(
            backbone_name,
            num_classes,
            head_cfg,
            pretrained=False,
            taps=taps,
            weights_path=weights_path,
        )
    )


def text_forward() -> Forward:
    """The forward pass of a :class:`TextClassifier` on a batch of token ids and masks."""

    def forward(model: nnx.Module, batch: Batch, train: bool, key: jax.Array | None):
        return model(batch["input_ids"], batch["attention_mask"], train=train, dropout_key=key)

    return forward


@functools.partial(jax.jit, static_argnums=0)
def _features_step(graphdef, state, input_ids: jax.Array, attention_mask: jax.Array):
    # Module-level and keyed on graphdef: every split reuses one compilation.
    return nnx.merge(graphdef, state).features(input_ids, attention_mask, train=False)


def extract_features(
    backbone: nnx.Module,
    tokens: dict[str, np.ndarray],
    *,
    batch_size: int,
    description: str = "extract",
) -> np.ndarray:
    """Mean-pooled features (N, feature_dim) float32 of the frozen encoder, in order.

    Args:
      backbone: the text encoder (dropout off: it runs in inference mode).
      tokens: ``input_ids`` and ``attention_mask`` from :func:`tokenize_texts`.
      batch_size: texts per call; batches have one fixed shape, so this compiles once.
    """
    graphdef, state = nnx.split(backbone)
    features = map_batches(
        lambda batch: _features_step(graphdef, state, batch["input_ids"], batch["attention_mask"]),
        {key: tokens[key] for key in TOKEN_KEYS},
        batch_size=batch_size,
        description=description,
    )
    return features.astype(np.float32)


def pooled_after_each_group(
    backbone: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array
) -> list[jax.Array]:
    """Masked mean-pooled hidden states (B, D) after each group (embeddings, each layer).

    One pass through ``run_groups``, group by group (inference mode, no dropout): the depth
    probes of :mod:`tlflax.advisor` read every depth for the cost of one forward pass.
    """
    pooled, hidden = [], input_ids
    for group in range(backbone.num_groups):
        hidden = backbone.run_groups(hidden, attention_mask, group, group + 1, train=False)
        pooled.append(backbone.pool(hidden, attention_mask))
    return pooled
