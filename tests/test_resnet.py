"""ResNet-18/50 against a plain-PyTorch ResNet written here, through `torch.save` and our reader.

The PyTorch side is torchvision's architecture written out (torchvision is not installed),
with random weights and random BatchNorm statistics so that every tensor matters. Sizes
are odd on purpose (72 px: 36, 18, 9, 5, 3) so padding and pooling arithmetic is checked.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from flax import nnx

from tlflax.models import registry
from tlflax.models.resnet import ResNet, load_resnet_weights
from tlflax.models.torch_weights import read_torch_state_dict
from tlflax.models.weights import flax_weights, write_npz

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

NUM_CLASSES = 1000
RESNET18_GROUPS = 1 + 8  # stem + 2·4 basic blocks
RESNET50_GROUPS = 1 + 16  # stem + 3+4+6+3 bottlenecks


def _torch_resnet(variant: str) -> torch.nn.Module:
    """torchvision's ResNet (v1.5) with the same module names, built from plain torch.nn."""
    nn = torch.nn

    def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)

    class Block(nn.Module):
        def __init__(self, cin: int, width: int, stride: int, bottleneck: bool):
            super().__init__()
            cout = width * (4 if bottleneck else 1)
            kernels = (1, 3, 1) if bottleneck else (3, 3)
            widths = (cin, width, width, cout) if bottleneck else (cin, width, cout)
            strides = (1, stride, 1) if bottleneck else (stride, 1)
            for index, (kernel, step) in enumerate(zip(kernels, strides, strict=True), 1):
                setattr(self, f"conv{index}", conv(widths[index - 1], widths[index], kernel, step))
                setattr(self, f"bn{index}", nn.BatchNorm2d(widths[index]))
            self.count = len(kernels)
            self.downsample = (
                nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else None
            )

        def forward(self, x):
            out = x
            for index in range(1, self.count + 1):
                out = getattr(self, f"bn{index}")(getattr(self, f"conv{index}")(out))
                out = torch.relu(out) if index < self.count else out
            shortcut = self.downsample(x) if self.downsample is not None else x
            return torch.relu(out + shortcut)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            bottleneck = variant == "resnet50"
            depths = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
            self.conv1, self.bn1 = conv(3, 64, 7, 2), nn.BatchNorm2d(64)
            cin = 64
            for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
                blocks = []
                for index in range(depth):
                    blocks.append(Block(cin, width, 2 if stage and not index else 1, bottleneck))
                    cin = width * (4 if bottleneck else 1)
                setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, NUM_CLASSES)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = nn.functional.max_pool2d(x, 3, 2, 1)
            for stage in range(1, 5):
                x = getattr(self, f"layer{stage}")(x)
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Net()
    # Random BatchNorm statistics and affine terms, so that a swapped mean/var shows.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = torch.from_numpy(((images - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(normalised).numpy()


def _paths(model: nnx.Module) -> list[str]:
    return list(flax_weights(model))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((2, 72, 72, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    model = _torch_resnet("resnet18")
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return str(path), model


@pytest.fixture(scope="module")
def state_dict(resnet18_file) -> dict[str, np.ndarray]:
    return read_torch_state_dict(resnet18_file[0])


@pytest.fixture(scope="module")
def loaded(state_dict) -> ResNet:
    model = nnx.eval_shape(lambda: ResNet("resnet18", include_top=True, rngs=nnx.Rngs(0)))
    report = load_resnet_weights(model, state_dict)
    assert report.missing == [] and report.unexpected == [] and report.skipped == []
    return model


def test_resnet18_logits_match_pytorch(loaded, resnet18_file, images) -> None:
    ours = np.asarray(nnx.jit(lambda model, x: model(x))(loaded, images))
    np.testing.assert_allclose(ours, _torch_logits(resnet18_file[1], images), rtol=0, atol=1e-4)


def test_resnet50_from_a_weights_file_matches_pytorch(tmp_path) -> None:
    reference = _torch_resnet("resnet50")
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model, report = registry.create_backbone(
        "resnet50", include_top=True, weights_path=path, rngs=nnx.Rngs(0)
    )
    tensors = [key for key in reference.state_dict() if not key.endswith("num_batches_tracked")]
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(tensors)
    images = np.random.default_rng(1).random((2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda model, x: model(x))(model, images))
    np.testing.assert_allclose(ours, _torch_logits(reference, images), rtol=0, atol=1e-4)
    assert model.feature_dim == registry.get_backbone_spec("resnet50").feature_dim == 2048
    assert len(model.group_patterns()) == RESNET50_GROUPS


def test_without_top_the_classifier_is_dropped_and_fc_reported(resnet18_file) -> None:
    model, report = registry.create_backbone(
        "resnet18", weights_path=resnet18_file[0], rngs=nnx.Rngs(0)
    )
    assert report.unexpected == ["fc.weight", "fc.bias"]
    assert report.missing == [] and not any(p.startswith("classifier/") for p in _paths(model))


def test_load_report_names_missing_and_unexpected_keys(state_dict) -> None:
    edited = dict(state_dict)
    del edited["layer2.0.downsample.1.running_var"]
    edited["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    model = nnx.eval_shape(lambda: ResNet("resnet18", include_top=True, rngs=nnx.Rngs(0)))
    report = load_resnet_weights(model, edited)
    assert report.missing == ["blocks/2/downsample/norm/var"]
    assert report.unexpected == ["layer5.0.conv1.weight"]  # num_batches_tracked: ignored


def test_shape_mismatch_is_refused_unless_dont_load(state_dict) -> None:
    ten_classes = nnx.eval_shape(
        lambda: ResNet("resnet18", include_top=True, num_classes=10, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match=r"classifier/bias.*'fc.bias'.*\(1000,\).*\(10,\)"):
        load_resnet_weights(ten_classes, state_dict)
    report = load_resnet_weights(ten_classes, state_dict, dont_load=[r"^classifier/"])
    assert report.skipped == ["classifier/bias", "classifier/kernel"]


def test_group_patterns_cover_every_parameter_once_and_groups_compose(loaded, images) -> None:
    patterns = loaded.group_patterns()
    assert len(patterns) == RESNET18_GROUPS
    for path in _paths(loaded):
        matches = sum(bool(re.search(pattern, path)) for pattern in patterns)
        assert matches == (0 if path.startswith("classifier/") else 1), path

    @nnx.jit
    def both_ways(model, x):
        middle = model.run_groups(x, 0, 4)
        return model.run_groups(middle, 4, None).mean(axis=(1, 2)), model.features(x)

    by_groups, features = both_ways(loaded, images)
    assert features.shape == (2, 512)
    np.testing.assert_allclose(by_groups, features, rtol=0, atol=1e-6)


def test_our_own_npz_loads_through_the_registry(loaded, tmp_path) -> None:
    path = tmp_path / "resnet18.npz"
    write_npz(path, flax_weights(loaded))
    model = nnx.eval_shape(lambda: ResNet("resnet18", include_top=True, rngs=nnx.Rngs(0)))
    report = registry.load_backbone_weights(model, "resnet18", path)
    assert report.missing == [] and report.unexpected == []
    np.testing.assert_array_equal(
        model.blocks[3].conv2.kernel[...], loaded.blocks[3].conv2.kernel[...]
    )


def test_resnet_ships_no_weights_so_pretrained_needs_a_file() -> None:
    with pytest.raises(ValueError, match="ships no pretrained weights: pass weights_path="):
        registry.create_backbone("resnet18", rngs=nnx.Rngs(0))
