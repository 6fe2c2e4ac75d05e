"""Read ``.safetensors`` weight files into NumPy arrays, without PyTorch.

Hugging Face checkpoints (such as the packaged all-MiniLM-L6-v2) ship their weights as
safetensors. The format is a JSON header plus raw little-endian buffers, so the
``safetensors`` package's NumPy API reads it directly; going through torch would add a
~700 MB dependency to the library for no gain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from tlflax.models.torch_weights import WeightsFileError


def read_safetensors(path: Path | str) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file as a NumPy array.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        Tensor name (as stored, e.g. ``"encoder.layer.0.attention.self.query.weight"``) →
        array with the stored shape and dtype.

    Raises:
        WeightsFileError: The file does not exist or is not a valid safetensors file; the
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"safetensors weights file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise WeightsFileError(
            f"could not read {path} as a safetensors file (corrupt or truncated?): {error}"
        ) from error
