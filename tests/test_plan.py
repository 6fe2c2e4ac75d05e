"""The resolved plan: advice and written settings merged once, nothing left undecided."""

from __future__ import annotations

import json

import pytest
from flax import nnx

from tests.test_train import _classifier, load_digits_split
from tlflax.advisor import measure, recommend
from tlflax.config import (
    AdviseParams,
    AugmentParams,
    FinetuneParams,
    TrainScratchParams,
    TransferRule,
)
from tlflax.data.pipeline import prepare_images
from tlflax.errors import InputError, MissingInputError
from tlflax.plan import RunPlan, TrainingPlan, load_plan, plan_table, resolve_plan
from tlflax.vision import pooled_after_each_group


@pytest.fixture(scope="module")
def advice():
    train, validation = load_digits_split()
    model = _classifier()

    def pooled(backbone, batch):
        return pooled_after_each_group(backbone, prepare_images(batch["image"], 16))

    evidence, _ = measure(model.backbone, pooled, train, validation, num_classes=10, batch_size=64)
    return recommend(evidence, AdviseParams())


def _abstract():
    return nnx.eval_shape(lambda: _classifier())


def _nulls(value, path=""):
    if value is None:
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _nulls(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nulls(item, f"{path}[{index}]")


def test_auto_plan_is_fully_populated(advice):
    plan = resolve_plan(
        FinetuneParams(strategy="auto", epochs=None, warmup_fraction=None, layer_lr_decay=None),
        TrainScratchParams(),
        advice,
        model=_abstract(),
        num_train_examples=300,
    )
    written = plan.model_dump(mode="json")
    assert list(_nulls(written)) == []
    assert plan.finetune.strategy == advice.strategy
    assert {"epochs", "warmup_fraction", "layer_lr_decay", "rules"} <= set(plan.from_advice)
    assert plan.finetune.epochs == advice.schedule.epochs(300, 32)
    # The scratch plan: same budget and schedule, everything trains with BatchNorm.
    assert plan.scratch.epochs == plan.finetune.epochs
    assert plan.scratch.batchnorm == "train" and plan.scratch.layer_lr_decay == 1.0
    # Round trip through the file the stage writes.
    assert RunPlan.model_validate_json(json.dumps(written)) == plan


def test_written_settings_win_and_full_keeps_layer_decay(advice):
    augment = AugmentParams(flip=False, random_erasing=0.25)
    plan = resolve_plan(
        FinetuneParams(
            strategy="full", epochs=7, learning_rate=1e-3, layer_lr_decay=None, augment=augment
        ),
        TrainScratchParams(),
        advice,
        model=_abstract(),
        num_train_examples=300,
    )
    cfg = plan.finetune
    assert cfg.strategy == "full" and cfg.epochs == 7 and cfg.unfreeze_groups == 2
    assert "epochs" not in plan.from_advice
    # A hand-picked strategy keeps layer-wise decay: the lower group learns slower.
    assert cfg.layer_lr_decay < 1.0
    rates = {row.name: row.peak_learning_rate for row in plan.learning_rates}
    assert rates["head"] == pytest.approx(1e-3)
    assert rates["backbone group 0"] < rates["backbone group 1"] < rates["head"]
    table = plan_table(plan)
    assert "full (advised: " in table and "backbone group 0" in table
    # Switches by name, shares with their value; what is off is not listed.
    assert "random_crop, random_erasing 0.25" in table and "flip," not in table
    assert plan_table(plan, "image") == table
    # Text and audio training never crop or erase: the image defaults are not listed there.
    augmentation = {
        modality: next(
            line for line in plan_table(plan, modality).splitlines() if "augment" in line
        )
        for modality in ("text", "audio")
    }
    assert augmentation["text"].split()[-1] == "none", augmentation
    assert augmentation["audio"].split()[-1] == "none", augmentation
    # A transformer has no BatchNorm: its table has no such row; a CNN's says what it does.
    assert "BatchNorm" not in plan_table(plan, "text")
    assert "BatchNorm" in plan_table(plan, "audio") and "BatchNorm" in table

    # No weight mixes unless asked for; then the shares, as the run will try them.
    def mixes_row(table: str) -> str:
        return next(line for line in table.splitlines() if "weight mixes (WiSE-FT)" in line)

    assert mixes_row(table).split()[-1] == "none"
    mixed = plan.model_copy(
        update={"finetune": cfg.model_copy(update={"weight_mixes": [0.25, 0.5]})}
    )
    assert mixes_row(plan_table(mixed)).endswith("  0.25, 0.5")
    # The from-scratch run starts from random weights: there is no model to mix with.
    mixing = resolve_plan(
        FinetuneParams(weight_mixes=[0.25, 0.5]),
        TrainScratchParams(),
        advice,
        model=_abstract(),
        num_train_examples=300,
    )
    assert mixing.finetune.weight_mixes == [0.25, 0.5] and mixing.scratch.weight_mixes == []
    spec = resolve_plan(
        FinetuneParams(augment=AugmentParams(spec_augment=True), cache_frozen_prefix=False),
        TrainScratchParams(),
        advice,
        model=_abstract(),
        num_train_examples=300,
    )
    audio_line = next(line for line in plan_table(spec, "audio").splitlines() if "augment" in line)
    assert audio_line.split() == ["augmentation", "spec_augment"]


def test_explicit_rules_are_the_plan(advice):
    rules = [TransferRule(pattern="^head/"), TransferRule(pattern=".*", freeze=True)]
    plan = resolve_plan(
        FinetuneParams(strategy="auto", rules=rules),
        TrainScratchParams(),
        advice,
        model=_abstract(),
        num_train_examples=300,
    )
    assert plan.finetune.strategy == "rules" and plan.finetune.unfreeze_groups == 0
    assert [row.trains for row in plan.learning_rates] == [False, False, True]


def test_a_plan_has_no_optional_field():
    with pytest.raises(ValueError, match="epochs"):
        TrainingPlan(strategy="full", unfreeze_groups=1, warmup_fraction=0.1,
                     layer_lr_decay=0.8, rules=[TransferRule(pattern=".*")])  # fmt: skip


def test_load_plan_names_the_file(tmp_path):
    with pytest.raises(MissingInputError, match="plan stage"):
        load_plan(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text('{"advised_strategy": "full"}')
    with pytest.raises(InputError, match=r"plan\.json: 'from_advice'"):
        load_plan(tmp_path / "plan.json")
