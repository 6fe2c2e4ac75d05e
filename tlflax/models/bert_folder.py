"""Any BERT-family encoder from a local Hugging Face model folder: its size, weights, tokenizer.

A folder as ``save_pretrained`` writes it (or as the Hub serves it)::

    config.json                          model_type "bert"; the sizes below
    model.safetensors | pytorch_model.bin
    tokenizer.json | vocab.txt           (+ tokenizer_config.json's do_lower_case)

becomes :class:`tlflax.models.minilm.MiniLM` - the post-LayerNorm BERT encoder with mean
pooling - sized by ``config.json``: ``num_hidden_layers``, ``hidden_size``,
``num_attention_heads``, ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``,
``type_vocab_size`` and ``hidden_dropout_prob``. all-MiniLM-L6-v2 is one such folder. The
weights load through MiniLM's Hugging Face name map; a checkpoint saved from a model with a
task head (``BertForSequenceClassification``: names under ``bert.``) gives up its encoder,
and the original release's ``LayerNorm.gamma``/``beta`` names are read too.

Only what this encoder computes is accepted: another ``model_type`` (RoBERTa's position
offsets, DistilBERT's names, GPT-2's causal attention) or a setting it does not implement
is refused with one line naming ``config.json`` and the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from flax import nnx
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from tlflax.errors import InputError
from tlflax.models.minilm_weights import load_minilm_weights
from tlflax.models.state_dict_loader import LoadReport
from tlflax.models.torch_weights import WeightsFileError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BertFolder",
    "architecture_and_weights",
    "folder_tokenizer",
    "load_bert_weights",
    "read_bert_folder",
]

SUPPORTED_MODEL_TYPES = ("bert",)
CONFIG_FILE = "config.json"
# In the order they are looked for: the first one present is read.
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")

# config.json key → MiniLM constructor option, with BertConfig's default for an absent key.
_SIZE_KEYS: dict[str, tuple[str, int | float]] = {
    "num_hidden_layers": ("num_layers", 12),
    "hidden_size": ("hidden", 768),
    "num_attention_heads": ("heads", 12),
    "intermediate_size": ("intermediate", 3072),
    "vocab_size": ("vocab_size", 30522),
    "max_position_embeddings": ("max_positions", 512),
    "type_vocab_size": ("type_vocab_size", 2),
    "hidden_dropout_prob": ("dropout_rate", 0.1),
}
# Settings the encoder implements one way only: config.json key → (BertConfig default, ours).
_FIXED_SETTINGS: dict[str, tuple[Any, Any]] = {
    "hidden_act": ("gelu", "gelu"),
    "position_embedding_type": ("absolute", "absolute"),
    "layer_norm_eps": (1e-12, 1e-12),
}
# Names in a checkpoint of BERT plus a task head (`BertFor...`), or of the original release.
_ENCODER_PREFIX = "bert."
_OLD_LAYER_NORM_NAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))  # fmt: skip


@dataclass(frozen=True)
class BertFolder:
    """What a Hugging Face BERT folder holds, read and checked.

    Attributes:
      path: the folder.
      options: MiniLM constructor options (``num_layers``, ``hidden``, ...).
      weights_file: ``model.safetensors`` or ``pytorch_model.bin``.
      tokenizer_file: ``tokenizer.json``, or ``vocab.txt`` (a WordPiece vocabulary).
      lowercase: whether a ``vocab.txt`` tokenizer lowercases (``do_lower_case``).
    """

    path: Path
    options: dict[str, Any]
    weights_file: Path
    tokenizer_file: Path
    lowercase: bool

    @property
    def max_positions(self) -> int:
        """The longest token sequence the encoder takes (its position embeddings)."""
        return int(self.options["max_positions"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsFileError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(content, dict):
        raise WeightsFileError(f"{path} holds a {type(content).__name__}, not a JSON object")
    return content


def _first_present(folder: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsFileError(
        f"{folder} has no {what}: expected {' or '.join(names)} in the Hugging Face model folder"
    )


def _encoder_options(config: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """MiniLM's constructor options from ``config.json``, refusing what it cannot compute."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{config_path}: model_type {model_type!r} is not supported by backbone 'bert'; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (BERT-family encoders)"
        )
    for key, (default, ours) in _FIXED_SETTINGS.items():
        if config.get(key, default) != ours:
            raise InputError(
                f"{config_path}: {key} {config[key]!r} is not supported by backbone 'bert' "
                f"(it computes {key} {ours!r})"
            )
    options = {}
    for key, (option, default) in _SIZE_KEYS.items():
        value = config.get(key, default)
        kind = float if isinstance(default, float) else int
        if isinstance(value, bool) or not isinstance(value, kind | int) or value < 0:
            raise InputError(f"{config_path}: {key} is {value!r}, expected a non-negative number")
        options[option] = kind(value)
    if options["hidden"] % max(options["heads"], 1):
        raise InputError(
            f"{config_path}: hidden_size {options['hidden']} is not divisible by "
            f"num_attention_heads {options['heads']}"
        )
    return options


