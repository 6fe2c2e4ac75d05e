"""The strategy advisor: probes, decision rules, `strategy: auto` and the advise stage."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from pipelines import reports
from pipelines.stages.advise import advice_markdown
from tests.conftest import run
from tlflax import vision
from tlflax.advisor import (
    Advice,
    Evidence,
    apply_advice,
    bit_hyperrule_schedule,
    recommend,
    strategy_rules,
)
from tlflax.config import AdviseParams, ParamsError, parse_params
from tlflax.data.pipeline import prepare_images
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.registry import create_backbone
from tlflax.models.small_cnn import SmallCNN
from tlflax.prefix_cache import frozen_prefix_groups
from tlflax.probes import DepthProbe, features_by_depth, probe_depths, ridge_probe
from tlflax.transfer import parameter_names, resolve_settings

THRESHOLDS = AdviseParams()  # small < 100 <= medium < 2000 <= large per class


def _evidence(curve, *, per_class, random_curve=None, validation_examples=10_000):
    """Evidence with the given probe accuracy after each group (a 6-group backbone)."""

    def probes(accuracies):
        return tuple(
            DepthProbe(depth, f"group{depth}", 64, accuracy, accuracy, 0.1)
            for depth, accuracy in enumerate(accuracies, start=1)
        )

    return Evidence(
        num_classes=10,
        train_examples=10 * per_class,
        train_examples_per_class=per_class,
        probed_train_examples=min(10 * per_class, 2000),
        validation_examples=validation_examples,
        majority_accuracy=0.1,
        pretrained=probes(curve),
        random_init=probes(random_curve) if random_curve else None,
    )


RISING = [0.40, 0.55, 0.65, 0.72, 0.78, 0.82]  # best at the top: high similarity
PEAKED = [0.40, 0.60, 0.755, 0.76, 0.70, 0.62]  # top groups lose accuracy: low similarity


# --- Decision rules on constructed evidence: the seeds' four scenarios ----------------------


def test_small_data_high_similarity_trains_a_head_on_frozen_features():
    advice = recommend(_evidence(RISING, per_class=10), THRESHOLDS)
    assert (advice.strategy, advice.unfreeze_groups) == ("feature_extraction", 0)
    assert (advice.size_regime, advice.similarity) == ("small", "high")


def test_small_data_low_similarity_retrains_the_groups_above_the_plateau():
    advice = recommend(_evidence(PEAKED, per_class=10), THRESHOLDS)
    # Growth stops at group 3 (0.755, within 0.01 of the best 0.76): retrain groups 4-6.
    assert (advice.strategy, advice.unfreeze_groups) == ("top_k", 3)
    assert advice.similarity == "low"
    assert advice.lr_multipliers()[0] == ("head", 1.0)
    assert [name for name, _ in advice.lr_multipliers()[1:]] == ["group6", "group5", "group4"]


def test_large_data_low_similarity_trains_from_scratch():
    # Random-init features are as good as pretrained ones: pretraining brings nothing.
    evidence = _evidence(PEAKED, per_class=5000, random_curve=[0.5, 0.6, 0.7, 0.75, 0.755, 0.7])
    advice = recommend(evidence, THRESHOLDS)
    assert evidence.pretraining_gain == pytest.approx(0.005)
    assert (advice.strategy, advice.size_regime) == ("scratch", "large")
    assert advice.layer_lr_decay == 1.0


def test_large_data_high_similarity_fine_tunes_everything():
    evidence = _evidence(RISING, per_class=5000, random_curve=[0.3, 0.4, 0.45, 0.5, 0.5, 0.5])
    advice = recommend(evidence, THRESHOLDS)
    assert (advice.strategy, advice.unfreeze_groups) == ("full", 6)
    assert advice.schedule == bit_hyperrule_schedule(50_000)
    assert advice.schedule.steps == 10_000


def test_medium_data_high_similarity_fine_tunes_everything():
    assert recommend(_evidence(RISING, per_class=500), THRESHOLDS).strategy == "full"


def test_a_top_drop_within_validation_noise_is_not_low_similarity():
    curve = [0.40, 0.60, 0.755, 0.76, 0.74, 0.73]  # the top is 0.03 below the best
    assert recommend(_evidence(curve, per_class=10), THRESHOLDS).strategy == "top_k"
    # With 100 validation examples the standard error (~0.043) covers the drop.
    noisy = recommend(_evidence(curve, per_class=10, validation_examples=100), THRESHOLDS)
    assert noisy.strategy == "feature_extraction"
    assert noisy.tolerance == pytest.approx(np.sqrt(0.76 * 0.24 / 100))


def test_bit_hyperrule_schedule_follows_dataset_size():
    assert bit_hyperrule_schedule(19_999).steps == 500
    assert bit_hyperrule_schedule(19_999).decay_steps == (200, 300, 400)
    assert bit_hyperrule_schedule(20_000).steps == 10_000
    assert bit_hyperrule_schedule(500_000).steps == 20_000
    # 1000 examples in batches of 32: 32 steps an epoch, 16 epochs cover 500 steps.
    assert bit_hyperrule_schedule(1000).epochs(1000, 32) == 16


def test_advice_survives_its_json_round_trip():
    evidence = _evidence(PEAKED, per_class=5000, random_curve=RISING)
    advice = recommend(evidence, THRESHOLDS)
    assert Advice.from_json(json.loads(json.dumps(advice.to_json()))) == advice


# --- The probe ----------------------------------------------------------------------------


def test_ridge_probe_leave_one_out_matches_refitting_without_each_example():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    features = rng.normal(size=(36, 20)) + 1.5 * np.eye(3)[labels] @ rng.normal(size=(3, 20))
    result = ridge_probe(features, labels, features[:6], labels[:6], 3)
    # Refit the chosen penalty 36 times, each time without one example, as the probe does.
    scale = np.sqrt(np.mean(features**2))
    design = np.concatenate([features / scale, np.ones((36, 1))], axis=1)
    penalty = result.relative_penalty * np.mean(np.linalg.svd(design, compute_uv=False) ** 2)
    targets = np.eye(3)[labels]
    correct = 0
    for left_out in range(36):
        keep = np.arange(36) != left_out
        weights = np.linalg.solve(
            design[keep].T @ design[keep] + penalty * np.eye(21), design[keep].T @ targets[keep]
        )
        correct += int((design[left_out] @ weights).argmax() == labels[left_out])
    assert result.leave_one_out_accuracy == pytest.approx(correct / 36)


def test_probe_accuracy_grows_with_depth_of_a_pretrained_backbone():
    """Real digits through real EfficientNet-Lite0 ImageNet weights, every group probed."""
    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)[..., None]
    labels = digits.target
    train, validation = np.arange(0, 400), np.arange(1000, 1300)
    backbone, _ = create_backbone("efficientnet_lite0", pretrained=True, rngs=nnx.Rngs(0))

    def pooled(backbone, batch):
        return vision.pooled_after_each_group(backbone, prepare_images(batch["image"], 32))

    features = features_by_depth(
        backbone,
        pooled,
        {"train": {"image": images[train]}, "validation": {"image": images[validation]}},
        batch_size=128,
    )
    # The deepest pooled output is exactly the pipeline's feature extraction.
    extracted = vision.extract_features(backbone, images[validation], image_size=32, batch_size=64)
    np.testing.assert_allclose(features["validation"][-1], extracted, atol=1e-5)
    probes = probe_depths(
        features["train"],
        labels[train],
        features["validation"],
        labels[validation],
        num_classes=10,
        group_patterns=backbone.group_patterns(),
    )
    accuracies = [probe.validation_accuracy for probe in probes]
    assert [probe.feature_dim for probe in probes][:2] == [32, 16]
    assert max(accuracies[6:]) > accuracies[0] + 0.1, accuracies
    assert np.mean(accuracies[6:]) > np.mean(accuracies[:3]), accuracies


# --- strategy: auto, explicit overrides, and the rules each strategy makes ----------------


def _classifier() -> ImageClassifier:
    rngs = nnx.Rngs(0)
    backbone = SmallCNN(widths=(8, 8, 8, 8), rngs=rngs)
    return ImageClassifier(backbone, Head(8, 3, rngs=rngs))


def _advice(strategy_curve=PEAKED) -> Advice:
    return recommend(_evidence(strategy_curve, per_class=10), THRESHOLDS)


def _apply(finetune: dict, advice: Advice):
    params = parse_params({"finetune": finetune})
    patterns = _classifier().backbone.group_patterns()
    return apply_advice(params.finetune, advice, group_patterns=patterns, num_train_examples=100)


def test_strategy_auto_applies_the_advice_to_every_unset_setting():
    applied = _apply({"strategy": "auto", "epochs": None}, _advice())
    assert applied.strategy == "top_k"
    assert applied.from_advice == ("epochs", "layer_lr_decay", "rules", "warmup_fraction")
    cfg = applied.finetune
    assert cfg.epochs == 125  # 500 steps, 4 a epoch (100 examples, batches of 32)
    assert cfg.warmup_fraction == pytest.approx(0.2)
    model = _classifier()
    # The advice retrains the top 3 groups; the frozen prefix is the other 1 (of 4).
    assert frozen_prefix_groups(model, cfg.rules) == 1


def test_explicit_settings_win_over_the_advice():
    applied = _apply({"epochs": 3, "layer_lr_decay": 0.5}, _advice())
    assert (applied.finetune.epochs, applied.finetune.layer_lr_decay) == (3, 0.5)
    assert applied.from_advice == ("rules", "warmup_fraction")

    rules = [{"pattern": "^head/"}, {"pattern": ".*", "freeze": True}]
    explicit = _apply({"rules": rules}, _advice())
    assert explicit.strategy == "rules"
    assert [rule.pattern for rule in explicit.finetune.rules] == ["^head/", ".*"]

    chosen = _apply({"strategy": "top_k", "unfreeze_groups": 1}, _advice(RISING))
    assert chosen.strategy == "top_k"
    assert frozen_prefix_groups(_classifier(), chosen.finetune.rules) == 3

    full = _apply({"strategy": "full"}, _advice())
    assert frozen_prefix_groups(_classifier(), full.finetune.rules) == 0


@pytest.mark.parametrize(
    ("strategy", "unfreeze", "frozen_groups"),
    [("feature_extraction", 0, 4), ("top_k", 1, 3), ("top_k", 4, 0), ("full", 4, 0)],
)
def test_strategy_rules_freeze_exactly_the_bottom_groups(strategy, unfreeze, frozen_groups):
    model = _classifier()
    rules = strategy_rules(strategy, unfreeze, model.backbone.group_patterns())
    params = nnx.state(model, nnx.Param)
    names = parameter_names(params)
    ndims = {name: 2 for name in names}
    settings = resolve_settings(names, rules, ndims=ndims)
    assert not settings["head/output/kernel"].frozen
    frozen = {name.split("/")[2] for name in names if settings[name].frozen}
    assert frozen == {str(index) for index in range(frozen_groups)}


def test_strategy_rules_refuse_more_groups_than_the_backbone_has():
    with pytest.raises(ValueError, match="unfreeze_groups' is 5; this backbone has 4"):
        strategy_rules("top_k", 5, _classifier().backbone.group_patterns())


@pytest.mark.parametrize(
    ("finetune", "message"),
    [
        ({"unfreeze_groups": 3}, "'unfreeze_groups' applies to strategy 'top_k' only"),
        (
            {"strategy": "full", "rules": [{"pattern": ".*"}]},
            "'rules' and strategy 'full' both say which parameters train",
        ),
        ({"strategy": "top-k"}, "'finetune.strategy': Input should be"),
    ],
)
def test_contradicting_strategy_settings_are_refused_naming_the_keys(finetune, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"finetune": finetune})


def test_the_advice_report_names_the_pick_and_marks_best_and_plateau(tmp_path):
    warnings = []
    assert reports.advice_report(tmp_path, "vision", warnings.append) is None
    advice = recommend(_evidence(PEAKED, per_class=10), THRESHOLDS)
    path = tmp_path / "reports/vision/advice.md"
    path.parent.mkdir(parents=True)
    path.write_text(advice_markdown(advice, title="vision: transfer strategy advice"))
    text = reports.advice_report(tmp_path, "vision", warnings.append)
    assert "**Recommendation: top k**, the top 3 of 6 layer groups; 500 steps" in text
    assert "| 3 | group3 (plateau) | 64 | 0.755 |" in text
    assert "| 4 | group4 (best) | 64 | 0.760 |" in text
    assert "| group6 | 0.7 |" in text  # layer-wise decay 0.7 from the top trained group
    assert reports.artifact_key("vision", "advice") == "tlflax-vision-advice"
    assert warnings == []


# --- The advise stage in the real (tiny) DVC pipeline --------------------------------------


@pytest.mark.slow
def test_advise_stage_runs_in_the_pipeline_and_its_advice_is_a_dvc_metric(tiny_project):
    result = run([sys.executable, "-m", "dvc", "repro", "advise"], cwd=tiny_project, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    advice = json.loads((tiny_project / "metrics/vision/advice.json").read_text())
    assert advice["strategy"] in {"feature_extraction", "top_k", "full", "scratch"}
    assert len(advice["evidence"]["pretrained"]) == 18  # stem, 16 blocks, head conv
    assert advice["evidence"]["train_examples_per_class"] == 6
    assert advice["schedule"]["steps"] == 500
    report = (tiny_project / "reports/vision/advice.md").read_text()
    assert "**Recommendation:" in report and "| 18 | head_conv" in report
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=tiny_project)
    assert "advice.json" in shown.stdout, shown.stdout + shown.stderr
    again = run([sys.executable, "-m", "dvc", "repro", "advise"], cwd=tiny_project, timeout=300)
    assert "Running stage 'advise'" not in again.stdout, again.stdout
