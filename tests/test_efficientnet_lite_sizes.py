"""EfficientNet-Lite1 and -Lite2: parity with PyTorch on their packaged ImageNet weights,
their layer groups, and what the registry records of every Lite size.

The PyTorch side takes its stage table from TensorFlow's efficientnet_lite_builder, written
out here (not computed by tlflax's scaling rule), and loads the packaged checkpoints with
`torch.load` and `strict=True`. Small odd-sized images (72 px: 36, 18, 9, 5, 3) keep each
network's test to a few seconds (jitted: eagerly, each op would compile on its own).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from flax import nnx

from tlflax.models import registry
from tlflax.models.efficientnet import (
    LITE0_STAGES,
    VARIANTS,
    EfficientNetLite,
    imagenet_weights_path,
    lite_stages,
)

# (expand ratio, kernel, first stride, channels, blocks) per stage, as TensorFlow builds them:
# Lite1 = Lite0 deepened 1.1×; Lite2 = Lite0 widened 1.1× and deepened 1.2× (stem, head fixed).
TF_STAGES = {
    "efficientnet_lite1": ((1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 40, 3), (6, 3, 2, 80, 4),
                           (6, 5, 1, 112, 4), (6, 5, 2, 192, 5), (6, 3, 1, 320, 1)),
    "efficientnet_lite2": ((1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 48, 3), (6, 3, 2, 88, 4),
                           (6, 5, 1, 120, 4), (6, 5, 2, 208, 5), (6, 3, 1, 352, 1)),
}  # fmt: skip
# Parameters with the ImageNet classifier, counted in the packaged checkpoints.
PARAMETERS_WITH_TOP = {"efficientnet_lite1": 5_416_680, "efficientnet_lite2": 6_092_072}
BLOCKS = 21


def _torch_lite(stages):
    """EfficientNet-Lite of any stage table, named like the packaged checkpoints."""
    from torch import nn
    from torch.nn import functional

    from benchmarks.torch_reference import _lite_norm, _MBConv, _SameConv

    class Lite(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem, self._bn0 = _SameConv(3, 32, 3, 2), _lite_norm(32)
            blocks, cin = [], 32
            for expand, kernel, stride, cout, repeats in stages:
                for repeat in range(repeats):
                    blocks.append(_MBConv(cin, cout, expand, kernel, stride if repeat == 0 else 1))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head, self._bn1 = _SameConv(cin, 1280, 1), _lite_norm(1280)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, x):
            x = functional.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = functional.relu6(self._bn1(self._conv_head(x)))
            return self._fc(x.mean(dim=(2, 3)))

    return Lite()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((2, 72, 72, 3)).astype(np.float32)


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(TF_STAGES))
def test_logits_match_pytorch_on_the_packaged_weights(name: str, images: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    reference = _torch_lite(TF_STAGES[name])
    reference.load_state_dict(torch.load(imagenet_weights_path(name), weights_only=True))
    reference.eval()
    with torch.no_grad():
        normalised = torch.from_numpy((images * 255 - 127) / 128).permute(0, 3, 1, 2)
        expected = reference(normalised).numpy()

    model, report = registry.create_backbone(name, include_top=True, rngs=nnx.Rngs(0))
    assert report.missing == [] and report.unexpected == [] and report.skipped == []
    sizes = [v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sum(sizes) == PARAMETERS_WITH_TOP[name]
    logits = nnx.jit(lambda model, x: model(x))(model, images)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TF_STAGES))
def test_the_scaling_rule_gives_tensorflows_stages(name: str) -> None:
    variant = VARIANTS[name]
    assert [tuple(stage) for stage in lite_stages(variant.width, variant.depth)] == list(
        TF_STAGES[name]
    )
    assert lite_stages(1.0, 1.0) == LITE0_STAGES


def test_layer_groups_cover_every_parameter_once_in_forward_order() -> None:
    model = nnx.eval_shape(lambda: EfficientNetLite("efficientnet_lite2", rngs=nnx.Rngs(0)))
    patterns = model.group_patterns()
    assert len(patterns) == 1 + BLOCKS + 1  # stem, MBConv blocks, head conv
    assert patterns[-2:] == [rf"^blocks/{BLOCKS - 1}/", r"^head_conv/"]
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    for path_parts, _ in nnx.to_flat_state(state):
        path = "/".join(map(str, path_parts))
        assert sum(bool(re.search(pattern, path)) for pattern in patterns) == 1, path
    model.keep_groups(5)
    assert len(model.blocks) == 4 and model.head_conv is None


def test_registry_records_each_lite_size_with_its_native_resolution() -> None:
    resolutions = {
        name: registry.get_backbone_spec(name).native_resolution
        for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    }
    assert resolutions == {
        "efficientnet_lite0": 224,
        "efficientnet_lite1": 240,
        "efficientnet_lite2": 260,
    }
    for name in TF_STAGES:
        spec = registry.get_backbone_spec(name)
        assert spec.input_kind == "image" and spec.feature_dim == 1280
        assert imagenet_weights_path(name).is_file()
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite 'efficientnet_lite3'"):
        EfficientNetLite("efficientnet_lite3", rngs=nnx.Rngs(0))
