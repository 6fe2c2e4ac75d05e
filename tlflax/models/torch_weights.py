"""PyTorch checkpoints without PyTorch: a safe reader and a name-mapping loader.

`read_torch_state_dict` reads `.pth`/`.bin` state dicts written by `torch.save`, in the
legacy (pre-1.6) layout and in the zip layout, into NumPy arrays. It never imports torch
and never runs code from the file: pickles are read by an unpickler that only resolves
the handful of globals a tensor needs and refuses anything else by name.

`load_state_dict_into` copies such a state dict into an NNX module through a per-model
name mapping, and says what it did in a `LoadReport`. It lives, with the PyTorch name and
layout conventions, in `tlflax.models.state_dict_loader` and is re-exported from here.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from tlflax.errors import InputError
from tlflax.models.state_dict_loader import (
    TORCH_LEAF_NAMES,
    LoadReport,
    load_state_dict_into,
    torch_layout_to_flax,
)

__all__ = [
    "TORCH_LEAF_NAMES",
    "LoadReport",
    "WeightsFileError",
    "load_state_dict_into",
    "read_torch_state_dict",
    "torch_layout_to_flax",
]

# The first pickle of a legacy file is this number (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_ZIP_MAGIC = b"PK\x03\x04"

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class WeightsFileError(InputError):
    """A weights file is missing, corrupt, truncated, or unsafe to load. Names the file."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a `torch.*Storage` class: all the pickle needs from it is the dtype."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage the pickle points at; its bytes are read after the pickle (legacy) or beside it (zip)."""

    key: str
    dtype: np.dtype
    num_elements: int


@dataclass(frozen=True)
class _PendingTensor:
    """What `_rebuild_tensor_v2` would build, kept as metadata until the storages are read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(
    storage: _StorageRef, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], *_: Any
) -> _PendingTensor:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor built from {type(storage).__name__}, not a storage")
    return _PendingTensor(storage, int(offset), tuple(shape), tuple(strides))


def _rebuild_parameter(data: _PendingTensor, *_: Any) -> _PendingTensor:
    # A Parameter is a tensor plus `requires_grad`; the values are all a state dict needs.
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals that rebuild tensors; any other global is refused by name.

    Refusing in `find_class` means a hostile `__reduce__` (say `os.system`) is never even
    looked up, let alone called.
    """

    _ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
        **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    }

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsFileError(
                f"refusing to load {self._path}: it references {module}.{name}, "
                "which could execute code"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # pid = ("storage", storage type, key, location, numel[, view metadata (legacy)]).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key, num_elements = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (PyTorch < 0.4) are not supported")
        return _StorageRef(str(key), storage_type.dtype, int(num_elements))


def _unpickle(data: bytes | BinaryIO, path: Path) -> Any:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    return _RestrictedUnpickler(stream, path).load()


def _tensor_from_storage(tensor: _PendingTensor, storage: np.ndarray) -> np.ndarray:
    """Applies a tensor's offset, shape and strides to its storage, as an owned copy."""
    if any(size < 0 for size in tensor.shape) or any(step < 0 for step in tensor.strides):
        raise ValueError(f"negative shape {tensor.shape} or strides {tensor.strides}")
    if len(tensor.shape) != len(tensor.strides):
        raise ValueError(f"shape {tensor.shape} and strides {tensor.strides} differ in rank")
    if 0 in tensor.shape:
        return np.zeros(tensor.shape, storage.dtype)
    last_index = tensor.offset + sum(
        (n - 1) * s for n, s in zip(tensor.shape, tensor.strides, strict=True)
    )
    # as_strided reads raw memory: an index past the storage would read someone else's bytes.
    if tensor.offset < 0 or last_index >= storage.size:
        raise ValueError(
            f"tensor of shape {tensor.shape} at offset {tensor.offset} runs past its storage "
            f"of {storage.size} elements"
        )
    byte_strides = tuple(step * storage.itemsize for step in tensor.strides)
    view = np.lib.stride_tricks.as_strided(
        storage[tensor.offset :], tensor.shape, byte_strides, writeable=False
    )
    return view.copy()


def _materialise(state: Any, storages: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise WeightsFileError(
            f"{path} holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)"
        )
    arrays = {}
    for name, value in state.items():
        if not isinstance(value, _PendingTensor):
            raise WeightsFileError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; "
                "only flat state dicts are supported"
            )
        arrays[str(name)] = _tensor_from_storage(value, storages[value.storage.key])
    return arrays


