"""The one place images, text and audio part ways: a :class:`Task` per input modality.

Everything above it - the Python API, the stage scripts - is the same for all; it asks
:func:`task_for` how to read a split's model inputs, build and run the classifier, extract
features and cut the forward pass for a prefix cache. The modality comes from
``prepare.dataset``; the backbone named by ``extract.backbone`` must take that kind of input
(the registry says which it takes).
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import jax
import numpy as np
import tokenizers
from flax import nnx

from tlflax import sound, text, vision
from tlflax.backbone_choice import backbones_taking, candidate_backbones
from tlflax.backbone_weights import check_weights_path
from tlflax.checkpoint import restore_tree
from tlflax.config import AUTO_BACKBONE, AugmentParams, FinetuneParams, Params, ParamsError
from tlflax.data.errors import DataError
from tlflax.data.pipeline import map_batches, prepare_images
from tlflax.data.streaming import stored_audio_inputs, stored_image_inputs
from tlflax.data.tfds_audio import read_audio_split
from tlflax.data.tfds_store import (
    dataset_version_dir,
    read_class_names,
    read_image_split,
)
from tlflax.data.tfds_text import read_text_split
from tlflax.errors import InputError
from tlflax.models.minilm import tokenize
from tlflax.models.registry import get_backbone_spec
from tlflax.prefix_cache import PrefixCut, audio_prefix_cut, image_prefix_cut, text_prefix_cut
from tlflax.train import Batch, Forward

# Beside a saved model's weights: what its weights alone do not say (the depths its head reads).
ARCHITECTURE_FILE = "architecture.json"


def read_architecture(model_dir: Path) -> dict:
    """What ``model_dir``'s :data:`ARCHITECTURE_FILE` says of its model (empty when it has
    none: a model saved before the file existed reads its final features, with no
    test-time augmentation)."""
    path = model_dir / ARCHITECTURE_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


# Records of a split: uint8 images (N, H, W, C), N texts, or float32 clips (N, samples).
Records = np.ndarray | Sequence[str]


class Task(ABC):
    """How one modality is read, built, run and cut, given the params and the prepared
    dataset's folder."""

    # The modality's classifier constructors in tlflax (build, and build with shape-only
    # weights), both taking (backbone name, number of classes, train_head params).
    classifier_builders: ClassVar[tuple[Callable[..., nnx.Module], Callable[..., nnx.Module]]]

    def __init__(self, params: Params, dataset_dir: Path):
        self.params = params
        # The prepared dataset (tlflax.data.tfds_store): its splits and class names.
        self.dataset_dir = Path(dataset_dir)

    @abstractmethod
    def read_split(self, split: str) -> tuple[Records, np.ndarray]:
        """The stored records and labels of ``split``."""

    @abstractmethod
    def model_inputs(self, records: Records) -> dict[str, np.ndarray]:
        """The arrays the classifier's forward pass reads, one row per record."""

    def build_classifier(
        self,
        num_classes: int,
        *,
        pretrained: bool,
        seed: int,
        taps: Sequence[int] | None = None,
    ) -> nnx.Module:
        """Backbone (pretrained or random) plus a new head shaped by ``train_head``, reading
        ``taps`` (the plan's; None: the final pooled features)."""
        build, _ = self.classifier_builders
        return build(
            self.params.extract.backbone,
            num_classes,
            self.params.train_head,
            pretrained=pretrained,
            seed=seed,
            taps=taps,
            **self._weights_path_option(),
        )

    def abstract_classifier(
        self, num_classes: int, taps: Sequence[int] | None = None
    ) -> nnx.Module:
        """The classifier with shape-only weights, to restore a checkpoint into."""
        _, build_abstract = self.classifier_builders
        return build_abstract(
            self.params.extract.backbone,
            num_classes,
            self.params.train_head,
            taps,
            **self._weights_path_option(),
        )

    def _weights_path_option(self) -> dict[str, str]:
        # Only when set: the audio builders take no weights_path (task_for refuses one there).
        path = self.params.extract.weights_path
        return {} if path is None else {"weights_path": path}

    @abstractmethod
    def forward(
        self, training: FinetuneParams | None = None, *, test_time_flip: bool = False
    ) -> Forward:
        """The forward pass (model, batch, train, key) -> logits on :meth:`model_inputs`.

        ``training``: the plan of the run that trains with it (augmentation, compute dtype);
        None for inference (float32, nothing random; with ``test_time_flip``, images are
        predicted averaged with their mirror images).
        """

    @abstractmethod
    def extract_features(
        self, backbone: nnx.Module, inputs: dict[str, np.ndarray], description: str
    ) -> np.ndarray:
        """Pooled features of the frozen backbone, one row per example."""

    @abstractmethod
    def prefix_cut(self, groups: int) -> PrefixCut:
        """The forward pass cut after ``groups`` backbone groups (see tlflax.prefix_cache)."""

    @abstractmethod
    def pooled_after_each_group(self, backbone: nnx.Module, batch: Batch) -> list[jax.Array]:
        """Pooled backbone activations after each layer group (the advisor's depth probes)."""

    def class_names(self) -> list[str]:
        return read_class_names(self.dataset_dir, self.params.prepare.stored_name)

    def load_classifier(self, num_classes: int, path: Path) -> tuple[nnx.Module, Forward]:
        """The classifier saved at ``path`` (a whole-model state, e.g. the fine-tuned one)
        and its inference forward pass, as its folder's ``architecture.json`` describes them:
        the taps its head reads (none: the final features) and whether its predictions
        average each image with its mirror image."""
        architecture = read_architecture(path.parent)
        taps = architecture.get("taps")
        graphdef, abstract_state = nnx.split(self.abstract_classifier(num_classes, taps))
        model = nnx.merge(graphdef, restore_tree(path, abstract_state))
        return model, self.forward(test_time_flip=architecture.get("test_time_flip", False))

    def read_inputs(self, split: str) -> dict[str, np.ndarray]:
        """Model inputs and ``label`` of ``split``."""
        records, labels = self.read_split(split)
        return {**self.model_inputs(records), "label": labels}

    def with_backbone(self, name: str) -> Task:
        """The same data's task with ``extract.backbone`` set to ``name``."""
        return task_for(self.params.with_backbone(name), self.dataset_dir)


