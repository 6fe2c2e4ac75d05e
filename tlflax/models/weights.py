"""Weights files of any supported format, read into one flat name → array mapping.

`read_weights` picks the reader from the path: PyTorch state dicts (`.pth`, `.pt`,
`.bin`, read without torch and without running pickle code), safetensors, NumPy `.npz`
(never unpickled), TensorFlow checkpoints (`.index` + `.data-*`, read without
TensorFlow), and Orbax checkpoint folders of our own runs. Every reader returns a flat
`{name: np.ndarray}`; what the names mean depends on who wrote the file:

* a PyTorch / Hugging Face / TensorFlow file uses that framework's names
  (`layer1.0.conv1.weight`, `1CNN/kernel`) and layouts, which the backbone family's
  importer maps (e.g. `load_resnet_weights`, `load_musicnn_weights`);
* a file of ours (`write_npz`, or `tlflax.checkpoint.save_tree` of an NNX state) uses our
  '/'-joined parameter paths (`blocks/0/conv1/kernel`) and layouts, which
  `load_flax_weights` copies directly.

`is_flax_layout` tells PyTorch and Hugging Face names apart from ours: none contains a
'/'. TensorFlow's do, so the registry also checks that some name is a path of the model.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tlflax.io import write_arrays
from tlflax.models.safetensors_weights import read_safetensors
from tlflax.models.tf_checkpoint import read_tf_checkpoint
from tlflax.models.torch_weights import (
    LoadReport,
    WeightsFileError,
    load_state_dict_into,
    read_torch_state_dict,
)
from tlflax.transfer import path_to_name

__all__ = [
    "WEIGHTS_READERS",
    "flax_weights",
    "is_flax_layout",
    "load_flax_weights",
    "read_npz",
    "read_orbax",
    "read_weights",
    "write_npz",
]

# Orbax writes this file into every single-tree checkpoint folder.
_ORBAX_TREE_METADATA = "_METADATA"
# NNX keeps dropout RNG counters in the state; they are not weights.
_NNX_RNG_STATE = r"(^|/)rngs/"


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Reads every array of an `.npz` file, refusing pickled (object) arrays.

    Raises:
      WeightsFileError: the file is missing, not a valid `.npz`, or holds an object array
        (which only pickle could rebuild, so it could run code); names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise WeightsFileError(f"{path} is a single .npy array, not an .npz archive")
            return {name: archive[name] for name in archive.files}
    except WeightsFileError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise WeightsFileError(
                f"refusing to load {path}: it holds pickled (object) arrays, which could "
                "execute code; save plain numeric arrays instead"
            ) from error
        raise WeightsFileError(f"{path} is not a valid .npz file: {error}") from error
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise WeightsFileError(f"{path} is not a valid .npz file: {error}") from error


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes arrays (e.g. `flax_weights(model)`) to an `.npz` file, atomically.

    Names may contain '/': NumPy keeps them as given.
    """
    write_arrays(path, **{name: np.asarray(array) for name, array in arrays.items()})


def read_orbax(path: str | Path) -> dict[str, np.ndarray]:
    """Reads an Orbax single-tree checkpoint folder (e.g. of `nnx.state(model)`) as a flat dict.

    Names are '/'-joined tree paths without NNX's trailing `value`, i.e. our parameter
    paths. PRNG keys (dropout RNG state, not weights) are left out.

    Args:
      path: the folder `tlflax.checkpoint.save_tree` wrote, or one item of a
        `CheckpointManager` step (e.g. `<run>/3/model`).

    Raises:
      WeightsFileError: the folder is missing, is a multi-item step folder (the message
        lists its items), or is not a readable checkpoint.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise WeightsFileError(f"Orbax checkpoint folder {path} does not exist")
    if not (path / _ORBAX_TREE_METADATA).is_file():
        items = sorted(
            child.name for child in path.iterdir() if (child / _ORBAX_TREE_METADATA).is_file()
        )
        hint = f"; it holds the items {items}: pass one of them" if items else ""
        raise WeightsFileError(f"{path} is not an Orbax single-tree checkpoint{hint}")
    try:
        tree = ocp.StandardCheckpointer().restore(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsFileError(f"could not read Orbax checkpoint {path}: {error}") from error
    return {
        path_to_name(tree_path): np.asarray(leaf)
        for tree_path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    }


WEIGHTS_READERS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    ".pth": read_torch_state_dict,
    ".pt": read_torch_state_dict,
    ".bin": read_torch_state_dict,
    ".safetensors": read_safetensors,
    ".npz": read_npz,
    ".index": read_tf_checkpoint,  # with its `.data-*` files beside it
}
# A TensorFlow checkpoint saved under the prefix "folder/" is `folder/.index` + `.data-*`.
_TF_FOLDER_INDEX = ".index"


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a weights file or Orbax checkpoint folder, choosing the reader by its format.

    `.pth`/`.pt`/`.bin` → `read_torch_state_dict`, `.safetensors` → `read_safetensors`,
    `.npz` → `read_npz`, a TensorFlow `.index` file, or a folder holding one (as musicnn's
    `MTT_vgg/`) → `read_tf_checkpoint`, any other folder → `read_orbax`.

    Returns:
      A flat name → NumPy array mapping, in the file's own names (see the module docstring).

    Raises:
      WeightsFileError: missing path, unknown extension, or a file its reader refuses
        (corrupt, truncated, unsafe); the message names the path.
    """
    path = Path(path)
    if path.is_dir():
        if (path / _TF_FOLDER_INDEX).is_file():
            return read_tf_checkpoint(path)
        return read_orbax(path)
    if not path.exists():
        raise WeightsFileError(f"weights file {path} does not exist")
    # A file named only ".index" has no suffix for pathlib: its whole name is the format.
    reader = WEIGHTS_READERS.get(path.suffix.lower() or path.name.lower())
    if reader is None:
        raise WeightsFileError(
            f"cannot tell the format of {path} from its extension {path.suffix!r}: expected "
            f"one of {', '.join(WEIGHTS_READERS)} or a checkpoint folder (Orbax, TensorFlow)"
        )
    return reader(path)


def is_flax_layout(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether names may be our '/'-joined parameter paths (no PyTorch/HF name has a '/';
    TensorFlow's do)."""
    return any("/" in name for name in arrays)


def flax_weights(model: nnx.Module) -> dict[str, np.ndarray]:
    """`model`'s parameters and BatchNorm statistics as '/'-joined path → NumPy array."""
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    return {
        "/".join(map(str, path)): np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(state)
    }


def load_flax_weights(
    model: nnx.Module,
    arrays: Mapping[str, np.ndarray],
    *,
    prefix: str = "",
    dont_load: Sequence[str] = (),
) -> LoadReport:
    """Copies arrays named by our parameter paths (a file of our own) into `model`, in place.

    Args:
      model: the module to fill.
      arrays: e.g. `read_weights(...)` of an `.npz` from `write_npz` or an Orbax folder.
      prefix: where `model` sits in the saved tree, e.g. "backbone/" to take the backbone
        out of a whole classifier's checkpoint (the head is then reported `unexpected`).
      dont_load: regexes over `model`'s paths to leave initialised.

    Returns:
      A `LoadReport` (RNG counters in the file are neither loaded nor `unexpected`).

    Raises:
      InputError: a shape differs outside `dont_load`.
    """
    return load_state_dict_into(
        model,
        dict(arrays),
        source_key=lambda path: prefix + path,
        convert=np.asarray,
        dont_load=dont_load,
        ignore_source_key=_NNX_RNG_STATE,
    )
