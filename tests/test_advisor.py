"""The strategy advisor: probes, decision rules, `strategy: auto` and the advise stage."""

from __future__ import annotations

import json
import sys
from fractions import Fraction

import numpy as np
import pytest
from flax import nnx
from scipy.stats import binom, binomtest
from sklearn.datasets import load_digits

from pipelines import reports
from tests.conftest import run
from tlflax import vision
from tlflax.advice_report import advice_markdown
from tlflax.advisor import (
    Advice,
    Evidence,
    apply_advice,
    bit_hyperrule_schedule,
    groups_above_the_frozen_bottom,
    recommend,
    recommended_layer_lr_decay,
    strategy_rules,
)
from tlflax.config import AdviseParams, ParamsError, parse_params
from tlflax.data.pipeline import prepare_images
from tlflax.models.heads import Head, ImageClassifier
from tlflax.models.registry import create_backbone
from tlflax.models.small_cnn import SmallCNN
from tlflax.prefix_cache import frozen_prefix_groups
from tlflax.probes import (
    DepthProbe,
    PairedTest,
    features_by_depth,
    mcnemar_mid_p,
    pack_correct,
    paired_test,
    probe_depths,
    ridge_probe,
    unpack_correct,
)
from tlflax.transfer import parameter_names, resolve_settings

THRESHOLDS = AdviseParams()  # small < 100 <= medium < 2000 <= large per class


def _probe(depth: int, correct: np.ndarray) -> DepthProbe:
    """The probe after group ``depth`` that gets right the validation examples ``correct``."""
    accuracy = float(np.mean(correct))
    return DepthProbe(
        depth, f"group{depth}", 64, accuracy, accuracy, 0.1, pack_correct(correct), len(correct)
    )


def _nested(accuracies, validation_examples: int) -> tuple[DepthProbe, ...]:
    """Probes that each get right the first ``accuracy * n`` examples: a more accurate depth
    gets right everything a less accurate one does (errors as correlated as they can be)."""
    positions = np.arange(validation_examples)
    return tuple(
        _probe(depth, positions < round(accuracy * validation_examples))
        for depth, accuracy in enumerate(accuracies, start=1)
    )


def _evidence_of(pretrained, *, per_class, random_init=None):
    return Evidence(
        num_classes=10,
        train_examples=10 * per_class,
        train_examples_per_class=per_class,
        probed_train_examples=min(10 * per_class, 2000),
        validation_examples=pretrained[0].validation_examples,
        majority_accuracy=0.1,
        pretrained=tuple(pretrained),
        random_init=random_init,
    )


def _evidence(curve, *, per_class, random_curve=None, validation_examples=10_000):
    """Evidence with the given probe accuracy after each group (one entry per group)."""
    return _evidence_of(
        _nested(curve, validation_examples),
        per_class=per_class,
        random_init=_nested(random_curve, validation_examples) if random_curve else None,
    )


def _correct_at(examples: int, *ranges: tuple[int, int]) -> np.ndarray:
    """Correctness on ``examples`` validation examples: right exactly in the given ranges."""
    correct = np.zeros(examples, dtype=bool)
    for start, stop in ranges:
        correct[start:stop] = True
    return correct


# Two probes 0.05 apart on the same 200 validation examples (0.80 vs 0.75), paired two ways.
BETTER = _correct_at(200, (0, 160))
# Wrong on a subset of what BETTER gets wrong: they disagree on 10 examples, all one way.
CORRELATED = _correct_at(200, (0, 150))
# Errors unrelated to BETTER's: they disagree on 50 examples, 30 one way and 20 the other.
INDEPENDENT = _correct_at(200, (0, 130), (160, 180))


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


def test_medium_data_fine_tunes_everything_whatever_the_similarity():
    for curve, similarity in [(RISING, "high"), (PEAKED, "low")]:
        advice = recommend(_evidence(curve, per_class=500), THRESHOLDS)
        assert (advice.size_regime, advice.similarity) == ("medium", similarity)
        assert (advice.strategy, advice.unfreeze_groups) == ("full", 6)
        # Lower groups slower: the layer-wise decay, not a freeze, holds the bottom.
        assert advice.layer_lr_decay < 1.0


def test_a_top_drop_within_validation_noise_is_not_low_similarity():
    curve = [0.40, 0.60, 0.755, 0.76, 0.74, 0.73]  # the top is 0.03 below the best
    assert recommend(_evidence(curve, per_class=10), THRESHOLDS).strategy == "top_k"
    # With 100 validation examples the two disagree on 3, all against the top: mid-p 1/8.
    noisy = recommend(_evidence(curve, per_class=10, validation_examples=100), THRESHOLDS)
    assert noisy.strategy == "feature_extraction"
    similarity = noisy.comparisons[0]
    assert (similarity.call, similarity.real) == ("similarity", False)
    assert similarity.test == PairedTest(100, 3, 0, 0.125)


# --- The paired test: the examples two depths disagree on decide ---------------------------


