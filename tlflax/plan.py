"""One resolved plan per run: the advice and the written settings, merged once.

Settings come from three places - ``params.yaml``'s ``finetune`` and ``train_scratch``
sections, the ``advise`` stage's recommendation, and the library defaults. They merge here,
once, into a :class:`RunPlan` with no optional field; every training run (fine-tuning, the
from-scratch reference, the strategy grid) takes its :class:`TrainingPlan` and never
re-derives a setting. The pipeline writes the plan to ``metrics/<experiment>/plan.json``,
where DVC tracks it, and prints it as a table (:func:`plan_table`) when training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from flax import nnx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from tlflax.advisor import Advice, apply_advice
from tlflax.balance import NO_REMEDY, ClassBalance
from tlflax.config import FinetuneParams, ParamsError, TrainScratchParams, TransferRule
from tlflax.config_training import (
    ContrastiveParams,
    describe_augmentation,
    describe_contrastive,
    uses_batchnorm,
)
from tlflax.errors import InputError, MissingInputError
from tlflax.transfer import model_settings

ResolvedStrategy = Literal["feature_extraction", "top_k", "full", "scratch", "rules"]


class TrainingPlan(FinetuneParams):
    """The settings of one training run, every one of them decided (no null, no ``auto``).

    A :class:`~tlflax.config.FinetuneParams` (so the trainer takes it as is) whose fields
    that ``params.yaml`` may leave to the advice are required here. ``strategy`` records
    what decided the rules: a named strategy, or ``rules`` written by hand.
    """

    strategy: ResolvedStrategy  # type: ignore[assignment]
    unfreeze_groups: NonNegativeInt  # type: ignore[assignment]
    epochs: PositiveInt  # type: ignore[assignment]
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)]  # type: ignore[assignment]
    layer_lr_decay: Annotated[float, Field(gt=0, le=1)]  # type: ignore[assignment]
    rules: Annotated[list[TransferRule], Field(min_length=1)]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _strategy_settings_agree(self) -> TrainingPlan:
        # The parent's check concerns what a user may write together; a plan is resolved,
        # so its strategy and rules always agree by construction.
        return self


class GroupLearningRate(BaseModel):
    """How one part of the model trains under a plan: a backbone layer group or the head."""

    model_config = ConfigDict(frozen=True)

    name: str
    parameters: int
    trains: bool
    # Peak learning rate (after warmup) of the group's parameters, and the multiplier of the
    # plan's learning rate it comes from (rule multiplier x layer-wise decay).
    lr_multiplier: float
    peak_learning_rate: float
    unfreeze_epoch: int


class RunPlan(BaseModel):
    """The decided settings of one run of the pipeline (``metrics/<experiment>/plan.json``)."""

    model_config = ConfigDict(frozen=True)

    advised_strategy: str
    # The finetune keys whose values came from the advice (the rest were written).
    from_advice: list[str]
    finetune: TrainingPlan
    scratch: TrainingPlan
    learning_rates: list[GroupLearningRate]
    # The depths the head reads (tlflax.taps), layer groups counted from 1, the network cut
    # at the highest; "last": the backbone's final pooled features. Every model of the run -
    # head only, fine-tuned, from scratch - has this architecture.
    taps: list[int] | Literal["last"]
    # The remedy for imbalanced training data every model of the run trains with (the head
    # resolves the same from the same counts): none, class weights in the loss, logit
    # offsets in the loss, or class-balanced epochs, and why.
    class_balance: ClassBalance

    @property
    def head_taps(self) -> list[int] | None:
        """The taps a classifier is built with (None: the final pooled features)."""
        return None if self.taps == "last" else self.taps


def scratch_plan(finetune: TrainingPlan, scratch: TrainScratchParams) -> TrainingPlan:
    """Fine-tuning's plan turned into training from random weights.

    Same epochs, augmentation, schedule shape and early stopping as fine-tuning; only what
    must differ for random weights differs: everything trains, BatchNorm included, at one
    learning rate, no weight mixes (their start, the random network, is no model) and no
    contrastive stage (it tunes pretrained features).
    """
    return finetune.model_copy(
        update={
            "strategy": "scratch",
            "unfreeze_groups": 0,
            "learning_rate": scratch.learning_rate,
            "batch_size": scratch.batch_size,
            "weight_decay": scratch.weight_decay,
            "layer_lr_decay": 1.0,
            "gradual_unfreezing": False,
            "batchnorm": "train",
            "cache_frozen_prefix": False,
            "weight_mixes": [],
            "contrastive": ContrastiveParams(),
            "rules": [TransferRule(pattern=".*")],
            "seed": scratch.seed,
        }
    )


def group_learning_rates(
    model: nnx.Module, plan: TrainingPlan, group_patterns: Sequence[str]
) -> list[GroupLearningRate]:
    """Per layer group (bottom to top, then the head): what trains, and at which rate.

    ``model`` may be abstract (``nnx.eval_shape``): only parameter names and shapes are read.
    """
    resolved = model_settings(
        model,
        plan.rules,
        group_patterns=group_patterns,
        layer_lr_decay=plan.layer_lr_decay,
        gradual_unfreezing=plan.gradual_unfreezing,
    )
    settings, sizes, depths = resolved.settings, resolved.sizes, resolved.depths
    names = list(settings)
    num_groups = len(group_patterns)
    # Depth counts from the top (1 = last backbone group, 0 = the head).
    labels = {depth: f"backbone group {num_groups - depth}" for depth in range(1, num_groups + 1)}
    labels[0] = "head"
    rows = []
    for depth in [*range(num_groups, 0, -1), 0]:
        members = [name for name in names if depths[name] == depth]
        if not members:
            continue
        trained = [settings[name] for name in members if not settings[name].frozen]
        multiplier = max((s.lr_multiplier for s in trained), default=0.0)
        rows.append(
            GroupLearningRate(
                name=labels[depth],
                parameters=sum(sizes[name] for name in members),
                trains=bool(trained),
                lr_multiplier=round(multiplier, 6),
                peak_learning_rate=plan.learning_rate * multiplier,
                unfreeze_epoch=min((s.unfreeze_epoch for s in trained), default=0),
            )
        )
    return rows


def resolve_taps(
    taps: Literal["auto", "last"] | list[int],
    advised: Sequence[int] | None,
    *,
    num_groups: int,
) -> list[int] | None:
    """``extract.taps`` decided: the ``advised`` depths for ``auto`` (None where the advice
    has none), None for ``last``.

    Raises:
      ParamsError: a written depth beyond the backbone's ``num_groups`` layer groups.
    """
    if taps == "last":
        return None
    if taps == "auto":
        return None if advised is None else list(advised)
    if taps[-1] > num_groups:
        raise ParamsError(
            f"'extract.taps': depth {taps[-1]} is beyond the backbone's {num_groups} layer "
            f"groups; use depths 1 to {num_groups}"
        )
    return list(taps)


def resolve_plan(
    finetune: FinetuneParams,
    scratch: TrainScratchParams,
    advice: Advice,
    *,
    model: nnx.Module,
    num_train_examples: int,
    taps: list[int] | None = None,
    class_balance: ClassBalance = NO_REMEDY,
) -> RunPlan:
    """Merge ``finetune`` (written settings win), the advice and the defaults into a plan.

    Args:
      finetune, scratch: the ``finetune`` and ``train_scratch`` sections of params.yaml.
      advice: the advise stage's recommendation (:func:`tlflax.advisor.recommend`).
      model: the classifier the plan trains (abstract is enough): its layer groups.
      num_train_examples: training examples, which turn the advised steps into epochs.
      taps: the depths the model's head reads (:func:`resolve_taps`); ``model`` is built
        with them, so its layer groups are those of the cut network.
      class_balance: the remedy for imbalanced training data
        (:func:`tlflax.balance.resolve_class_balance`).
    """
    group_patterns = model.backbone.group_patterns()
    applied = apply_advice(
        finetune, advice, group_patterns=group_patterns, num_train_examples=num_train_examples
    )
    resolved = applied.finetune.model_dump()
    resolved["strategy"] = applied.strategy
    resolved["unfreeze_groups"] = _trained_groups(applied.finetune.rules, model, group_patterns)
    finetune_plan = TrainingPlan(**resolved)
    scratch_run = scratch_plan(finetune_plan, scratch)
    if applied.strategy == "scratch":
        # Pretrained features no better than random ones, and data enough: "fine-tuning" is
        # the same network from random weights, trained as the from-scratch reference is.
        finetune_plan = scratch_run
    return RunPlan(
        advised_strategy=advice.strategy,
        from_advice=list(applied.from_advice),
        finetune=finetune_plan,
        scratch=scratch_run,
        learning_rates=group_learning_rates(model, finetune_plan, group_patterns),
        taps="last" if taps is None else taps,
        class_balance=class_balance,
    )


def _trained_groups(
    rules: Sequence[TransferRule], model: nnx.Module, group_patterns: Sequence[str]
) -> int:
    """How many backbone layer groups have at least one parameter that trains."""
    resolved = model_settings(
        model, rules, group_patterns=group_patterns, layer_lr_decay=1.0, gradual_unfreezing=False
    )
    return len(
        {
            resolved.depths[name]
            for name, setting in resolved.settings.items()
            if not setting.frozen and resolved.depths[name] > 0
        }
    )


def plan_table(plan: RunPlan, modality: str | None = None) -> str:
    """The plan as the text table a run prints when it starts; with ``modality``, the
    augmentation row names only what that modality's training applies."""
    cfg = plan.finetune
    settings = [
        ("strategy", f"{cfg.strategy} (advised: {plan.advised_strategy})"),
        (
            "head reads",
            "final pooled features"
            if plan.head_taps is None
            else f"layer groups {', '.join(map(str, plan.head_taps))} "
            f"(cut after {plan.head_taps[-1]})",
        ),
        ("backbone groups that train", str(cfg.unfreeze_groups)),
        ("epochs", str(cfg.epochs)),
        ("batch size", str(cfg.batch_size)),
        ("learning rate (head)", f"{cfg.learning_rate:g}"),
        ("layer-wise LR decay", f"{cfg.layer_lr_decay:g}"),
        ("warmup fraction", f"{cfg.warmup_fraction:.3f}"),
        ("weight decay", f"{cfg.weight_decay:g}"),
        ("gradient clip norm", f"{cfg.gradient_clip_norm:g}"),
        ("label smoothing", f"{cfg.label_smoothing:g}"),
        ("weight EMA decay", f"{cfg.ema_decay:g}" if cfg.ema_decay else "none"),
        (
            "weight mixes (WiSE-FT)",
            ", ".join(f"{share:g}" for share in cfg.weight_mixes) or "none",
        ),
        # Text encoders only (SetFit): an image or audio run never has the stage.
        *(
            [("contrastive stage (SetFit)", describe_contrastive(cfg.contrastive))]
            if modality == "text" or cfg.contrastive.pair_rounds
            else []
        ),
        ("gradual unfreezing", str(cfg.gradual_unfreezing).lower()),
        # A transformer has LayerNorm only: the row would describe nothing it holds.
        *([("BatchNorm", cfg.batchnorm)] if uses_batchnorm(modality) else []),
        ("monitor / patience", f"{cfg.monitor} / {cfg.patience}"),
        ("augmentation", describe_augmentation(cfg.augment.model_dump(), modality)),
        ("frozen-prefix cache", str(cfg.cache_frozen_prefix).lower()),
        ("class balance", plan.class_balance.describe()),
        ("from the advice", ", ".join(plan.from_advice) or "nothing"),
        ("from scratch", f"lr {plan.scratch.learning_rate:g}, batch {plan.scratch.batch_size}"),
    ]
    width = max(len(name) for name, _ in settings)
    lines = [f"  {name:<{width}}  {value}" for name, value in settings]
    lines.append(f"  {'group':<24} {'parameters':>11} {'peak LR':>10} {'from epoch':>10}")
    for row in plan.learning_rates:
        rate = f"{row.peak_learning_rate:.3g}" if row.trains else "frozen"
        lines.append(f"  {row.name:<24} {row.parameters:>11,} {rate:>10} {row.unfreeze_epoch:>10}")
    return "\n".join(lines)


def load_plan(path: Path) -> RunPlan:
    """The plan the ``plan`` stage wrote to ``path``.

    Raises:
      MissingInputError: there is no plan yet (the plan stage has not run).
      InputError: the file is not a complete plan (naming the first wrong key).
    """
    if not path.exists():
        raise MissingInputError(
            f"{path} is missing: run the plan stage first (dvc repro plan); the training "
            "stages take every setting from it"
        )
    try:
        return RunPlan.model_validate_json(path.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        raise InputError(
            f"{path}: '{location}': {first['msg']}; run the plan stage again (dvc repro plan)"
        ) from None
