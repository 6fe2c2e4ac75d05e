"""TensorFlow checkpoints without TensorFlow: a reader of the tensor-bundle format.

A TensorFlow checkpoint `<prefix>` is two kinds of file, written by `tf.train.Saver`
(TF1) and `tf.train.Checkpoint` (TF2) alike:

* `<prefix>.index`: an SSTable (LevelDB's table format) mapping each tensor name to a
  `BundleEntryProto` (dtype, shape, shard, offset, size, CRC-32C), plus a header entry
  under the empty key (a `BundleHeaderProto`: number of shards, byte order).
* `<prefix>.data-<shard>-of-<shards>`: the tensors' raw bytes, back to back.

`read_tf_checkpoint` parses both with a few dozen lines of byte handling: the SSTable's
footer, blocks (prefix-compressed keys) and CRCs, and the protobuf wire format of the two
messages. Nothing from the files is executed, and neither TensorFlow nor protobuf is
needed. Numeric tensors only: string, resource and variant tensors, partitioned variables
(saved as slices) and compressed index blocks (which TensorFlow never writes) are refused
by name.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from tlflax.models.torch_weights import WeightsFileError

__all__ = ["read_tf_checkpoint"]

# LevelDB table layout: a 48-byte footer (two block handles, padded) ending in this magic,
# and after every block a 1-byte compression type and a 4-byte masked CRC-32C.
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5
_NO_COMPRESSION = 0
_SNAPPY_COMPRESSION = 1

# tensorflow/core/framework/types.proto: DataType numbers of the numeric dtypes.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    8: np.dtype(np.complex64),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    14: np.dtype(ml_dtypes.bfloat16),
    17: np.dtype(np.uint16),
    18: np.dtype(np.complex128),
    19: np.dtype(np.float16),
    22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
}
_UNSUPPORTED_DTYPE_NAMES = {7: "string", 20: "resource", 21: "variant"}

_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reversed
_CRC32C_MASK_DELTA = 0xA282EAD8  # LevelDB/TensorFlow store CRCs "masked" with this
# Long inputs are checked as rows of this many bytes, all rows at once (see `_crc32c`).
_CRC_ROW_BYTES = 256


def _crc32c_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # one bit at a time, least significant first (a reflected CRC)
        table = np.where(table & 1, (table >> 1) ^ _CRC32C_POLYNOMIAL, table >> 1)
    return table.astype(np.uint32)


_CRC32C_TABLE = _crc32c_table()
_CRC32C_TABLE_LIST = _CRC32C_TABLE.tolist()


def _extend_register(register: int, data: bytes) -> int:
    for byte in data:
        register = _CRC32C_TABLE_LIST[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


@functools.cache
def _zero_row_shift() -> list[list[int]]:
    """The register after `_CRC_ROW_BYTES` zero bytes, as four lookup tables: the image of
    every value of each byte of the register before (the map is linear over GF(2), so the
    images of the four bytes XOR)."""
    registers = np.arange(256, dtype=np.uint32) << np.array([[0], [8], [16], [24]], np.uint32)
    for _ in range(_CRC_ROW_BYTES):
        registers = _CRC32C_TABLE[registers & 0xFF] ^ (registers >> 8)
    return registers.tolist()


def _crc32c(data: bytes | bytearray) -> int:
    """CRC-32C of `data`. A byte loop in Python would take ~1 s for 7 MB, so whole rows run
    side by side in NumPy, each from a zero register; the CRC register is linear over GF(2),
    so the rows' registers then chain as register = shift(register) ^ row_register."""
    head = len(data) % _CRC_ROW_BYTES
    register = _extend_register(0xFFFFFFFF, data[:head])
    rows = np.frombuffer(data, np.uint8, offset=head).reshape(-1, _CRC_ROW_BYTES)
    if not len(rows):
        return register ^ 0xFFFFFFFF
    row_registers = np.zeros(len(rows), np.uint32)
    for column in rows.T:
        row_registers = _CRC32C_TABLE[(row_registers ^ column) & 0xFF] ^ (row_registers >> 8)
    byte0, byte1, byte2, byte3 = _zero_row_shift()
    for row_register in row_registers.tolist():
        register = (
            byte0[register & 0xFF]
            ^ byte1[register >> 8 & 0xFF]
            ^ byte2[register >> 16 & 0xFF]
            ^ byte3[register >> 24]
            ^ row_register
        )
    return register ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    rotated = (masked - _CRC32C_MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


# --- Protobuf wire format: just what the index needs -------------------------


def _take(data: bytes, position: int, size: int) -> tuple[bytes, int]:
    end = position + size
    if size < 0 or end > len(data):
        raise ValueError(f"needed {size} bytes at offset {position}, only {len(data)} in all")
    return data[position:end], end


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("a varint runs past the end of its buffer")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("a varint is longer than 10 bytes")


def _proto_fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs: an int for varint/fixed fields, bytes for length-delimited."""
    position = 0
    while position < len(message):
        key, position = _read_varint(message, position)
        wire_type = key & 7
        if wire_type == 0:
            value, position = _read_varint(message, position)
        elif wire_type in (1, 5):
            raw, position = _take(message, position, 8 if wire_type == 1 else 4)
            value = int.from_bytes(raw, "little")
        elif wire_type == 2:
            length, position = _read_varint(message, position)
            value, position = _take(message, position, length)
        else:
            raise ValueError(f"protobuf wire type {wire_type} (field {key >> 3}) is not supported")
        yield key >> 3, value


def _as_int(value: int | bytes, *, signed: bool = False) -> int:
    if not isinstance(value, int):
        raise ValueError("a protobuf field holds bytes where a number belongs")
    # int64 fields carry negative numbers as 64-bit two's complement.
    return value - (1 << 64) if signed and value >= 1 << 63 else value


def _as_bytes(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("a protobuf field holds a number where a message belongs")
    return value


# --- The SSTable --------------------------------------------------------------------------


def _read_block_handle(data: bytes, position: int) -> tuple[tuple[int, int], int]:
    offset, position = _read_varint(data, position)
    size, position = _read_varint(data, position)
    return (offset, size), position


def _read_block(table: bytes, handle: tuple[int, int]) -> bytes:
    """A block's contents, CRC-checked."""
    offset, size = handle
    trailer_end = offset + size + _BLOCK_TRAILER_SIZE
    if trailer_end > len(table) - _FOOTER_SIZE:
        raise ValueError(f"the block at offset {offset} ({size} bytes) runs past the table")
    contents = table[offset : offset + size]
    compression = table[offset + size]
    (stored_crc,) = struct.unpack("<I", table[offset + size + 1 : trailer_end])
    if _crc32c(table[offset : offset + size + 1]) != _unmask_crc(stored_crc):
        raise ValueError(f"the block at offset {offset} fails its CRC-32C check")
    if compression != _NO_COMPRESSION:
        # TensorFlow writes bundle indexes uncompressed (BundleWriter::Finish); a compressed
        # block means another writer, and decoding it is left to TensorFlow.
        kind = {_SNAPPY_COMPRESSION: "Snappy"}.get(compression, f"type {compression}")
        raise ValueError(
            f"the block at offset {offset} is {kind}-compressed, which this reader does not "
            "decode (TensorFlow writes checkpoint indexes uncompressed)"
        )
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A block's (key, value) pairs. Each key is stored as the number of leading bytes it
    shares with the previous key plus the rest; a restart array closes the block."""
    if len(block) < 4:
        raise ValueError(f"a block of {len(block)} bytes has no restart count")
    (restarts,) = struct.unpack("<I", block[-4:])
    entries_end = len(block) - 4 * (restarts + 1)
    if entries_end < 0:
        raise ValueError(f"a block of {len(block)} bytes claims {restarts} restart points")
    entries, key, position = block[:entries_end], b"", 0
    while position < entries_end:
        shared, position = _read_varint(entries, position)
        unshared, position = _read_varint(entries, position)
        value_length, position = _read_varint(entries, position)
        if shared > len(key):
            raise ValueError(f"a key shares {shared} bytes with a previous key of {len(key)}")
        key_rest, position = _take(entries, position, unshared)
        value, position = _take(entries, position, value_length)
        key = key[:shared] + key_rest
        yield key, value


def _table_items(table: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(table) < _FOOTER_SIZE:
        raise ValueError(f"{len(table)} bytes is shorter than an SSTable footer")
    (magic,) = struct.unpack("<Q", table[-8:])
    if magic != _TABLE_MAGIC:
        raise ValueError("it does not end in the SSTable magic number (truncated, or no index)")
    footer = table[-_FOOTER_SIZE:]
    _, position = _read_block_handle(footer, 0)  # the meta-index block: unused by bundles
    index_handle, _ = _read_block_handle(footer, position)
    for _, handle_bytes in _block_entries(_read_block(table, index_handle)):
        handle, _ = _read_block_handle(handle_bytes, 0)
        yield from _block_entries(_read_block(table, handle))


# --- Bundle entries -----------------------------------------------------------------------


@dataclass(frozen=True)
class _BundleEntry:
    """What `BundleEntryProto` says about one tensor (tensor_bundle.proto)."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    masked_crc32c: int | None = None
    sliced: bool = False


def _parse_shape(message: bytes) -> tuple[int, ...]:
    dims = []
    for field, value in _proto_fields(message):
        if field == 3 and _as_int(value):
            raise ValueError("a tensor of unknown rank")
        if field == 2:
            sizes = [_as_int(v, signed=True) for f, v in _proto_fields(_as_bytes(value)) if f == 1]
            dims.append(sizes[-1] if sizes else 0)
    if any(size < 0 for size in dims):
        raise ValueError(f"a tensor of unknown dimensions {dims}")
    return tuple(dims)


def _parse_entry(message: bytes) -> _BundleEntry:
    fields: dict[str, object] = {}
    names = {1: "dtype", 3: "shard_id", 4: "offset", 5: "size", 6: "masked_crc32c"}
    for field, value in _proto_fields(message):
        if field in names:
            fields[names[field]] = _as_int(value, signed=field in (4, 5))
        elif field == 2:
            fields["shape"] = _parse_shape(_as_bytes(value))
        elif field == 7:
            fields["sliced"] = True
    return _BundleEntry(**fields)


def _parse_header(message: bytes) -> tuple[int, bool]:
    """(number of data shards, whether the data is big-endian) from `BundleHeaderProto`."""
    fields = {field: value for field, value in _proto_fields(message) if field in (1, 2)}
    return _as_int(fields.get(1, 1)), _as_int(fields.get(2, 0)) == 1


def _checked_entry(name: str, entry: _BundleEntry, num_shards: int) -> _BundleEntry:
    if entry.sliced:
        raise ValueError(f"tensor {name!r} is a partitioned variable (saved as slices)")
    if entry.dtype not in _DTYPES:
        dtype = _UNSUPPORTED_DTYPE_NAMES.get(entry.dtype, f"DataType {entry.dtype}")
        raise ValueError(f"tensor {name!r} has dtype {dtype}, which only TensorFlow can read")
    expected_size = math.prod(entry.shape) * _DTYPES[entry.dtype].itemsize
    if entry.size != expected_size or entry.offset < 0:
        raise ValueError(
            f"tensor {name!r} of shape {entry.shape} claims {entry.size} bytes at offset "
            f"{entry.offset}; its dtype needs {expected_size}"
        )
    if not 0 <= entry.shard_id < num_shards:
        raise ValueError(f"tensor {name!r} is in shard {entry.shard_id} of {num_shards}")
    return entry


def _read_index(index_path: Path) -> tuple[dict[str, _BundleEntry], int, bool]:
    """The entries by tensor name (in file order), the number of shards, big-endianness."""
    items = iter(_table_items(index_path.read_bytes()))
    first_key, header = next(items, (None, b""))
    if first_key != b"":
        raise ValueError("the index has no header entry (the empty key) first")
    num_shards, big_endian = _parse_header(header)
    entries = {}
    for key, value in items:
        name = key.decode("utf-8", errors="replace")
        entries[name] = _checked_entry(name, _parse_entry(value), num_shards)
    return entries, num_shards, big_endian


def _index_path(prefix: str | Path) -> Path:
    text = os.fspath(prefix)
    # TensorFlow joins names as strings: the prefix "MTT_vgg/" (a folder) gives "MTT_vgg/.index".
    if Path(text).is_dir():
        text = os.path.join(text, "")
    return Path(text if text.endswith(".index") else text + ".index")


def _read_tensor(file: BinaryIO, entry: _BundleEntry, name: str, big_endian: bool) -> np.ndarray:
    # Checked before allocating: a corrupt size must not ask for terabytes.
    if entry.offset + entry.size > os.fstat(file.fileno()).st_size:
        raise ValueError(f"tensor {name!r} ({entry.size} bytes at {entry.offset}) is cut off")
    file.seek(entry.offset)
    buffer = bytearray(entry.size)
    if file.readinto(buffer) != entry.size:
        raise ValueError(f"tensor {name!r} ({entry.size} bytes at {entry.offset}) is cut off")
    if entry.masked_crc32c is not None and _crc32c(buffer) != _unmask_crc(entry.masked_crc32c):
        raise ValueError(f"tensor {name!r} fails its CRC-32C check")
    array = np.frombuffer(buffer, _DTYPES[entry.dtype]).reshape(entry.shape)
    # Swap bytes rather than use a '>' dtype: ml_dtypes' bfloat16 has no big-endian variant.
    return array.byteswap() if big_endian else array


def read_tf_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """Reads every tensor of a TensorFlow checkpoint into NumPy arrays, without TensorFlow.

    Args:
      prefix: the checkpoint prefix, as given to `tf.train.Saver.restore` (the `.index`
        file's path without `.index`); a folder means the files `<folder>/.index` and
        `<folder>/.data-*`, as TensorFlow reads the prefix "folder/". The `.index` path
        itself is accepted too.

    Returns:
      Tensor name (e.g. "1CNN/kernel", optimizer slots included) → array of the stored
      dtype and shape, in the index's (sorted) order. Each tensor's CRC-32C is checked.

    Raises:
      WeightsFileError: a file is missing, truncated or corrupt, or holds a tensor this
        reader cannot decode (string/resource/variant dtypes, partitioned variables);
        the message names the file.
    """
    index_path = _index_path(prefix)
    if not index_path.is_file():
        raise WeightsFileError(f"TensorFlow checkpoint index {index_path} does not exist")
    try:
        entries, num_shards, big_endian = _read_index(index_path)
    except (ValueError, struct.error, OSError) as error:
        raise WeightsFileError(
            f"cannot read TensorFlow checkpoint index {index_path}: {error}"
        ) from error
    stem = str(index_path).removesuffix(".index")
    arrays = {}
    for shard in range(num_shards):
        data_path = Path(f"{stem}.data-{shard:05d}-of-{num_shards:05d}")
        if not data_path.is_file():
            raise WeightsFileError(f"TensorFlow checkpoint data file {data_path} does not exist")
        try:
            with data_path.open("rb") as file:
                for name, entry in entries.items():
                    if entry.shard_id == shard:
                        arrays[name] = _read_tensor(file, entry, name, big_endian)
        except (ValueError, OSError) as error:
            raise WeightsFileError(
                f"cannot read TensorFlow checkpoint data file {data_path}: {error}"
            ) from error
    return {name: arrays[name] for name in entries}