def test_mcnemar_mid_p_is_the_exact_binomial_p_less_half_the_observed_outcome():
    # 10 vs 4 discordant: (2 (1 + 14 + 91 + 364) + C(14, 4)) / 2^14, by hand.
    assert mcnemar_mid_p(10, 4) == pytest.approx(float(Fraction(2 * 470 + 1001, 2**14)))
    for first, second in [(10, 4), (3, 0), (0, 12), (30, 20), (2500, 2400)]:
        observed = min(first, second)
        exact = binomtest(first, first + second, 0.5).pvalue
        expected = exact - binom.pmf(observed, first + second, 0.5)
        assert mcnemar_mid_p(first, second) == pytest.approx(expected, rel=1e-9)
        assert mcnemar_mid_p(second, first) == mcnemar_mid_p(first, second)
    assert mcnemar_mid_p(7, 7) == mcnemar_mid_p(0, 0) == 1.0


def test_paired_test_counts_only_the_examples_the_two_probes_disagree_on():
    assert paired_test(BETTER, CORRELATED) == PairedTest(200, 10, 0, mcnemar_mid_p(10, 0))
    independent = paired_test(BETTER, INDEPENDENT)
    assert (independent.discordant, independent.first_only_correct) == (50, 30)
    assert independent.difference == pytest.approx(0.05)
    # Packed correctness survives its encoding, padding bits dropped.
    odd = np.random.default_rng(0).random(203) < 0.5
    np.testing.assert_array_equal(unpack_correct(pack_correct(odd), 203), odd)


@pytest.mark.parametrize(
    ("top", "similarity", "strategy"),
    [
        (CORRELATED, "low", "top_k"),
        (INDEPENDENT, "high", "feature_extraction"),
    ],
)
def test_the_same_top_drop_is_real_only_when_the_pairs_show_it(top, similarity, strategy):
    # Best 0.80 after group 2, top 0.75 after group 3 in both cases: 0.05 is over the
    # tolerance, but only correlated errors make it significant (mid-p 0.001 against 0.16).
    pretrained = (_probe(1, _correct_at(200, (0, 60))), _probe(2, BETTER), _probe(3, top))
    advice = recommend(_evidence_of(pretrained, per_class=10), THRESHOLDS)
    assert advice.evidence.top_deficit == pytest.approx(0.05)
    assert (advice.similarity, advice.strategy) == (similarity, strategy)
    assert advice.plateau_depth == 2


@pytest.mark.parametrize(("middle", "plateau"), [(CORRELATED, 3), (INDEPENDENT, 2)])
def test_accuracy_stops_growing_where_the_pairs_no_longer_show_a_real_gain(middle, plateau):
    # Group 2 is 0.05 below the best (the top, group 3): really worse only when paired.
    pretrained = (_probe(1, _correct_at(200, (0, 60))), _probe(2, middle), _probe(3, BETTER))
    advice = recommend(_evidence_of(pretrained, per_class=10), THRESHOLDS)
    assert advice.plateau_depth == plateau


@pytest.mark.parametrize(
    ("random_best", "strategy"),
    [
        (CORRELATED, "full"),
        (INDEPENDENT, "scratch"),
    ],
)
def test_pretraining_must_really_beat_random_init_with_large_data(random_best, strategy):
    # Pretrained 0.80, random init 0.75: over min_pretraining_gain (0.02) in both cases.
    pretrained = (_probe(1, _correct_at(200, (0, 60))), _probe(2, BETTER))
    random_init = (_probe(1, _correct_at(200, (0, 20))), _probe(2, random_best))
    evidence = _evidence_of(pretrained, per_class=5000, random_init=random_init)
    advice = recommend(evidence, THRESHOLDS)
    assert evidence.pretraining_gain == pytest.approx(0.05)
    assert advice.strategy == strategy
    gain = next(c for c in advice.comparisons if c.call == "pretraining")
    assert (gain.better, gain.worse) == (
        "pretrained depth 2 (group2)",
        "random-init depth 2 (group2)",
    )
    assert gain.real == (strategy == "full")


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
    data = json.loads(json.dumps(advice.to_json()))
    restored = Advice.from_json(data)
    assert restored == advice
    np.testing.assert_array_equal(restored.evidence.top.correct(), evidence.top.correct())
    # Calls: top vs best, the plateau and the depth below it vs best, pretrained vs random.
    assert [c["call"] for c in data["comparisons"]] == [
        "similarity",
        "plateau",
        "plateau",
        "pretraining",
    ]
    assert data["comparisons"][0]["test"] == {
        "examples": 10_000,
        "first_only_correct": 1400,  # 0.76 vs 0.62
        "second_only_correct": 0,
        "p_value": 0.0,
    }
    assert data["summary"]["top_deficit_p_value"] == 0.0
    assert data["summary"]["plateau_depth"] == 3
    # Correctness is packed: 10,000 examples cost ~1,700 characters a probe.
    assert len(evidence.top.validation_correct) < 10_000 / 5


# --- The probe ----------------------------------------------------------------------------


