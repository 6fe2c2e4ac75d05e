"""EfficientNet-Lite0: parity with PyTorch on the real weights, layer groups, the weight
importer, the depthwise implementations, and the backbone registry.

Models are built abstractly and filled from the checkpoint (as `create_backbone` does):
random initialisation alone costs ~35 s of PRNG compilation on this CPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads
from skimage import data, transform

from tlflax.models import registry
from tlflax.models.efficientnet import (
    EfficientNetLite0,
    imagenet_weights_path,
    load_imagenet_weights,
    set_batchnorm_training,
)
from tlflax.models.layers import depthwise_conv
from tlflax.models.torch_weights import LoadReport, load_state_dict_into, read_torch_state_dict

IMPLS = ("shifted", "xla")
GROUPS = 18  # stem, 16 MBConv blocks, head conv
PARAMETERS_WITH_TOP = 4_652_008
CLASSIFIER_PARAMETERS = 1280 * 1000 + 1000
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _paths(model: nnx.Module, kind=nnx.Param) -> list[str]:
    return ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, kind))]


def _pretrained(state_dict, *, impl: str = "auto", include_top: bool = True) -> EfficientNetLite0:
    model = nnx.eval_shape(
        lambda: EfficientNetLite0(include_top=include_top, conv_impl=impl, rngs=nnx.Rngs(0))
    )
    report = load_imagenet_weights(model, state_dict)
    assert report.missing == [] and report.skipped == []
    return model


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return read_torch_state_dict(imagenet_weights_path())


@pytest.fixture(scope="module")
def models(state_dict) -> dict[str, EfficientNetLite0]:
    return {impl: _pretrained(state_dict, impl=impl) for impl in IMPLS}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """scikit-image's chelsea (a cat) and two noise images, NHWC in [0, 1]."""
    cat = transform.resize(data.chelsea(), (224, 224), anti_aliasing=True)
    noise = np.random.default_rng(0).random((2, 224, 224, 3))
    return np.concatenate([cat[None], noise]).astype(np.float32)


@pytest.fixture(scope="module")
def flax_logits(models, images) -> dict[str, np.ndarray]:
    forward = nnx.jit(lambda model, x: model(x))
    return {impl: np.asarray(forward(model, images)) for impl, model in models.items()}


# --- PyTorch reference (benchmarks/torch_reference.py) ----------------------------------


@pytest.fixture(scope="module")
def torch_logits(images) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from benchmarks.torch_reference import efficientnet_lite0

    model = efficientnet_lite0()
    model.load_state_dict(torch.load(imagenet_weights_path(), weights_only=True), strict=True)
    model.eval()
    normalised = torch.from_numpy((images * 255 - 127) / 128).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(normalised).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("impl", IMPLS)
def test_logits_match_pytorch(flax_logits, torch_logits, impl: str) -> None:
    np.testing.assert_allclose(flax_logits[impl], torch_logits, rtol=0, atol=1e-4)


def test_depthwise_impls_agree_on_the_whole_network(flax_logits) -> None:
    np.testing.assert_allclose(flax_logits["shifted"], flax_logits["xla"], rtol=0, atol=1e-4)


def test_chelsea_is_a_cat(flax_logits) -> None:
    assert int(np.argmax(flax_logits["shifted"][0])) in CAT_CLASSES


# --- Layer groups -----------------------------------------------------------------------


def test_run_groups_over_all_groups_then_pooling_equals_features(models, images) -> None:
    model = models["shifted"]
    split = 6

    @nnx.jit
    def both_ways(model, x):
        middle = model.run_groups(x, 0, split)
        pooled = jnp.mean(model.run_groups(middle, split, None), axis=(1, 2))
        return pooled, model.features(x)

    by_groups, features = both_ways(model, images[:1])
    assert features.shape == (1, EfficientNetLite0.feature_dim)
    np.testing.assert_allclose(by_groups, features, rtol=0, atol=1e-6)


def test_group_patterns_cover_every_backbone_parameter_once_in_forward_order(models) -> None:
    model = models["shifted"]
    patterns = model.group_patterns()
    assert len(patterns) == GROUPS
    assert patterns[:2] == [r"^stem/", r"^blocks/0/"] and patterns[-1] == r"^head_conv/"
    for path in _paths(model, (nnx.Param, nnx.BatchStat)):
        matches = [index for index, pattern in enumerate(patterns) if re.search(pattern, path)]
        assert len(matches) == (0 if path.startswith("classifier/") else 1), path


