"""Weights files of every format: `read_weights` dispatch, our own `.npz` and Orbax round
trips, refusal of unsafe or broken files, and loading them through the backbone registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from tlflax.checkpoint import save_tree
from tlflax.models import registry
from tlflax.models.efficientnet import EfficientNetLite0, imagenet_weights_path
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.minilm import MiniLM
from tlflax.models.musicnn import musicnn_checkpoint_path
from tlflax.models.small_cnn import SmallCNN
from tlflax.models.torch_weights import WeightsFileError
from tlflax.models.weights import (
    flax_weights,
    is_flax_layout,
    load_flax_weights,
    read_weights,
    write_npz,
)

WIDTHS = (4, 8)


def _small_cnn(seed: int) -> SmallCNN:
    model = SmallCNN(widths=WIDTHS, rngs=nnx.Rngs(seed))
    # Non-default BatchNorm statistics, so that a round trip that drops them shows.
    model.blocks[1].norm.mean[...] = np.arange(WIDTHS[1], dtype=np.float32)
    return model


def _assert_same_weights(model: nnx.Module, expected: nnx.Module) -> None:
    ours, theirs = flax_weights(model), flax_weights(expected)
    assert list(ours) == list(theirs)
    for path, value in ours.items():
        np.testing.assert_array_equal(value, theirs[path], err_msg=path)


@pytest.mark.parametrize("save", ["npz", "orbax"])
def test_our_own_weights_round_trip(tmp_path: Path, save: str) -> None:
    source = _small_cnn(seed=0)
    if save == "npz":
        path = tmp_path / "weights.npz"
        write_npz(path, flax_weights(source))
    else:
        path = tmp_path / "checkpoint"
        save_tree(path, nnx.state(source))
    arrays = read_weights(path)
    assert is_flax_layout(arrays) and "blocks/1/norm/mean" in arrays
    target = _small_cnn(seed=1)
    report = load_flax_weights(target, arrays)
    assert report.missing == [] and report.unexpected == [] and report.skipped == []
    _assert_same_weights(target, source)


def test_orbax_state_with_dropout_rngs_loads_without_them(tmp_path: Path) -> None:
    def tiny_minilm(seed: int) -> MiniLM:
        sizes = dict(num_layers=1, hidden=8, heads=2, intermediate=8, vocab_size=10)
        return MiniLM(**sizes, max_positions=4, rngs=nnx.Rngs(seed))

    source = tiny_minilm(0)
    save_tree(tmp_path / "minilm", nnx.state(source))
    arrays = read_weights(tmp_path / "minilm")
    assert not any("rngs/key" in name for name in arrays)  # PRNG keys are not weights
    target = tiny_minilm(1)
    report = load_flax_weights(target, arrays)
    assert report.unexpected == [] and report.missing == []
    _assert_same_weights(target, source)


def test_a_classifier_checkpoint_gives_its_backbone_through_the_registry(tmp_path: Path) -> None:
    source = ImageClassifier(_small_cnn(seed=0), Head(WIDTHS[-1], 3, rngs=nnx.Rngs(0)))
    save_tree(tmp_path / "model", nnx.state(source))
    model, report = registry.create_backbone(
        "small_cnn", weights_path=tmp_path / "model", widths=WIDTHS, rngs=nnx.Rngs(1)
    )
    assert sorted(report.unexpected) == ["head/output/bias", "head/output/kernel"]
    _assert_same_weights(model, source.backbone)


def test_pickled_object_arrays_in_an_npz_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "hostile.npz"
    np.savez(path, payload=np.array([{"not": "an array"}], dtype=object))
    with pytest.raises(WeightsFileError, match=r"refusing to load .*hostile\.npz.*pickled"):
        read_weights(path)


def test_read_weights_dispatches_on_the_format(tmp_path: Path) -> None:
    torch_names = read_weights(imagenet_weights_path())
    assert torch_names["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert not is_flax_layout(torch_names)
    tensors = {"encoder.weight": np.ones((2, 3), np.float32)}
    save_file(tensors, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(read_weights(tmp_path / "model.safetensors")["encoder.weight"], 1)
    np.savez(tmp_path / "converted.npz", **tensors)
    assert read_weights(tmp_path / "converted.npz").keys() == tensors.keys()


@pytest.mark.parametrize("name", ["model.pth", "model.bin", "model.safetensors", "model.npz"])
def test_corrupt_files_are_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 this is not really a weights file")
    with pytest.raises(WeightsFileError, match=name.replace(".", r"\.")):
        read_weights(path)


def test_missing_paths_and_unknown_formats_are_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match=r"absent\.pth does not exist"):
        read_weights(tmp_path / "absent.pth")
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(WeightsFileError, match=r"weights\.h5.*'\.h5'.*\.npz"):
        read_weights(tmp_path / "weights.h5")
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(WeightsFileError, match="not_a_checkpoint is not an Orbax"):
        read_weights(tmp_path / "not_a_checkpoint")


def test_a_multi_item_step_folder_names_its_items(tmp_path: Path) -> None:
    step = tmp_path / "run" / "3"
    save_tree(step / "model", {"kernel": np.zeros(2, np.float32)})
    with pytest.raises(WeightsFileError, match=r"items \['model'\]: pass one of them"):
        read_weights(step)


# --- Registry --------------------------------------------------------------------------


def test_every_family_is_registered() -> None:
    assert registry.backbone_names() == [
        "bert",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "minilm_l6",
        "musicnn_vgg",
        "musicnn_vgg_msd",
        "resnet18",
        "resnet50",
        "small_cnn",
    ]
    assert registry.get_backbone_spec("minilm_l6").input_kind == "text"
    assert registry.get_backbone_spec("minilm_l6").feature_dim == 384
    assert registry.get_backbone_spec("musicnn_vgg_msd").input_kind == "audio"
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        registry.get_backbone_spec("resnet5")


def test_constructor_options_reach_the_model() -> None:
    model, _ = registry.create_backbone("efficientnet_lite0", conv_impl="xla", rngs=nnx.Rngs(0))
    assert isinstance(model, EfficientNetLite0) and model.blocks[0].depthwise.conv.impl == "xla"
    small, report = registry.create_backbone(
        "small_cnn", pretrained=False, widths=WIDTHS, rngs=nnx.Rngs(0)
    )
    assert report is None and small.feature_dim == WIDTHS[-1]


def test_backbones_without_a_classifier_refuse_include_top() -> None:
    with pytest.raises(ValueError, match="'small_cnn' has no original classifier"):
        registry.create_backbone("small_cnn", pretrained=False, include_top=True, rngs=nnx.Rngs(0))


def test_foreign_names_for_a_backbone_without_an_importer_are_refused() -> None:
    model = _small_cnn(seed=0)
    with pytest.raises(ValueError, match="'small_cnn' loads only weights saved by tlflax"):
        registry.load_backbone_weights(model, "small_cnn", {"conv1.weight": np.zeros(1)})


def test_tensorflow_names_go_to_the_importer_and_ours_load_directly(tmp_path: Path) -> None:
    # TensorFlow's names hold a '/' like ours ("1CNN/kernel"): the registry must still
    # route them to musicnn's importer, from the checkpoint folder, its .index or an .npz.
    folder = musicnn_checkpoint_path("MSD_vgg")
    expected, _ = registry.create_backbone("musicnn_vgg_msd", rngs=nnx.Rngs(0))
    arrays = read_weights(folder)
    assert "1CNN/kernel" in arrays and is_flax_layout(arrays)
    np.savez(tmp_path / "tensorflow_names.npz", **arrays)
    write_npz(tmp_path / "ours.npz", flax_weights(expected))
    for path in (
        folder,
        folder / ".index",
        tmp_path / "tensorflow_names.npz",
        tmp_path / "ours.npz",
    ):
        model, report = registry.create_backbone("musicnn_vgg", weights_path=path, rngs=nnx.Rngs(1))
        assert report.missing == [], path
        _assert_same_weights(model, expected)