def test_ridge_probe_leave_one_out_matches_refitting_without_each_example():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    features = rng.normal(size=(36, 20)) + 1.5 * np.eye(3)[labels] @ rng.normal(size=(3, 20))
    result = ridge_probe(features, labels, features[:6], labels[:6], 3)
    correct = unpack_correct(result.validation_correct, result.validation_examples)
    assert (len(correct), correct.mean()) == (6, pytest.approx(result.validation_accuracy))
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


# The probe curves of a 4-group backbone, as _classifier's: the advice counts the groups of
# the backbone it probed. Peaked: retrain the top 3, keep the bottom 1 frozen.
PEAKED_4 = [0.755, 0.758, 0.76, 0.62]
RISING_4 = [0.40, 0.60, 0.72, 0.82]


def _advice(strategy_curve=PEAKED_4) -> Advice:
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

    chosen = _apply({"strategy": "top_k", "unfreeze_groups": 1}, _advice(RISING_4))
    assert chosen.strategy == "top_k"
    assert frozen_prefix_groups(_classifier(), chosen.finetune.rules) == 3

    full = _apply({"strategy": "full"}, _advice())
    assert frozen_prefix_groups(_classifier(), full.finetune.rules) == 0


def test_advised_top_k_keeps_the_frozen_bottom_of_a_cut_network():
    # The advice counts the whole 4-group backbone: top 3 train, the bottom 1 stays frozen.
    # A network cut after its third group (extract.taps) keeps that bottom frozen and trains
    # the 2 above it; cut after its second, the one above it.
    advice = _advice()
    assert (advice.strategy, advice.unfreeze_groups) == ("top_k", 3)
    params = parse_params({"finetune": {"strategy": "auto"}})
    model = _classifier()
    for cut, trained in ((4, 3), (3, 2), (2, 1)):
        patterns = model.backbone.group_patterns()[:cut]
        applied = apply_advice(
            params.finetune, advice, group_patterns=patterns, num_train_examples=100
        )
        assert applied.finetune.rules == strategy_rules("top_k", trained, patterns)
        assert frozen_prefix_groups(model, applied.finetune.rules) == 1
    # Cut at or below the frozen bottom, the cut network's top group still trains.
    assert groups_above_the_frozen_bottom(3, num_groups=4, cut_groups=1) == 1
    assert groups_above_the_frozen_bottom(2, num_groups=18, cut_groups=14) == 1
    assert groups_above_the_frozen_bottom(12, num_groups=18, cut_groups=11) == 5
    patterns = model.backbone.group_patterns()[:2]
    # A number written by hand is the user's: too many groups is an error naming the key.
    written = parse_params({"finetune": {"strategy": "top_k", "unfreeze_groups": 3}})
    with pytest.raises(ParamsError, match=r"'finetune.unfreeze_groups' is 3; .* 2 layer groups"):
        apply_advice(written.finetune, advice, group_patterns=patterns, num_train_examples=100)


@pytest.mark.parametrize(
    ("finetune", "trained_groups"),
    [
        ({"strategy": "full"}, 4),  # every group of the 4-group backbone
        ({"strategy": "top_k", "unfreeze_groups": 2}, 2),
        ({"strategy": "feature_extraction"}, 0),
    ],
)
def test_a_strategy_picked_by_hand_keeps_layer_wise_decay_over_its_own_groups(
    finetune, trained_groups
):
    # The advice is top_k over 3 groups (PEAKED_4); each hand pick decays over its own groups.
    applied = _apply(finetune, _advice())
    assert "layer_lr_decay" in applied.from_advice
    decay = applied.finetune.layer_lr_decay
    assert decay == recommended_layer_lr_decay(trained_groups)
    assert (decay < 1.0) == (trained_groups > 0)
    scratch = _apply({"strategy": "scratch"}, _advice())
    assert scratch.finetune.layer_lr_decay == 1.0  # random weights: nothing to protect


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
    # Each call says how many validation examples decide it.
    assert (
        "| similarity | depth 4 (group4) vs depth 6 (group6) | 10000 | 1400 (1400 vs 0) | "
        "0.140 (threshold 0.01) | 0 | yes |"
    ) in text
    assert (
        "| plateau | depth 4 (group4) vs depth 3 (group3) | 10000 | 50 (50 vs 0) | "
        "0.005 (threshold 0.01) | 8.88e-16 | no |"
    ) in text
    assert reports.artifact_key("vision", "advice") == "tlflax-vision-advice"
    assert warnings == []


def test_the_advice_report_says_how_many_examples_decide_a_call():
    pretrained = (_probe(1, _correct_at(200, (0, 60))), _probe(2, BETTER), _probe(3, INDEPENDENT))
    advice = recommend(_evidence_of(pretrained, per_class=10), THRESHOLDS)
    text = advice_markdown(advice, title="vision: transfer strategy advice")
    assert "all probes are scored on the same 200 validation examples" in text
    assert (
        "| similarity | depth 2 (group2) vs depth 3 (group3) | 200 | 50 (30 vs 20) | "
        "0.050 (threshold 0.01) | 0.161 | no |"
    ) in text
    assert (
        "on 200 validation examples they disagree on 50 (30 vs 20), McNemar mid-p 0.161: "
        "not a real difference (needs > 0.01 and p < 0.05): high similarity."
    ) in text


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
