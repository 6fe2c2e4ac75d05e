"""The strategy grid's seeds: what each seed draws, and how a cell's seeds are summarised.

The training runs themselves go through the library the pipeline tests cover (apply_advice,
resolve_plan, Finetuner); here, what the grid adds: seeded params and draws, the mean over
seeds that scores the advisor, the README table and the plot.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines.stages.common import ExperimentPaths
from pipelines.strategy_grid import (
    cell_params,
    code_fingerprint,
    earlier_run,
    run_advisor,
    run_path,
    summarize_cell,
)
from pipelines.strategy_grid_report import markdown_table, plot_grid
from pipelines.strategy_grid_setup import DATASETS, STRATEGIES, cell_data, raw_splits
from tests.conftest import ROOT
from tlflax.io import write_json
from tlflax.tasks import task_for


def test_a_seed_reaches_every_seeded_section_and_draws_its_own_training_examples(monkeypatch):
    monkeypatch.chdir(ROOT)  # the grid reads the raw files by the params' relative paths
    dataset = DATASETS["vision"]
    raw = raw_splits(dataset)
    draws = {}
    for seed in (0, 1):
        params = cell_params(dataset, 10, seed)
        assert params.prepare.train_per_class == 10
        seeds = {params.prepare.seed, params.train_head.seed}
        seeds |= {params.finetune.seed, params.train_scratch.seed}
        assert seeds == {seed}
        task = task_for(params, ExperimentPaths(params.experiment).dataset_dir)
        draws[seed] = cell_data(task, dataset, 10, raw, seed=seed)
    first, second = draws[0], draws[1]
    for data in (first, second):
        assert np.bincount(data.train["label"]).tolist() == [10] * 10
        assert len(data.test["label"]) == dataset.test_examples
    # Another seed, other training and validation images; the same test images for both.
    assert not np.array_equal(first.train["image"], second.train["image"])
    assert not np.array_equal(first.validation["image"], second.validation["image"])
    np.testing.assert_array_equal(first.test["image"], second.test["image"])


def test_the_advisor_probes_at_most_max_train_examples_and_the_head_reads_all(monkeypatch):
    # The advise stage's bound on the probes' cost holds in the grid too: at 500 images per
    # class the probes see advise.max_train_examples of them, the head every one.
    monkeypatch.chdir(ROOT)
    dataset = DATASETS["vision"]
    params = cell_params(dataset, 4, 0)
    params = params.model_copy(
        update={"advise": params.advise.model_copy(update={"max_train_examples": 20})}
    )
    task = task_for(params, ExperimentPaths(params.experiment).dataset_dir)
    data = cell_data(task, dataset, 4, raw_splits(dataset), seed=0)
    advice, head_features = run_advisor(task, params, data, num_classes=10)
    assert advice.evidence.train_examples == 40
    assert advice.evidence.probed_train_examples == 20
    assert advice.evidence.train_examples_per_class == 4  # counted on all, not the probed
    assert head_features["train"].shape[0] == 40
    assert head_features["validation"].shape[0] == len(data.validation["label"])
    assert advice.taps is not None
    assert head_features["train"].shape[1] == head_features["validation"].shape[1]


def _run(seed: int, pick: str, test: dict[str, float]) -> dict:
    """One seed's record as run_cell_seed writes it (validation 0.05 above test)."""
    return {
        "seed": seed,
        "backbone": "efficientnet_lite0",
        "train_examples": 100,
        "validation_examples": 500,
        "test_examples": 2000,
        "advice": {"strategy": pick},
        "results": {
            strategy: {
                "test_accuracy": test[strategy],
                "validation_accuracy": test[strategy] + 0.05,
                "unfreeze_groups": 5 if strategy == "top_k" else 0,
            }
            for strategy in STRATEGIES
        },
    }


