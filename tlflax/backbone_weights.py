"""``extract.weights_path`` against the backbone it is for: refused in one line before any
model is built (:func:`tlflax.tasks.task_for` calls it)."""

from __future__ import annotations

from pathlib import Path

from tlflax.config import Params, ParamsError
from tlflax.errors import InputError
from tlflax.models.registry import BackboneSpec


def check_weights_path(params: Params, spec: BackboneSpec) -> None:
    """Refuses an ``extract.weights_path`` the backbone cannot use, or its absence where it
    is the only source of weights (or, for ``bert``, of the architecture)."""
    extract = params.extract
    if extract.weights_path is None:
        if spec.read_checkpoint_folder is not None:
            raise ParamsError(
                f"'extract.weights_path': backbone {spec.name!r} is any BERT-family encoder you "
                "bring: set extract.weights_path to its Hugging Face model folder (config.json, "
                "model.safetensors or pytorch_model.bin, tokenizer.json or vocab.txt)"
            )
        if extract.pretrained and spec.load_pretrained is None:
            raise ParamsError(
                f"'extract.weights_path': backbone {spec.name!r} ships no pretrained weights "
                "and 'extract.pretrained' is true: set extract.weights_path to your checkpoint "
                "(e.g. a torchvision or timm state dict .pth/.safetensors), or set "
                "extract.pretrained to false to train it from random weights"
            )
        return
    if spec.input_kind == "audio":
        raise ParamsError(
            f"'extract.weights_path': the audio backbones load only their packaged weights; "
            f"remove extract.weights_path ({extract.weights_path})"
        )
    if spec.read_checkpoint_folder is not None:
        try:
            options, _ = spec.read_checkpoint_folder(Path(extract.weights_path))
        except InputError as error:
            raise ParamsError(f"'extract.weights_path': {error}") from None
        max_positions = options.get("max_positions", extract.max_length)
        if extract.max_length > max_positions:
            raise ParamsError(
                f"'extract.max_length': {extract.max_length} tokens exceed the {max_positions} "
                f"positions of {Path(extract.weights_path) / 'config.json'} "
                "(max_position_embeddings); set extract.max_length to at most that"
            )
    elif extract.pretrained and not Path(extract.weights_path).exists():
        raise ParamsError(
            f"'extract.weights_path': {extract.weights_path} does not exist (relative paths "
            f"are from the working directory, {Path.cwd()})"
        )
