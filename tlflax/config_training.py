"""The sections of ``params.yaml`` for the stages that train and score models.

``baseline``, ``extract``, ``train_head``, ``advise``, ``finetune``, ``train_scratch`` and
``evaluate``, with the transfer rules and augmentation settings ``finetune`` holds, and
``class_balance``, which every training stage reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tlflax.config_base import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    StrictSection,
)


class BaselineParams(StrictSection):
    """The classical scikit-learn reference (tlflax.baseline), fitted on train alone.

    Its model and hyperparameters are chosen by stratified ``cv_folds``-fold
    cross-validation on the training split, whose folds ``seed`` shuffles.
    """

    cv_folds: Annotated[int, Field(ge=2, le=20)] = 3
    seed: NonNegativeInt = 0
    # Large training splits: cross-validate and refit on a stratified subset of at most this
    # many examples (an RBF-SVM's fit grows with the square of its examples); null: all.
    max_train_examples: PositiveInt | None = None


# extract.backbone's value that leaves the choice to the advise stage (tlflax.backbone_choice).
AUTO_BACKBONE = "auto"


class ExtractParams(StrictSection):
    """The frozen pretrained backbone and the input size it sees (images or tokens)."""

    # A registered backbone, or "auto": the advise stage probes each of ``candidates`` on
    # this data and picks one (tlflax/backbone_choice.py); every later stage uses its pick.
    backbone: str = "efficientnet_lite0"
    # The backbones "auto" chooses among; None: every registered backbone of the data's
    # modality that ships pretrained weights.
    candidates: Annotated[list[str], Field(min_length=1)] | None = None
    pretrained: bool = True
    # Your own checkpoint, loaded instead of the packaged weights: a state dict file
    # (.pth/.pt/.bin/.safetensors/.npz; torchvision/timm names for resnet18/resnet50), or for
    # backbone "bert" a Hugging Face model folder (config.json, model.safetensors or
    # pytorch_model.bin, tokenizer.json or vocab.txt). A relative path is from the working
    # directory. None: the backbone's packaged weights.
    weights_path: str | None = None
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    # Every text is padded or truncated to this many WordPiece tokens ([CLS] and [SEP]
    # included): one fixed shape, so every jitted function compiles once.
    max_length: Annotated[int, Field(ge=8, le=512)] = 128
    # Which end of a longer text is kept (as transformers' tokenizer ``truncation_side``):
    # "right" cuts the end and keeps the opening tokens; "left" keeps the closing tokens,
    # where a review usually gives its verdict (Sun et al. 2019, "How to Fine-Tune BERT for
    # Text Classification": the tail beat the head on long reviews).
    truncation_side: Literal["right", "left"] = "right"
    batch_size: PositiveInt = 128
    # Which depths the head reads (tlflax/taps.py): "auto", the depths the advise stage
    # picks from its probes; "last", the backbone's final pooled features; or a list of
    # layer-group counts, e.g. [7, 13, 14]. With taps the network is cut at the highest.
    taps: Literal["auto", "last"] | Annotated[list[PositiveInt], Field(min_length=1)] = "auto"

    @model_validator(mode="after")
    def _auto_chooses_packaged_weights(self) -> ExtractParams:
        if self.backbone != AUTO_BACKBONE:
            return self
        if self.weights_path is not None:
            raise ValueError(
                "backbone auto chooses among packaged weights; with weights_path, name the "
                "backbone the checkpoint belongs to"
            )
        if not self.pretrained:
            raise ValueError(
                "backbone auto chooses by the pretrained features; with pretrained false, "
                "name a backbone"
            )
        return self

    @field_validator("taps")
    @classmethod
    def _taps_increase(cls, taps: str | list[int]) -> str | list[int]:
        if isinstance(taps, list) and any(b <= a for a, b in zip(taps, taps[1:], strict=False)):
            raise ValueError(f"list the depths in increasing order, each once (got {taps})")
        return taps


class TrainHeadParams(StrictSection):
    """New head trained on cached backbone features (feature extraction)."""

    # ridge: the linear head fitted in closed form (least squares onto one-hot labels,
    # penalty by leave-one-out on train; tlflax.train.fit_ridge_head): learning_rate,
    # batch_size, max_epochs and patience are then unused.
    head: Literal["linear", "mlp", "ridge"] = "linear"
    hidden_dim: PositiveInt = 256
    dropout: Probability = 0.2
    learning_rate: PositiveFloat = 1e-2
    weight_decay: NonNegativeFloat = 1e-4
    batch_size: PositiveInt = 128
    max_epochs: PositiveInt = 200
    patience: PositiveInt = 20
    seed: NonNegativeInt = 0


class TransferRule(StrictSection):
    """One ordered rule over '/'-joined parameter paths; the first matching rule wins."""

    pattern: str
    freeze: bool = False
    lr_multiplier: NonNegativeFloat = 1.0
    weight_decay_multiplier: NonNegativeFloat = 1.0

    @model_validator(mode="after")
    def _pattern_compiles(self) -> TransferRule:
        import re

        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {error}") from None
        return self


class AugmentParams(StrictSection):
    random_crop: bool = True
    flip: bool = True
    # Test-time augmentation: validation and test predictions average the class
    # probabilities of each image and its mirror image (images only).
    test_time_flip: bool = False
    # Random erasing (Zhong et al., 2020): the share of training images in which one random
    # rectangle (2-40% of the image) is replaced by noise (images only; 0: none).
    random_erasing: Annotated[float, Field(ge=0, le=1)] = 0.0
    # CutMix (Yun et al., 2019): the share of training images that get a box of another
    # training image of the batch pasted in (its area uniform), the target mixed by area
    # (images only; 0: none).
    cutmix: Annotated[float, Field(ge=0, le=1)] = 0.0
    # Audio only (random_crop and flip are for images): SpecAugment-style masking (Park et
    # al., 2019) of each training clip's log-mel spectrogram: one random run of up to 20
    # frames (0.32 s) and one of up to 12 of the 96 mel bands are set to silence
    # (tlflax/sound.py).
    spec_augment: bool = False


# The augmentation keys each modality's training applies. A key of another modality is
# refused when written (tlflax.config) and, left at its default, does nothing there.
AUGMENT_KEYS_BY_MODALITY: dict[str, tuple[str, ...]] = {
    "image": ("random_crop", "flip", "test_time_flip", "random_erasing", "cutmix"),
    "audio": ("spec_augment",),
    "text": (),
}


def describe_augmentation(augment: Mapping[str, Any], modality: str | None = None) -> str:
    """The augmentation settings that are on, as a plan table or model card shows them:
    switches by name, shares with their value ("flip, random_erasing 0.5"); "none".

    With ``modality``, only the keys its training applies: the image defaults (random_crop
    and flip on) would otherwise be listed for text and audio runs that never crop or flip.
    """
    applies = AUGMENT_KEYS_BY_MODALITY[modality] if modality is not None else tuple(augment)
    shown = [
        key if value is True else f"{key} {value:g}"
        for key, value in augment.items()
        if key in applies and (value is True or (isinstance(value, float) and value > 0))
    ]
    return ", ".join(shown) or "none"


def uses_batchnorm(modality: str | None) -> bool:
    """Whether ``modality``'s backbones normalise with BatchNorm, so that ``batchnorm``
    concerns them: the text encoders (BERT family) normalise with LayerNorm instead."""
    return modality != "text"


class ContrastiveParams(StrictSection):
    """SetFit's first stage (Tunstall et al., 2022), for text encoders with few examples.

    Before fine-tuning, the encoder trains on pairs of training examples: the cosine
    similarity of the two features the head reads is pulled towards 1 when they share a
    class and towards 0 when not (one pass over the pairs); then a fresh head is fitted on
    the tuned features (``train_head``'s settings). A pair is a new training signal: n
    examples give ``2 * n * pair_rounds`` of them, which is what makes the stage pay with
    ten examples a class, and what makes it slow with thousands.
    """

    # Rounds of pairs: in each, every training example is paired once with an example of
    # its class and once with one of another class (SetFit's num_iterations). 0: no stage.
    pair_rounds: NonNegativeInt = 0
    # SetFit's defaults for sentence-transformers encoders.
    learning_rate: PositiveFloat = 2e-5
    batch_size: PositiveInt = 16


def describe_contrastive(contrastive: ContrastiveParams) -> str:
    """The contrastive stage as a plan table shows it: "none", or its rounds and rate."""
    if not contrastive.pair_rounds:
        return "none"
    return (
        f"{contrastive.pair_rounds} rounds of pairs, lr {contrastive.learning_rate:g}, "
        f"batch {contrastive.batch_size}"
    )


Strategy = Literal["auto", "feature_extraction", "top_k", "full", "scratch"]


class FinetuneParams(StrictSection):
    """Backbone + trained head, unfrozen by rules, with per-group learning rates.

    ``strategy`` says what trains: ``feature_extraction`` (the head alone), ``top_k`` (the
    top ``unfreeze_groups`` backbone layer groups and the head), ``full``, ``scratch``
    (random weights), or ``auto``: the advise stage's pick. Explicit ``rules`` (only with
    ``auto``) win over the advised strategy. The defaults below are what the library uses
    when called directly; the pipeline's finetune stage fills the advised keys - ``rules``,
    ``epochs``, ``warmup_fraction``, ``layer_lr_decay`` - that ``params.yaml`` leaves unset
    (absent, or null) from the advice (:func:`tlflax.advisor.apply_advice`).
    """

    strategy: Strategy = "auto"
    # top_k: how many backbone layer groups, counted from the top, train.
    unfreeze_groups: PositiveInt | None = None
    learning_rate: PositiveFloat = 1e-3
    batch_size: PositiveInt = 32
    epochs: PositiveInt | None = 6
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] | None = 0.1
    weight_decay: NonNegativeFloat = 1e-4
    gradient_clip_norm: PositiveFloat = 1.0
    layer_lr_decay: Annotated[float, Field(gt=0, le=1)] | None = 0.8
    # Share of each target's probability spread evenly over all classes (0: none).
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Decay of an exponential moving average of the trained weights, validated and saved in
    # their place (0: none); warmed up as TensorFlow's ExponentialMovingAverage.
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # WiSE-FT (Wortsman et al., CVPR 2022): besides the start (the new head on the pretrained
    # network) and the fine-tuned weights, validation also scores each mix
    # (1 - s) * start + s * fine-tuned for the shares s listed, and the best of them all is
    # saved (a tie goes to the smaller share: the model closer to the pretrained one). Empty:
    # the start or the fine-tuned weights only. Not for strategy scratch (its start is random).
    weight_mixes: list[Annotated[float, Field(gt=0, lt=1)]] = []
    # Text: contrastive tuning of the encoder on pairs of training examples, then a new head,
    # before the strategy trains (SetFit; off by default). Not for strategy scratch.
    contrastive: ContrastiveParams = ContrastiveParams()
    # ULMFiT's gradual unfreezing: the head trains from epoch 0, then one more layer group
    # from the top joins per epoch (the step still compiles once: later groups wait at lr 0).
    gradual_unfreezing: bool = False
    batchnorm: Literal["frozen", "train"] = "frozen"
    # Which validation metric picks the best epoch (the saved model) and runs out patience.
    # On a small validation set the loss can stall while accuracy still climbs (the loss
    # also pays for confident mistakes); accuracy ties keep the earlier epoch.
    monitor: Literal["validation_loss", "validation_accuracy"] = "validation_loss"
    patience: PositiveInt = 3
    keep_best_checkpoints: PositiveInt = 2
    augment: AugmentParams = AugmentParams()
    # Run the fully frozen bottom layer groups once, in inference mode, and train the rest
    # from their cached outputs: a step then costs only the layers that train. Needs
    # outputs that do not change from step to step: no image augmentation, frozen BatchNorm.
    cache_frozen_prefix: bool = False
    # bfloat16 compute with float32 master weights: for accelerators (GPU/TPU); on CPU it is
    # slower than float32 and only useful to check that a run fits.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    rules: Annotated[list[TransferRule], Field(min_length=1)] | None = Field(
        default_factory=lambda: [
            TransferRule(pattern="^head/"),
            TransferRule(pattern="^backbone/", lr_multiplier=1.0),
        ],
    )
    seed: NonNegativeInt = 0

    def is_explicit(self, key: str) -> bool:
        """Whether ``params.yaml`` gave ``key`` a value (null counts as unset)."""
        return key in self.model_fields_set and getattr(self, key) is not None

    @model_validator(mode="after")
    def _strategy_settings_agree(self) -> FinetuneParams:
        if self.unfreeze_groups is not None and self.strategy != "top_k":
            raise ValueError(
                f"'unfreeze_groups' applies to strategy 'top_k' only (strategy is "
                f"'{self.strategy}'); set strategy: top_k or remove it"
            )
        if self.is_explicit("rules") and self.strategy != "auto":
            raise ValueError(
                f"'rules' and strategy '{self.strategy}' both say which parameters train; "
                "keep one (with strategy: auto, explicit rules win over the advice)"
            )
        return self


class AdviseParams(StrictSection):
    """The strategy advisor: linear probes of the frozen backbone at every depth.

    The thresholds of its decision rules are named here, so every recommendation can be
    traced to a number in the report (tlflax/advisor.py explains each rule).
    """

    # Probing cost: at most this many training examples (a stratified subset) are embedded;
    # the validation split is used whole.
    max_train_examples: PositiveInt = 2000
    # extract.taps: auto picks the head's depths by greedy forward selection on the leave-
    # one-out accuracy of a ridge probe on the probed training examples (validation only
    # scores the result): a depth joins while it adds at least min_tap_gain, up to max_taps.
    max_taps: PositiveInt = 8
    min_tap_gain: Probability = 0.002
    # Dataset-size regimes, in training examples of the rarest class: below
    # small_data_per_class is "small"; from large_data_per_class on, "large" (training from
    # scratch becomes a candidate, and random-init features are probed as its reference).
    small_data_per_class: PositiveInt = 100
    large_data_per_class: PositiveInt = 2000
    # A depth whose probe accuracy is within this of the best depth's counts as reaching it
    # (plateau; the top group: high similarity).
    plateau_tolerance: Probability = 0.01
    # With large data, train from scratch unless pretrained features beat random-init ones
    # by more than this (validation accuracy of the best depth of each).
    min_pretraining_gain: Probability = 0.02
    # A difference between two probes (a depth vs the best, pretrained vs random init) is
    # real only when it exceeds its threshold above AND McNemar's paired test (two-sided
    # mid-p) rejects equal accuracy at this level. All probes are scored on the same
    # validation examples, so only the examples the two classify differently decide; the
    # standard error of one accuracy would ignore that pairing.
    significance: Annotated[float, Field(gt=0, lt=1)] = 0.05


class TrainScratchParams(StrictSection):
    """The from-scratch baseline: the same architecture, random init, the same data and epochs.

    Everything trains, BatchNorm included (random statistics cannot stay frozen), at a
    learning rate suited to random weights rather than to gentle fine-tuning.
    """

    learning_rate: PositiveFloat = 3e-3
    batch_size: PositiveInt = 32
    weight_decay: NonNegativeFloat = 1e-4
    seed: NonNegativeInt = 0


class ClassBalanceParams(StrictSection):
    """How every trained model - head, fine-tuned, from scratch - meets imbalanced training data.

    ``remedy``: ``none``; ``weights``, per-class weights in the training loss (inverse class
    frequency with ``beta`` 1, the effective number of Cui et al. (2019) below 1), scaled so
    the mean weight over the training examples is 1; ``sampler``, every epoch drawn
    class-balanced (as many examples as the training split holds); ``logit_adjustment``, the
    training loss on ``logits + tau * log(prior)``, the prior being the training split's class
    frequencies (Menon et al., 2021), predictions on the plain logits; or ``auto``: ``none``
    while the training split's largest / smallest class count is within
    ``validate.max_class_ratio``, ``weights`` above it (:mod:`tlflax.balance`).
    """

    remedy: Literal["auto", "none", "weights", "sampler", "logit_adjustment"] = "auto"
    beta: Annotated[float, Field(gt=0, le=1)] = 1.0
    tau: Annotated[float, Field(gt=0, le=10)] = 1.0


class EvaluateParams(StrictSection):
    batch_size: PositiveInt = 256
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 15