def _storage_refs(state: Any) -> dict[str, _StorageRef]:
    values = state.values() if isinstance(state, dict) else ()
    return {v.storage.key: v.storage for v in values if isinstance(v, _PendingTensor)}


def _read_legacy(file: BinaryIO, path: Path) -> dict[str, np.ndarray]:
    """Legacy layout: pickles of magic, protocol, sys info, the object, storage keys; then raw storages."""
    if _unpickle(file, path) != _LEGACY_MAGIC_NUMBER:
        raise WeightsFileError(f"{path} is not a PyTorch weights file (wrong magic number)")
    _unpickle(file, path)  # protocol version: nothing in it changes how we read
    system_info = _unpickle(file, path)
    byte_order = "<" if system_info.get("little_endian", True) else ">"
    state = _unpickle(file, path)
    storage_keys = _unpickle(file, path)
    refs = _storage_refs(state)
    storages = {}
    for key in storage_keys:
        ref = refs.get(key)
        if ref is None:
            raise ValueError(f"storage {key!r} is listed but no tensor uses it")
        (stored_count,) = struct.unpack(byte_order + "q", _read_exactly(file, 8))
        if stored_count != ref.num_elements:
            raise ValueError(
                f"storage {key!r} holds {stored_count} elements, expected {ref.num_elements}"
            )
        raw = _read_exactly(file, stored_count * ref.dtype.itemsize)
        storages[key] = _array_from_bytes(raw, ref.dtype, big_endian=byte_order == ">")
    return _materialise(state, storages, path)


def _array_from_bytes(raw: bytes, dtype: np.dtype, *, big_endian: bool) -> np.ndarray:
    array = np.frombuffer(raw, dtype)
    # Swap bytes rather than use a '>' dtype: ml_dtypes' bfloat16 has no big-endian variant.
    return array.byteswap() if big_endian else array


def _read_exactly(file: BinaryIO, num_bytes: int) -> bytes:
    data = file.read(num_bytes)
    if len(data) != num_bytes:
        raise EOFError(f"needed {num_bytes} bytes, the file had {len(data)} left")
    return data


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    """Zip layout: `<prefix>/data.pkl` plus one `<prefix>/data/<key>` entry per storage."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise WeightsFileError(
                f"{path}: expected one '<prefix>/data.pkl' entry, found {pickles}"
            )
        prefix = pickles[0].removesuffix("data.pkl")
        state = _unpickle(archive.read(pickles[0]), path)
        byte_order_entry = prefix + "byteorder"
        big_endian = (
            byte_order_entry in archive.namelist()
            and archive.read(byte_order_entry).strip() == b"big"
        )
        storages = {}
        for key, ref in _storage_refs(state).items():
            raw = archive.read(f"{prefix}data/{key}")
            expected_bytes = ref.num_elements * ref.dtype.itemsize
            if len(raw) != expected_bytes:
                raise ValueError(f"storage {key!r} has {len(raw)} bytes, expected {expected_bytes}")
            storages[key] = _array_from_bytes(raw, ref.dtype, big_endian=big_endian)
    return _materialise(state, storages, path)


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (`torch.save` output) into NumPy arrays, without torch.

    Both the legacy (pre-1.6) and the zip layouts are read; tensors come back as owned,
    C-contiguous arrays with their strides and offsets applied. bfloat16 becomes
    `ml_dtypes.bfloat16`.

    Args:
      path: the `.pth` / `.bin` file.

    Returns:
      The state dict, name → array, in file order.

    Raises:
      WeightsFileError: the file is missing, empty, corrupt, truncated, not a flat state dict,
        or references a global that is not needed to rebuild tensors (nothing from it is run).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"weights file {path} is empty (0 bytes)")
    try:
        with path.open("rb") as file:
            # Judge by the first bytes, as torch does: a legacy file's raw storages could
            # happen to contain what `zipfile.is_zipfile` looks for at the end.
            if file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
                return _read_zip(path)
            file.seek(0)
            return _read_legacy(file, path)
    except WeightsFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, struct.error, zipfile.BadZipFile) as error:  # fmt: skip
        raise WeightsFileError(
            f"weights file {path} is corrupt or truncated: {type(error).__name__}: {error}"
        ) from error
