"""The reports of the commands that compare whole runs: remedies (imbalance) and backbones."""

from __future__ import annotations

import json

import pytest

from pipelines.backbones import backbones_report, format_table
from pipelines.flows import PipelineError
from pipelines.imbalance import (
    BALANCED_REFERENCE,
    balanced_reference_overrides,
    earlier_runs,
    imbalance_report,
)
from pipelines.imbalance import format_table as format_imbalance_table
from pipelines.seed_statistics import mean_and_spread


def _scores(accuracy: float) -> dict[str, dict[str, float]]:
    one = {"accuracy": accuracy, "macro_f1": accuracy - 0.01}
    return {
        "finetune": {**one, "min_recall": 0.4, "balanced_accuracy": accuracy},
        "head_only": {**one, "min_recall": 0.3, "balanced_accuracy": accuracy - 0.02},
    }


def test_keep_others_adds_a_remedy_to_the_earlier_runs_of_the_same_seeds(tmp_path):
    earlier = imbalance_report(
        [0, 1],
        {
            "none": {0: _scores(0.80), 1: _scores(0.78)},
            "weights": {0: _scores(0.81), 1: _scores(0.80)},
        },
    )
    path = tmp_path / "imbalance.json"
    path.write_text(json.dumps(earlier))
    # weights is run again: only none is kept from the file.
    kept = earlier_runs(path, [0, 1], ["weights", "logit_adjustment"])
    assert list(kept) == ["none"] and kept["none"][1]["finetune"]["accuracy"] == 0.78
    merged = imbalance_report(
        [0, 1], {**kept, "logit_adjustment": {0: _scores(0.83), 1: _scores(0.81)}}
    )
    assert merged["none"] == earlier["none"]
    assert merged["logit_adjustment"]["accuracy_mean"] == pytest.approx(0.82)
    assert "weights" not in merged
    assert earlier_runs(tmp_path / "none.json", [0, 1], ["none"]) == {}


def test_the_balanced_reference_has_the_long_tails_images_in_equal_shares(tmp_path):
    # 100 down to 10 over 10 classes: 409 images (long_tail_sizes), about 41 a class.
    assert balanced_reference_overrides(100, 10.0, 10) == [
        "prepare.train_per_class=41",
        "prepare.train_imbalance_ratio=null",
        "class_balance.remedy=none",
    ]
    runs = {"none": {0: _scores(0.80)}, BALANCED_REFERENCE: {0: _scores(0.84)}}
    report = imbalance_report([0], runs)
    # Kept apart from the remedies: at the top level it would read as one (MEASURE.md 8).
    assert BALANCED_REFERENCE not in report
    assert report["references"][BALANCED_REFERENCE]["accuracy_mean"] == pytest.approx(0.84)
    assert report["runs"][BALANCED_REFERENCE]["0"]["finetune"]["accuracy"] == 0.84
    rows = format_imbalance_table(report, ["none"]).splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| none", f"| {BALANCED_REFERENCE}"]
    # --keep-others keeps an earlier reference where this run does not repeat it.
    path = tmp_path / "imbalance.json"
    path.write_text(json.dumps(report))
    assert list(earlier_runs(path, [0], ["none"])) == [BALANCED_REFERENCE]


def test_keep_others_refuses_runs_of_other_seeds(tmp_path):
    path = tmp_path / "imbalance.json"
    path.write_text(
        json.dumps(imbalance_report([0, 1], {"none": {0: _scores(0.8), 1: _scores(0.7)}}))
    )
    with pytest.raises(PipelineError, match=r"ran seeds \[0, 1\], not \[0, 1, 2\]"):
        earlier_runs(path, [0, 1, 2], ["weights"])


def test_the_backbones_report_sets_each_probe_beside_its_test_scores():
    runs = {
        "efficientnet_lite0": {
            0: {
                "finetune": {"accuracy": 0.87, "macro_f1": 0.86},
                "head_only": {"accuracy": 0.85, "macro_f1": 0.84},
            }
        },
        "efficientnet_lite2": {
            0: {
                "finetune": {"accuracy": 0.86, "macro_f1": 0.85},
                "head_only": {"accuracy": 0.84, "macro_f1": 0.83},
            }
        },
    }
    probes = {
        name: {"probe_accuracy": probe, "taps": [7, 13], "best_depth_probe_accuracy": probe}
        for name, probe in (("efficientnet_lite0", 0.915), ("efficientnet_lite2", 0.88))
    }
    advice = {
        "chosen": "efficientnet_lite0",
        "rule": "cheapest not really worse",
        "ranking": ["efficientnet_lite0", "efficientnet_lite2"],
        "candidates": [
            {"name": "efficientnet_lite0", "flops_per_example": 66e6},
            {"name": "efficientnet_lite2", "flops_per_example": 98e6},
        ],
    }
    seconds = {"efficientnet_lite0": [600.0], "efficientnet_lite2": [900.0]}
    report = backbones_report([0], runs, probes, seconds, advice)
    lite2 = report["backbones"]["efficientnet_lite2"]
    assert lite2["finetune"] == {
        "accuracy_mean": 0.86,
        "accuracy_std": 0.0,
        "macro_f1_mean": 0.85,
        "macro_f1_std": 0.0,
    }
    assert lite2["flops_per_example"] == 98e6 and lite2["seconds_mean"] == 900.0
    assert report["advice"]["chosen"] == "efficientnet_lite0"
    table = format_table(report).splitlines()
    assert (
        table[2] == "| efficientnet_lite0 | 0.915 | 0.8500 ± 0.0000 | 0.8700 ± 0.0000 | 10.0 min |"
    )


def test_the_spread_of_several_seeds_is_the_sample_standard_deviation():
    spread = mean_and_spread(
        [{"accuracy": 0.8, "macro_f1": 0.7}, {"accuracy": 0.9, "macro_f1": 0.8}]
    )
    assert spread["accuracy_mean"] == pytest.approx(0.85)
    assert spread["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
