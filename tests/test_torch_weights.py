"""Reading PyTorch checkpoints without torch: real files, round trips, and hostile files."""

from __future__ import annotations

import io
import os
import pickle
import shlex
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tlflax.models.efficientnet import imagenet_weights_path
from tlflax.models.torch_weights import WeightsFileError, read_torch_state_dict

LITE0_TENSORS = 296
LITE0_PARAMETERS = 4_694_073  # every tensor's elements, BatchNorm statistics included


@pytest.fixture(scope="module")
def lite0_state_dict() -> dict[str, np.ndarray]:
    return read_torch_state_dict(imagenet_weights_path())


def test_packaged_lite0_file_has_every_tensor(lite0_state_dict) -> None:
    assert len(lite0_state_dict) == LITE0_TENSORS
    assert sum(array.size for array in lite0_state_dict.values()) == LITE0_PARAMETERS
    assert lite0_state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert lite0_state_dict["_bn0.num_batches_tracked"].dtype == np.int64


@pytest.mark.torch
def test_packaged_lite0_file_matches_torch_load_exactly(lite0_state_dict) -> None:
    torch = pytest.importorskip("torch")
    expected = torch.load(imagenet_weights_path(), weights_only=True)
    assert list(lite0_state_dict) == list(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(lite0_state_dict[name], tensor.numpy(), err_msg=name)
        assert lite0_state_dict[name].dtype == tensor.numpy().dtype, name


def _assorted_state_dict(torch) -> dict:
    """Every storage type and layout the reader has to get right."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    shared = torch.arange(20, dtype=torch.int64)
    return {
        "float32": torch.randn(3, 4, generator=generator),
        "float16": torch.randn(2, 3, generator=generator).half(),
        "bfloat16": torch.randn(7, generator=generator).bfloat16(),
        "float64": torch.randn(2, 2, generator=generator).double(),
        "int64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),
        "offset_strided": base[1:5:2, 1:],
        "shared_offset": shared[7:13],
        "shared_whole": shared,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=generator)),
    }


def _assert_same(actual: dict[str, np.ndarray], expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        tensor = tensor.detach()
        if name == "bfloat16":
            assert actual[name].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(actual[name].astype(np.float32), tensor.float().numpy())
            continue
        np.testing.assert_array_equal(actual[name], tensor.numpy(), err_msg=name)
        assert actual[name].dtype == tensor.numpy().dtype, name
        assert actual[name].flags.c_contiguous and actual[name].flags.owndata, name


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trips_exactly(tmp_path: Path, zip_format: bool) -> None:
    torch = pytest.importorskip("torch")
    state = _assorted_state_dict(torch)
    path = tmp_path / "assorted.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    _assert_same(read_torch_state_dict(path), state)


@pytest.mark.torch
def test_tensor_reaching_past_its_storage_is_refused(tmp_path: Path) -> None:
    """Strides are applied with as_strided; out-of-range ones must not read stray memory."""
    torch = pytest.importorskip("torch")
    storage_marker = object()

    class CraftingPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage_marker:
                return ("storage", torch.FloatStorage, "0", "cpu", 4)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, _CraftedTensor):
                # Four floats of storage, but 3 elements 100 apart.
                arguments = (storage_marker, 0, (3,), (100,), False, OrderedDict())
                return torch._utils._rebuild_tensor_v2, arguments
            return NotImplemented

    buffer = io.BytesIO()
    CraftingPickler(buffer, protocol=2).dump({"weight": _CraftedTensor()})
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("crafted/data.pkl", buffer.getvalue())
        archive.writestr("crafted/data/0", np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(WeightsFileError, match="runs past its storage") as error:
        read_torch_state_dict(path)
    assert str(path) in str(error.value)


class _CraftedTensor:
    """Placeholder the crafting pickler turns into a hand-made tensor record."""


class _RunsShellCommand:
    """Unpickling this runs a shell command — what a hostile checkpoint would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


_SYSTEM_GLOBAL = f"{os.system.__module__}.system"  # "posix.system" on Linux


def _legacy_header() -> bytes:
    magic, protocol, system_info = 0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}
    return b"".join(pickle.dumps(part, protocol=2) for part in (magic, protocol, system_info))


@pytest.mark.parametrize("layout", ["bare_pickle", "legacy", "zip"])
def test_pickle_calling_a_foreign_global_is_refused_without_running_it(
    tmp_path: Path, layout: str
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(
        {"weight": _RunsShellCommand(f"touch {shlex.quote(str(marker))}")}, protocol=2
    )
    path = tmp_path / "evil.pth"
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("evil/data.pkl", payload)
    else:
        path.write_bytes((_legacy_header() if layout == "legacy" else b"") + payload)

    with pytest.raises(WeightsFileError) as error:
        read_torch_state_dict(path)

    assert str(error.value) == (
        f"refusing to load {path}: it references {_SYSTEM_GLOBAL}, which could execute code"
    )
    assert not marker.exists()


def test_builtins_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "eval.pth"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(WeightsFileError, match=r"references builtins\.eval"):
        read_torch_state_dict(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(WeightsFileError, match="does not exist") as error:
        read_torch_state_dict(path)
    assert str(path) in str(error.value)


def test_empty_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(WeightsFileError, match=r"empty \(0 bytes\)") as error:
        read_torch_state_dict(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "keep_fraction", [0.00001, 0.5, 0.999999], ids=["in_pickle", "in_storages", "last_bytes"]
)
def test_truncated_legacy_file_is_refused(tmp_path: Path, keep_fraction: float) -> None:
    content = imagenet_weights_path().read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(content[: int(len(content) * keep_fraction)])
    with pytest.raises(WeightsFileError, match="corrupt or truncated") as error:
        read_torch_state_dict(path)
    assert str(path) in str(error.value)


@pytest.mark.torch
def test_truncated_zip_file_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    whole = tmp_path / "whole.pth"
    torch.save({"weight": torch.ones(1000)}, whole)
    path = tmp_path / "truncated.pth"
    path.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(WeightsFileError, match="corrupt or truncated") as error:
        read_torch_state_dict(path)
    assert str(path) in str(error.value)


def test_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    path.write_bytes(_legacy_header() + pickle.dumps([1, 2, 3], protocol=2) + pickle.dumps([]))
    with pytest.raises(WeightsFileError, match="not a state dict") as error:
        read_torch_state_dict(path)
    assert str(path) in str(error.value)