def read_bert_folder(folder: str | Path) -> BertFolder:
    """Reads and checks a Hugging Face BERT model folder (see the module docstring).

    Raises:
      WeightsFileError: the folder, its config.json, weights or tokenizer file is missing or
        unreadable; the message names the path.
      InputError: config.json's model_type or a setting is not one this encoder computes;
        the message names config.json and the key.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not" if folder.exists() else "does not exist; expected"
        raise WeightsFileError(
            f"{folder} {what} a Hugging Face model folder (config.json, "
            f"{' or '.join(WEIGHTS_FILES)}, {' or '.join(TOKENIZER_FILES)})"
        )
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsFileError(f"{config_path} does not exist: a Hugging Face folder has one")
    options = _encoder_options(_read_json(config_path), config_path)
    tokenizer_file = _first_present(folder, TOKENIZER_FILES, "tokenizer")
    tokenizer_config = folder / "tokenizer_config.json"
    lowercase = True
    if tokenizer_config.is_file():
        lowercase = bool(_read_json(tokenizer_config).get("do_lower_case", True))
    return BertFolder(
        path=folder,
        options=options,
        weights_file=_first_present(folder, WEIGHTS_FILES, "weights file"),
        tokenizer_file=tokenizer_file,
        lowercase=lowercase,
    )


def architecture_and_weights(folder: Path) -> tuple[dict[str, Any], Path]:
    """The registry's view of a folder: constructor options and the weights file to load."""
    checked = read_bert_folder(folder)
    return checked.options, checked.weights_file


def load_bert_weights(
    model: nnx.Module, tensors: dict[str, np.ndarray], *, dont_load: Sequence[str] = ()
) -> LoadReport:
    """Copies a Hugging Face BERT state dict into ``model`` (a sized MiniLM), in place.

    Names under ``bert.`` (a checkpoint with a task head) lose the prefix; the head's own
    tensors (``classifier.*``, ``cls.*``) are reported ``unexpected``. The original
    release's ``LayerNorm.gamma``/``beta`` read as ``weight``/``bias``. Otherwise as
    :func:`tlflax.models.minilm_weights.load_minilm_weights`.
    """
    has_prefix = any(name.startswith(_ENCODER_PREFIX) for name in tensors)
    renamed = {}
    for name, array in tensors.items():
        name = name.removeprefix(_ENCODER_PREFIX) if has_prefix else name
        for pattern, replacement in _OLD_LAYER_NORM_NAMES:
            name = re.sub(pattern, replacement, name)
        renamed[name] = array
    return load_minilm_weights(model, renamed, dont_load=dont_load)


def _wordpiece_tokenizer(vocab_file: Path, lowercase: bool) -> tokenizers.Tokenizer:
    """BERT's tokenizer from a bare ``vocab.txt``, as Hugging Face's BertTokenizerFast builds it."""
    try:
        tokenizer = tokenizers.Tokenizer(
            models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]")
        )
    except Exception as error:  # tokenizers raises its own Exception for a bad vocabulary
        raise WeightsFileError(f"{vocab_file} is not a WordPiece vocabulary: {error}") from error
    special = {token: tokenizer.token_to_id(token) for token in ("[CLS]", "[SEP]")}
    missing = [token for token, token_id in special.items() if token_id is None]
    if missing:
        raise WeightsFileError(f"{vocab_file} lacks BERT's special tokens {missing}")
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", special["[SEP]"]), ("[CLS]", special["[CLS]"])
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def folder_tokenizer(folder: str | Path) -> tokenizers.Tokenizer:
    """The folder's tokenizer (``tokenizer.json``, else one built from ``vocab.txt``), with
    the padding and truncation its file may set; see ``minilm.pad_to_fixed_length``.

    Raises:
      WeightsFileError: as :func:`read_bert_folder`, or an unreadable tokenizer file.
    """
    checked = read_bert_folder(folder)
    if checked.tokenizer_file.suffix == ".txt":
        return _wordpiece_tokenizer(checked.tokenizer_file, checked.lowercase)
    try:
        return tokenizers.Tokenizer.from_file(str(checked.tokenizer_file))
    except Exception as error:  # tokenizers raises its own Exception for a bad file
        raise WeightsFileError(
            f"{checked.tokenizer_file} is not a tokenizer file: {error}"
        ) from error