def test_param_paths_read_as_the_architecture(models) -> None:
    paths = set(_paths(models["shifted"], (nnx.Param, nnx.BatchStat)))
    for expected in (
        "stem/conv/kernel",
        "stem/norm/scale",
        "blocks/0/depthwise/conv/kernel",
        "blocks/3/expand/norm/mean",
        "blocks/15/project/norm/var",
        "head_conv/conv/kernel",
        "classifier/kernel",
    ):
        assert expected in paths
    assert not any(path.startswith("blocks/0/expand/") for path in paths)  # expand ratio 1
    sizes = [v.size for _, v in nnx.to_flat_state(nnx.state(models["shifted"], nnx.Param))]
    assert sum(sizes) == PARAMETERS_WITH_TOP


# --- Weight importer --------------------------------------------------------------------


def test_headless_backbone_from_registry_has_no_classifier(images) -> None:
    model, report = registry.create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0))
    assert isinstance(model, EfficientNetLite0)
    assert report.unexpected == ["_fc.weight", "_fc.bias"]
    assert report.missing == [] and report.skipped == []
    assert not any(path.startswith("classifier") for path in _paths(model))
    sizes = [v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sum(sizes) == PARAMETERS_WITH_TOP - CLASSIFIER_PARAMETERS


def test_load_report_names_missing_and_unexpected_entries(state_dict) -> None:
    edited = dict(state_dict)
    del edited["_blocks.3._bn0.running_mean"]
    edited["_extra.weight"] = np.zeros(3, np.float32)
    model = nnx.eval_shape(lambda: EfficientNetLite0(include_top=True, rngs=nnx.Rngs(0)))
    report = load_imagenet_weights(model, edited)
    assert report.missing == ["blocks/3/expand/norm/mean"]
    assert report.unexpected == ["_extra.weight"]  # num_batches_tracked is ignored, not unexpected
    assert len(report.loaded) == len(_paths(model, (nnx.Param, nnx.BatchStat))) - 1


def test_shape_mismatch_is_refused_and_leaves_the_model_untouched(models, state_dict) -> None:
    model = nnx.clone(models["shifted"])
    edited = {name: array * 2 for name, array in state_dict.items()}
    edited["_fc.weight"] = np.zeros((10, 1280), np.float32)
    with pytest.raises(ValueError) as error:
        load_imagenet_weights(model, edited)
    message = str(error.value)
    assert "classifier/kernel" in message and "'_fc.weight'" in message
    assert "(1280, 10)" in message and "(1280, 1000)" in message
    np.testing.assert_array_equal(
        model.stem.conv.kernel[...], models["shifted"].stem.conv.kernel[...]
    )


def test_dont_load_keeps_matching_parameters_and_allows_other_shapes(models, state_dict) -> None:
    model = nnx.clone(models["shifted"])
    doubled = {name: array * 2 for name, array in state_dict.items()}
    report = load_imagenet_weights(model, doubled, dont_load=[r"^head_conv/"])
    assert sorted(report.skipped) == [
        f"head_conv/{part}" for part in ("conv/kernel", "norm/bias", "norm/mean", "norm/scale", "norm/var")
    ]  # fmt: skip
    original = models["shifted"]
    np.testing.assert_array_equal(
        model.head_conv.conv.kernel[...], original.head_conv.conv.kernel[...]
    )
    np.testing.assert_array_equal(model.stem.conv.kernel[...], 2 * original.stem.conv.kernel[...])

    ten_classes = nnx.eval_shape(
        lambda: EfficientNetLite0(include_top=True, num_classes=10, rngs=nnx.Rngs(0))
    )
    report = load_imagenet_weights(ten_classes, state_dict, dont_load=[r"^classifier/"])
    assert sorted(report.skipped) == ["classifier/bias", "classifier/kernel"]
    assert report.unexpected == []


# --- Depthwise convolution --------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kernel_size", "stride", "padding"),
    [
        ((2, 7, 8, 3), 3, 1, "SAME"),
        ((2, 7, 8, 3), 3, 2, "SAME"),
        ((2, 8, 8, 4), 5, 2, "SAME"),
        ((2, 8, 9, 3), 3, 2, "VALID"),
    ],
)
def test_shifted_depthwise_matches_xla_values_and_gradients(
    shape: Sequence[int], kernel_size: int, stride: int, padding: str
) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, shape[-1])), jnp.float32)

    def loss(impl):
        return lambda x, k: jnp.sum(jnp.sin(depthwise_conv(x, k, stride, padding, impl)))

    shifted = jax.jit(jax.value_and_grad(loss("shifted"), (0, 1)))(x, kernel)
    xla = jax.jit(jax.value_and_grad(loss("xla"), (0, 1)))(x, kernel)
    for shifted_part, xla_part in zip(jax.tree.leaves(shifted), jax.tree.leaves(xla), strict=True):
        np.testing.assert_allclose(shifted_part, xla_part, rtol=1e-5, atol=1e-5)


