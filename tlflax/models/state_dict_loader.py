"""Copying a state dict (file key → array) into an NNX module through a per-model name map.

`load_state_dict_into` fills a module's parameters and batch statistics from any such
mapping (a PyTorch state dict from `tlflax.models.torch_weights.read_torch_state_dict`,
safetensors, `.npz`) and says what it did in a `LoadReport`. `TORCH_LEAF_NAMES` and
`torch_layout_to_flax` are the name and layout conventions of PyTorch files. Every name
here is also importable from `tlflax.models.torch_weights`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlflax.errors import InputError

__all__ = [
    "TORCH_LEAF_NAMES",
    "LoadReport",
    "load_state_dict_into",
    "torch_layout_to_flax",
]


@dataclass(frozen=True)
class LoadReport:
    """What `load_state_dict_into` did, as '/'-joined parameter paths (ours) or file keys.

    Attributes:
      loaded: our paths that received a value from the file.
      missing: our paths with no entry in the file (left as initialised).
      unexpected: file keys that no path of ours maps to.
      skipped: our paths matching a `dont_load` pattern (left as initialised).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# Our leaf name → PyTorch's, for convolutions, linear layers and BatchNorm (whose running
# statistics PyTorch keeps as buffers beside its weight and bias).
TORCH_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_layout_to_flax(array: np.ndarray) -> np.ndarray:
    """PyTorch weight layout → Flax: conv OIHW → HWIO, linear (out, in) → (in, out), else as is.

    A depthwise kernel (C, 1, kh, kw) becomes (kh, kw, 1, C), the layout of a grouped
    `lax.conv_general_dilated` kernel.
    """
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def _converted_to_fit(
    path: str,
    key: str,
    array: np.ndarray,
    variable: nnx.Variable,
    convert: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """`convert(array)`, refused unless it has the shape of `variable` (our `path`)."""
    value = convert(array)
    if value.shape != variable.shape:
        raise InputError(
            f"shape mismatch for {path} (file key {key!r}): the file has {value.shape} "
            f"after layout conversion, the model expects {variable.shape}; add a "
            "dont_load pattern to keep it initialised"
        )
    return value


def load_state_dict_into(
    model: nnx.Module,
    state_dict: dict[str, np.ndarray],
    *,
    source_key: Callable[[str], str | None],
    convert: Callable[[np.ndarray], np.ndarray] = torch_layout_to_flax,
    dont_load: Sequence[str] = (),
    ignore_source_key: str | None = None,
) -> LoadReport:
    """Copies a state dict into `model`'s parameters and batch statistics through a name map.

    Args:
      model: the module to fill, updated in place.
      state_dict: file key → array (e.g. from `read_torch_state_dict`).
      source_key: our '/'-joined path (relative to `model`) → the file key it comes from,
        or None for a path with no counterpart in this kind of file (reported missing).
      convert: file layout → our layout, applied before the shape check.
      dont_load: regexes (`re.search`) over our paths; matches keep their initial values and
        may differ in shape (a new head, say).
      ignore_source_key: regex over file keys that are neither loaded nor `unexpected`
        (e.g. `num_batches_tracked`).

    Returns:
      A `LoadReport`.

    Raises:
      InputError: a loaded entry's shape differs from ours; names both paths and shapes.
    """
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    report = LoadReport()
    used_keys = set()
    new_values = {}
    # Check every entry before writing any, so a mismatch leaves the model untouched.
    for path_parts, variable in nnx.to_flat_state(state):
        path = "/".join(str(part) for part in path_parts)
        key = source_key(path)
        used_keys.add(key)
        if any(re.search(pattern, path) for pattern in dont_load):
            report.skipped.append(path)
            continue
        if key not in state_dict:
            report.missing.append(path)
            continue
        value = _converted_to_fit(path, key, state_dict[key], variable, convert)
        new_values[path] = (variable, value)
        report.loaded.append(path)
    for variable, value in new_values.values():
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    report.unexpected.extend(
        key
        for key in state_dict
        if key not in used_keys and not (ignore_source_key and re.search(ignore_source_key, key))
    )
    # In this Flax version the state shares its Variables with the model; updating
    # explicitly keeps the load correct should `nnx.state` ever hand out copies.
    nnx.update(model, state)
    return report