def test_a_cell_scores_the_advisor_by_the_mean_of_its_picks(tmp_path):
    runs = [
        _run(0, "top_k", {"feature_extraction": 0.70, "top_k": 0.76, "full": 0.75, "scratch": 0.2}),
        _run(1, "full", {"feature_extraction": 0.72, "top_k": 0.78, "full": 0.765, "scratch": 0.3}),
        _run(2, "top_k", {"feature_extraction": 0.71, "top_k": 0.74, "full": 0.76, "scratch": 0.1}),
    ]
    cell = summarize_cell("vision", 10, runs)
    assert cell["seeds"] == [0, 1, 2]
    top_k = cell["results"]["top_k"]
    assert top_k["test_accuracy_mean"] == pytest.approx(0.76)
    assert top_k["test_accuracy_std"] == pytest.approx(0.02)  # sample std (ddof 1)
    assert top_k["validation_accuracy_mean"] == pytest.approx(0.81)
    assert top_k["unfreeze_groups"] == [5, 5, 5]
    # The picks are each seed's own: 0.76, 0.765 and 0.74; the best mean is top-k's 0.76
    # (full's is 0.758).
    assert cell["advisor"]["picks"] == ["top_k", "full", "top_k"]
    assert cell["advisor"]["test_accuracy_mean"] == pytest.approx(0.755)
    assert cell["best_by_test"] == cell["best_by_validation"] == "top_k"
    assert cell["advisor_gap"] == pytest.approx(0.005)
    assert cell["within_target"]
    assert sorted(cell["runs"]) == ["0", "1", "2"]

    # A pick that loses 2 points on every seed is outside the 1-point target.
    wrong = [{**run, "advice": {"strategy": "feature_extraction"}} for run in runs]
    missed = summarize_cell("vision", 10, wrong)
    assert missed["advisor_gap"] == pytest.approx(0.76 - 0.71)
    assert not missed["within_target"]

    table = markdown_table([cell, missed])
    rows = table.splitlines()
    assert len(rows) == 4
    assert "**0.760 ± 0.020 (k=5/5/5)**" in rows[2]
    assert "top-k fine-tune ×2, full fine-tune" in rows[2]
    assert rows[2].endswith("| yes |") and rows[3].endswith("| no |")

    path = tmp_path / "grid.png"
    plot_grid([cell, missed], path)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    # Drawn, not blank: the bars' colours cover a good part of the figure.
    assert (pixels.std(axis=2) > 20).mean() > 0.05


def test_resume_reuses_the_runs_this_code_made_and_runs_the_rest(tmp_path):
    runs_dir = tmp_path / "runs"
    fingerprint = code_fingerprint()
    scores = {"feature_extraction": 0.70, "top_k": 0.76, "full": 0.75, "scratch": 0.2}
    for seed in (0, 1):
        kept = {**_run(seed, "top_k", scores), "code": fingerprint, "steps": 7, "seconds": 60.0}
        write_json(run_path(runs_dir, "vision", 10, seed, 7), kept)
    output = tmp_path / "grid.json"
    command = [sys.executable, "-m", "pipelines.strategy_grid", "--datasets", "vision",
               "--sizes", "10", "--seeds", "0", "1", "--steps", "7", "--resume",
               "--runs-dir", str(runs_dir), "--output", str(output),
               "--plot", str(tmp_path / "grid.png"), "--table", str(tmp_path / "grid.md")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("reused") == 2  # nothing trained
    grid = json.loads(output.read_text())
    assert grid["complete"] and grid["seeds"] == [0, 1]
    (cell,) = grid["cells"]
    assert cell["results"]["top_k"]["test_accuracy_mean"] == pytest.approx(0.76)
    assert grid["seconds"] == pytest.approx(120.0)
    assert (tmp_path / "grid.png").stat().st_size > 0

    # Another code's run, another step budget, or no run at all: not reused, run again.
    stale = {**_run(2, "top_k", scores), "code": "0" * 16, "steps": 7, "seconds": 1.0}
    write_json(run_path(runs_dir, "vision", 10, 2, 7), stale)
    assert earlier_run(run_path(runs_dir, "vision", 10, 2, 7), fingerprint) is None
    assert earlier_run(run_path(runs_dir, "vision", 10, 0, 8), fingerprint) is None
    assert earlier_run(run_path(runs_dir, "vision", 10, 0, 7), fingerprint)["seed"] == 0
    # A damaged run file stops the grid with its name, and how to go on.
    damaged = run_path(runs_dir, "vision", 10, 1, 7)
    damaged.write_text("{")
    with pytest.raises(SystemExit, match=f"{damaged}.*delete it"):
        earlier_run(damaged, fingerprint)