class ImageTask(Task):
    classifier_builders = (vision.build_image_classifier, vision.abstract_image_classifier)

    def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = read_image_split(self.dataset_dir, self.params.prepare.stored_name, split)
        self._check_channels(split, images.shape[-1])
        return images, labels

    def model_inputs(self, records: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": records}

    def read_inputs(self, split: str) -> dict[str, np.ndarray]:
        """``image`` read on demand from the stored split (:mod:`tlflax.data.streaming`), so
        training, evaluation and extraction hold a batch of images, not the split."""
        inputs = stored_image_inputs(self.dataset_dir, self.params.prepare.stored_name, split)
        self._check_channels(split, inputs["image"].shape[-1])
        return inputs

    def _check_channels(self, split: str, channels: int) -> None:
        if channels not in (1, 3):
            # Checked here, where the folder is known, not deep inside a jitted step.
            raise DataError(
                dataset_version_dir(self.dataset_dir, self.params.prepare.stored_name),
                f"split {split!r} holds images with {channels} channels; the image "
                "backbones take 1 (grayscale) or 3 (RGB)",
                "prepare the dataset again with prepare.channels: 1 or 3",
            )

    def forward(
        self, training: FinetuneParams | None = None, *, test_time_flip: bool = False
    ) -> Forward:
        if training is None:
            inference = AugmentParams(random_crop=False, flip=False, test_time_flip=test_time_flip)
            return vision.image_forward(self.params.extract.image_size, inference)
        return vision.image_forward(
            self.params.extract.image_size, training.augment, training.compute_dtype
        )

    def extract_features(
        self, backbone: nnx.Module, inputs: dict[str, np.ndarray], description: str
    ) -> np.ndarray:
        return vision.extract_features(
            backbone,
            inputs["image"],
            image_size=self.params.extract.image_size,
            batch_size=self.params.extract.batch_size,
            description=description,
        )

    def prefix_cut(self, groups: int) -> PrefixCut:
        return image_prefix_cut(self.params.extract.image_size, groups)

    def pooled_after_each_group(self, backbone: nnx.Module, batch: Batch) -> list[jax.Array]:
        images = prepare_images(batch["image"], self.params.extract.image_size)
        return vision.pooled_after_each_group(backbone, images)


class TextTask(Task):
    classifier_builders = (text.build_text_classifier, text.abstract_text_classifier)

    def read_split(self, split: str) -> tuple[list[str], np.ndarray]:
        return read_text_split(self.dataset_dir, self.params.prepare.stored_name, split)

    def model_inputs(self, records: Sequence[str]) -> dict[str, np.ndarray]:
        # Tokenized here, once per stage (about a second for 5000 reviews), never in a step,
        # by the very tokenizer the export stage saves: training and serving cut alike.
        return tokenize(self.tokenizer(), records)

    def tokenizer(self) -> tokenizers.Tokenizer:
        """The tokenizer :meth:`model_inputs` uses, padding and truncating to ``max_length``."""
        extract = self.params.extract
        return text.fixed_length_tokenizer(
            extract.max_length, self._tokenizer_folder(), extract.truncation_side
        )

    def _tokenizer_folder(self) -> str | None:
        # An encoder brought as a checkpoint folder (bert) tokenizes with the folder's own
        # vocabulary; every other one with MiniLM's packaged tokenizer.
        extract = self.params.extract
        spec = get_backbone_spec(extract.backbone)
        return extract.weights_path if spec.read_checkpoint_folder is not None else None

    def forward(
        self, training: FinetuneParams | None = None, *, test_time_flip: bool = False
    ) -> Forward:
        return text.text_forward()  # a text has no mirror image: test_time_flip is for images

    def extract_features(
        self, backbone: nnx.Module, inputs: dict[str, np.ndarray], description: str
    ) -> np.ndarray:
        return text.extract_features(
            backbone, inputs, batch_size=self.params.extract.batch_size, description=description
        )

    def prefix_cut(self, groups: int) -> PrefixCut:
        return text_prefix_cut(groups)

    def pooled_after_each_group(self, backbone: nnx.Module, batch: Batch) -> list[jax.Array]:
        return text.pooled_after_each_group(backbone, batch["input_ids"], batch["attention_mask"])


class AudioTask(Task):
    classifier_builders = (sound.build_audio_classifier, sound.abstract_audio_classifier)

    def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        clips, labels, sample_rate = read_audio_split(
            self.dataset_dir, self.params.prepare.stored_name, split
        )
        self._check_rate(split, len(labels), sample_rate)
        return clips, labels

    def read_inputs(self, split: str) -> dict[str, np.ndarray]:
        """``audio`` read on demand from the stored split (:mod:`tlflax.data.streaming`)."""
        inputs, sample_rate = stored_audio_inputs(
            self.dataset_dir, self.params.prepare.stored_name, split
        )
        self._check_rate(split, len(inputs["label"]), sample_rate)
        return inputs

    def _check_rate(self, split: str, count: int, sample_rate: int) -> None:
        if count and sample_rate != sound.SAMPLE_RATE:
            # Checked here, where the folder is known: at another rate the log-mel front end
            # would silently compute the wrong frequencies.
            raise DataError(
                dataset_version_dir(self.dataset_dir, self.params.prepare.stored_name),
                f"split {split!r} holds clips at {sample_rate} Hz; the audio backbones take "
                f"{sound.SAMPLE_RATE} Hz",
                f"prepare the dataset again with prepare.sample_rate: {sound.SAMPLE_RATE}",
            )

    def model_inputs(self, records: np.ndarray) -> dict[str, np.ndarray]:
        return {"audio": np.asarray(records, np.float32)}

    def forward(
        self, training: FinetuneParams | None = None, *, test_time_flip: bool = False
    ) -> Forward:
        # A clip has no mirror image: test_time_flip is for images.
        if training is None:
            return sound.audio_forward()
        return sound.audio_forward(training.augment.spec_augment, training.compute_dtype)

    def extract_features(
        self, backbone: nnx.Module, inputs: dict[str, np.ndarray], description: str
    ) -> np.ndarray:
        return sound.extract_features(
            backbone,
            inputs["audio"],
            batch_size=self.params.extract.batch_size,
            description=description,
        )

    def prefix_cut(self, groups: int) -> PrefixCut:
        if self.params.finetune.augment.spec_augment:
            raise ParamsError(
                "'finetune.cache_frozen_prefix' needs finetune.augment.spec_augment off: "
                "masking changes the frozen layers' outputs from step to step"
            )
        return audio_prefix_cut(groups)

    def pooled_after_each_group(self, backbone: nnx.Module, batch: Batch) -> list[jax.Array]:
        return sound.pooled_after_each_group(backbone, batch["audio"])


_TASKS: dict[str, type[Task]] = {"image": ImageTask, "text": TextTask, "audio": AudioTask}


def task_for(params: Params, dataset_dir: Path) -> Task:
    """The task of ``prepare.dataset``'s modality, once the backbone is known to fit it.

    With ``extract.backbone: auto`` every candidate must fit; such a task reads data, and
    :meth:`Task.with_backbone` gives the task of the backbone picked (only it builds models).

    Raises:
      ParamsError: ``extract.backbone`` is not a registered backbone, or takes the other
        modality's input; ``extract.pretrained`` for a backbone that ships no weights and
        no ``extract.weights_path``; a ``weights_path`` that is missing or does not fit;
        with ``auto``, a candidate that is none of the modality's backbones with weights.
    """
    modality = params.prepare.modality
    if params.extract.backbone == AUTO_BACKBONE:
        candidate_backbones(params)
        return _TASKS[modality](params, dataset_dir)
    try:
        spec = get_backbone_spec(params.extract.backbone)
    except InputError as error:
        raise ParamsError(f"'extract.backbone': {error}") from None
    check_weights_path(params, spec)
    if spec.input_kind != modality:
        raise ParamsError(
            f"'extract.backbone': {spec.name!r} takes {spec.input_kind} input but "
            f"prepare.dataset {params.prepare.dataset!r} is {modality} data; "
            f"use one of: {', '.join(backbones_taking(modality))}"
        )
    return _TASKS[modality](params, dataset_dir)


def class_probabilities(
    model: nnx.Module, forward: Forward, inputs: dict[str, np.ndarray], batch_size: int
) -> np.ndarray:
    """Softmax of ``forward`` in inference mode over every example of ``inputs``, in order."""
    graphdef, state = nnx.split(model)

    # Weights are an argument, not a closure: closed-over arrays become compile-time constants.
    @jax.jit
    def predict(state, batch):
        return jax.nn.softmax(forward(nnx.merge(graphdef, state), batch, False, None), axis=-1)

    return map_batches(
        functools.partial(predict, state), inputs, batch_size=batch_size, description="predict"
    )
