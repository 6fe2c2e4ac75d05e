"""extract.backbone: auto - candidates probed on the data, priced, one chosen by a stated rule."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml
from flax import nnx

from tests.conftest import run
from tlflax import vision
from tlflax.advice_report import advice_markdown
from tlflax.advice_rules import Advice
from tlflax.api import backbone_for, chosen_params
from tlflax.backbone_choice import (
    BackboneCandidate,
    choose_backbone,
    forward_flops,
    parameter_count,
)
from tlflax.config import AdviseParams, ParamsError, parse_params
from tlflax.data.pipeline import prepare_images
from tlflax.models.registry import create_backbone
from tlflax.probes import pack_correct
from tlflax.tasks import candidate_backbones, task_for

THRESHOLDS = AdviseParams(plateau_tolerance=0.01, significance=0.05)
EXAMPLES = 200


def _candidate(name: str, correct: np.ndarray, flops: float) -> BackboneCandidate:
    return BackboneCandidate(
        name=name,
        probe_accuracy=float(correct.mean()),
        taps=(3, 5),
        best_depth_probe_accuracy=float(correct.mean()),
        flops_per_example=flops,
        parameters=1000,
        validation_correct=pack_correct(correct),
        validation_examples=len(correct),
    )


def _right_on_first(count: int) -> np.ndarray:
    correct = np.zeros(EXAMPLES, dtype=bool)
    correct[:count] = True
    return correct


def test_a_cheaper_backbone_within_validation_noise_of_the_best_is_chosen():
    best = _candidate("big", _right_on_first(170), flops=100e6)
    # 4 examples fewer, all among the big one's: a 2-point lead on 4 discordant pairs.
    close = _candidate("small", _right_on_first(166), flops=60e6)
    choice = choose_backbone([close, best], THRESHOLDS)
    assert [c.name for c in choice.candidates] == ["big", "small"]  # best probe first
    assert choice.chosen == "small"
    (comparison,) = choice.comparisons
    assert comparison.better == "big" and comparison.worse == "small" and not comparison.real
    assert comparison.test.discordant == 4
    assert "not really worse" in choice.reason() and "small" in choice.reason()


def test_a_real_lead_buys_the_bigger_backbone():
    best = _candidate("big", _right_on_first(180), flops=100e6)
    worse = _candidate("small", _right_on_first(160), flops=60e6)  # 20 discordant, all one way
    choice = choose_backbone([worse, best], THRESHOLDS)
    assert choice.chosen == "big"
    assert choice.comparisons[0].real and choice.comparisons[0].test.p_value < 0.05


def test_equal_probes_go_to_the_cheaper_backbone():
    same = _right_on_first(150)
    choice = choose_backbone(
        [_candidate("big", same, 100e6), _candidate("small", same, 60e6)], THRESHOLDS
    )
    assert choice.chosen == "small" and choice.candidates[0].name == "small"


def test_the_candidates_are_the_modalitys_backbones_that_ship_weights():
    params = parse_params({"extract": {"backbone": "auto"}})
    names = candidate_backbones(params)
    assert names[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert "resnet18" not in names and "small_cnn" not in names  # no packaged weights
    assert "minilm_l6" not in names  # text
    text = parse_params({"prepare": {"dataset": "fine_foods"}, "extract": {"backbone": "auto"}})
    assert candidate_backbones(text) == ["minilm_l6"]


@pytest.mark.parametrize(
    ("extract", "message"),
    [
        ({"candidates": ["efficientnet_lite0", "minilm_l6"]}, "'extract.candidates': 'minilm_l6'"),
        ({"candidates": ["resnet18"]}, "'extract.candidates': 'resnet18'"),
    ],
)
def test_a_candidate_that_cannot_be_chosen_is_refused_by_name(extract, message, tmp_path):
    params = parse_params({"extract": {"backbone": "auto", **extract}})
    with pytest.raises(ParamsError, match=message):
        task_for(params, tmp_path)


@pytest.mark.parametrize(
    ("extract", "message"),
    [
        ({"weights_path": "mine.pth"}, "name the backbone the checkpoint belongs to"),
        ({"pretrained": False}, "chooses by the pretrained features"),
    ],
)
def test_auto_with_settings_of_one_backbone_is_refused(extract, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"extract": {"backbone": "auto", **extract}})


def test_a_backbone_is_built_only_once_chosen():
    params = parse_params({"extract": {"backbone": "auto"}})
    with pytest.raises(ParamsError, match="'extract.backbone' is auto"):
        backbone_for(params)


def test_flops_per_example_follow_the_input_size():
    backbone, _ = create_backbone("efficientnet_lite0", pretrained=False, rngs=nnx.Rngs(0))

    def pooled_at(size):
        return lambda model, batch: vision.pooled_after_each_group(
            model, prepare_images(batch["image"], size)
        )

    one = {"image": np.zeros((1, 28, 28, 1), dtype=np.uint8)}
    small, large = (forward_flops(backbone, pooled_at(size), one) for size in (32, 64))
    # Convolutions dominate: four times the pixels, about four times the work.
    assert 3.5 < large / small < 4.5, (small, large)
    assert parameter_count(backbone) > 3_000_000


@pytest.mark.slow
def test_auto_probes_each_candidate_and_the_later_stages_use_the_pick(tiny_project):
    params_file = tiny_project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["extract"]["backbone"] = "auto"
    params["extract"]["candidates"] = ["efficientnet_lite0", "efficientnet_lite1"]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    result = run([sys.executable, "-m", "dvc", "repro", "extract"], cwd=tiny_project, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    written = json.loads((tiny_project / "metrics/vision/advice.json").read_text())
    advice = Advice.from_json(written)
    assert advice.backbone is not None
    ranked = [candidate.name for candidate in advice.backbone.candidates]
    assert sorted(ranked) == ["efficientnet_lite0", "efficientnet_lite1"]
    accuracies = [candidate.probe_accuracy for candidate in advice.backbone.candidates]
    assert accuracies == sorted(accuracies, reverse=True)
    flops = {c.name: c.flops_per_example for c in advice.backbone.candidates}
    assert flops["efficientnet_lite1"] > flops["efficientnet_lite0"]
    assert written["summary"]["backbone"] == advice.backbone.chosen in ranked

    # The later stages read the chosen backbone: the features are its taps, joined.
    chosen = advice.backbone.chosen
    widths = {probe.groups: probe.feature_dim for probe in advice.evidence.pretrained}
    features = np.load(tiny_project / "data/vision/features/train.npz")["features"]
    assert features.shape[1] == sum(widths[tap] for tap in advice.taps.taps)
    assert chosen_params(parse_params(params), advice).extract.backbone == chosen

    report = (tiny_project / "reports/vision/advice.md").read_text()
    assert "## Backbone (extract.backbone: auto)" in report and f"**{chosen}**" in report
    assert report == advice_markdown(advice, title="vision: transfer strategy advice")