def test_shifted_depthwise_gradient_is_numerically_right() -> None:
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)))
        kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 3)))
        check_grads(
            lambda x, k: depthwise_conv(x, k, 2, "SAME", "shifted"),
            (x, kernel),
            order=1,
            modes=["rev"],
        )


# --- BatchNorm mode ---------------------------------------------------------------------


def test_batchnorm_keeps_running_statistics_unless_switched(models, images) -> None:
    model = nnx.clone(models["shifted"])
    before = np.asarray(model.stem.norm.mean[...])
    forward = nnx.jit(lambda model, x: model(x, train=True))
    small = jnp.asarray(images[:, :32, :32])

    forward(model, small)
    np.testing.assert_array_equal(model.stem.norm.mean[...], before)

    set_batchnorm_training(model, True)
    forward(model, small)
    assert not np.allclose(model.stem.norm.mean[...], before)

    set_batchnorm_training(model, False)
    assert all(
        module.use_running_average
        for _, module in nnx.iter_graph(model)
        if isinstance(module, nnx.BatchNorm)
    )


# --- Registry ---------------------------------------------------------------------------


def test_unknown_backbone_lists_names_and_suggests_the_nearest() -> None:
    with pytest.raises(ValueError, match="did you mean 'efficientnet_lite0'") as error:
        registry.create_backbone("efficientnet_lite", rngs=nnx.Rngs(0))
    assert "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2" in str(error.value)


class _TinyBackbone(nnx.Module):
    """Two small layers, the second one absent from its 'checkpoint'."""

    feature_dim = 3

    def __init__(self, *, include_top: bool, rngs: nnx.Rngs) -> None:
        self.layer = nnx.Linear(2, 3, rngs=rngs)
        self.top = nnx.Linear(3, 4, rngs=rngs) if include_top else None


def _load_tiny(model: nnx.Module, *, dont_load: Sequence[str]) -> LoadReport:
    checkpoint = {"layer.weight": np.ones((3, 2), np.float32), "layer.bias": np.ones(3, np.float32)}
    return load_state_dict_into(
        model,
        checkpoint,
        source_key=lambda path: path.replace("/", ".").replace("kernel", "weight"),
        dont_load=dont_load,
    )


@pytest.mark.parametrize(
    ("include_top", "dont_load", "initialised"),
    [(False, (), []), (True, (), ["top"]), (False, ("^layer/bias",), ["layer/bias"])],
)
def test_create_backbone_initialises_what_the_checkpoint_leaves_unset(
    monkeypatch, include_top: bool, dont_load: tuple[str, ...], initialised: list[str]
) -> None:
    spec = registry.BackboneSpec("tiny", _TinyBackbone, 3, "image", _load_tiny)
    monkeypatch.setitem(registry._SPECS, "tiny", spec)
    model, report = registry.create_backbone(
        "tiny", include_top=include_top, dont_load=dont_load, rngs=nnx.Rngs(0)
    )
    assert report.missing == (["top/bias", "top/kernel"] if include_top else [])
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        assert isinstance(value, jax.Array), path  # nothing left abstract
        joined = "/".join(map(str, path))
        from_checkpoint = not any(joined.startswith(prefix) for prefix in initialised)
        assert np.all(np.asarray(value) == 1) == from_checkpoint, joined


def test_create_backbone_without_pretrained_weights_reports_nothing(monkeypatch) -> None:
    spec = registry.BackboneSpec("tiny", _TinyBackbone, 3, "image", _load_tiny)
    monkeypatch.setitem(registry._SPECS, "tiny", spec)
    model, report = registry.create_backbone("tiny", pretrained=False, rngs=nnx.Rngs(0))
    assert report is None and isinstance(model, _TinyBackbone)


def test_efficientnet_is_registered_with_its_packaged_weights() -> None:
    spec = registry.get_backbone_spec("efficientnet_lite0")
    assert spec.feature_dim == 1280 and spec.input_kind == "image"
    assert "efficientnet_lite0" in registry.backbone_names()
    assert imagenet_weights_path().name == "efficientnet-lite0-57934424.pth"
