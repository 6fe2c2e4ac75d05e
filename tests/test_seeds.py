"""The seeds command: its pure parts on made-up figures, then for real on a tiny project.

The real runs use the small CNN project of tests/small_project.py (every stage takes
seconds): ``python -m pipelines.seeds --seeds 0 1`` runs the whole pipeline twice through
``dvc exp run`` in a project whose pipeline has run once, as a user's has.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from pipelines import seeds
from pipelines.seeds import (
    failure_message,
    find_seed_keys,
    first_free_name,
    format_table,
    own_seed,
    read_model_scores,
    run_order,
    seeds_report,
    summarize,
)
from tests.conftest import RAW_FASHION_MNIST, ROOT, _merge, make_project_copy, run
from tests.small_project import SMALL_PARAMS

SCORE_KEYS = {"accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std"}

# --- Pure parts -----------------------------------------------------------------------------


def test_seed_keys_are_the_sections_holding_a_seed_in_file_order() -> None:
    params = {
        "experiment": "vision",
        "prepare": {"seed": 0, "train_per_class": 6},
        "validate": {"min_examples_per_class": 3},
        "finetune": {"augment": {"seed": 9}, "seed": 0},  # only a section's own key counts
        "baseline": {"seed": 0},
        "notes": ["seed"],
    }
    assert find_seed_keys(params) == ["prepare.seed", "finetune.seed", "baseline.seed"]


@pytest.mark.parametrize("params_file", ["params.yaml", "experiments/text/params.yaml"])
def test_the_projects_params_files_vary_subset_draw_and_training_seeds(params_file: str) -> None:
    keys = find_seed_keys(yaml.safe_load((ROOT / params_file).read_text()))
    assert {"prepare.seed", "train_head.seed", "finetune.seed"} <= set(keys)


def test_the_params_files_own_seed_runs_last() -> None:
    params = {"prepare": {"seed": 1}, "finetune": {"seed": 1}, "other": {"seed": 2}}
    assert own_seed(params, ["prepare.seed", "finetune.seed"]) == 1
    assert own_seed(params, ["prepare.seed", "other.seed"]) is None
    assert run_order([0, 1, 2], 1) == [0, 2, 1]
    assert run_order([0, 2], 1) == [0, 2]
    assert run_order([3, 0], None) == [3, 0]


def test_a_taken_experiment_name_gets_the_first_free_suffix() -> None:
    taken = {"text-seed1", "text-seed1-2"}
    assert first_free_name("text-seed0", taken.__contains__) == "text-seed0"
    assert first_free_name("text-seed1", taken.__contains__) == "text-seed1-3"


def test_every_entry_with_an_accuracy_is_a_model() -> None:
    evaluation = {
        "baseline": {"accuracy": 0.7, "macro_f1": 0.6, "model": "rbf_svm"},
        "head_only": {"accuracy": 0.8, "macro_f1": 0.75, "ece": 0.05},
        "calibration": {"bins": 15},
        "n_train": 60,
        "n_test": 10000,
    }
    assert read_model_scores(evaluation) == {
        "baseline": {"accuracy": 0.7, "macro_f1": 0.6},
        "head_only": {"accuracy": 0.8, "macro_f1": 0.75},
    }
    with pytest.raises(ValueError, match="'finetune' has no number for \\['macro_f1'\\]"):
        read_model_scores({"finetune": {"accuracy": 0.8}})


def test_the_summary_is_the_mean_and_sample_standard_deviation() -> None:
    runs = {
        2: {"head_only": {"accuracy": 0.80, "macro_f1": 0.70}, "extra": {"accuracy": 1, "macro_f1": 1}},
        0: {"head_only": {"accuracy": 0.70, "macro_f1": 0.60}},
        1: {"head_only": {"accuracy": 0.75, "macro_f1": 0.50}},
    }  # fmt: skip
    summary = summarize(runs)
    assert list(summary) == ["head_only"], "a model some run lacks is left out"
    accuracies = np.array([0.80, 0.70, 0.75])
    assert summary["head_only"]["accuracy_mean"] == pytest.approx(accuracies.mean())
    assert summary["head_only"]["accuracy_std"] == pytest.approx(accuracies.std(ddof=1))
    assert summary["head_only"]["accuracy_std"] == pytest.approx(0.05)
    assert summary["head_only"]["macro_f1_std"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="two runs or more"):
        summarize({0: runs[0]})

    report = seeds_report([0, 1, 2], ["prepare.seed"], runs, {0: "a", 1: "b", 2: "c"})
    assert report["seeds"] == [0, 1, 2] and list(report["runs"]) == ["0", "1", "2"]
    assert report["std_ddof"] == 1 and report["dvc_experiments"]["2"] == "c"
    table = format_table(report)
    assert "head_only  0.7500 ± 0.0500  0.6000 ± 0.1000" in table, table


VALIDATION_FAILED = [
    "Reproducing experiment 'vision-seed1'",
    "Running stage 'prepare':",
    "> python -m pipelines.stages.prepare",
    "prepare: wrote data/vision/tfds (train 60, validation 30, test 10000)",
    "Running stage 'validate':",
    "> python -m pipelines.stages.validate",
    "Data validation FAILED: 46 checks, 2 critical failures, 4 warnings.",
    "  CRITICAL balance.train.min_per_class: observed {...}, threshold 1000",
    "Data Docs: /tmp/pytest-of-me/test_a_failed_run0/reports/vision/data_docs/index.html",
    "ERROR: failed to reproduce 'validate': failed to run: python -m pipelines.stages.validate, "
    "exited with 1",
]


@pytest.mark.parametrize(
    "output, expected",
    [
        (
            VALIDATION_FAILED,
            "seed 1: stage 'validate' failed (exit 1): Data validation FAILED: 46 checks, "
            "2 critical failures, 4 warnings.",
        ),
        (
            [
                "Running stage 'experiments/text/dvc.yaml:finetune':",
                "Epoch 1/3",
                "finetune: error: 'finetune.batch_size' is 4000, more than the 3576 examples",
                "ERROR: failed to reproduce 'experiments/text/dvc.yaml:finetune': failed to run: "
                "python -m pipelines.stages.finetune --params experiments/text/params.yaml, "
                "exited with 2",
            ],
            "seed 1: stage 'experiments/text/dvc.yaml:finetune' failed (exit 2): finetune: "
            "error: 'finetune.batch_size' is 4000, more than the 3576 examples",
        ),
        (
            [
                "Running stage 'train_head':",
                "Traceback (most recent call last):",
                '  File "pipelines/stages/train_head.py", line 9, in <module>',
                "ZeroDivisionError: division by zero",
                "ERROR: failed to reproduce 'train_head': failed to run: python -m "
                "pipelines.stages.train_head, exited with 1",
            ],
            "seed 1: stage 'train_head' failed (exit 1): ZeroDivisionError: division by zero",
        ),
        (
            [
                "Reproducing experiment 'text-seed1'",
                "ERROR: failed to reproduce 'experiments/text/dvc.yaml:prepare': [Errno 2] No "
                "such file or directory: 'data/raw/modeldata'",
            ],
            "seed 1: stage 'experiments/text/dvc.yaml:prepare' failed: [Errno 2] No such file "
            "or directory: 'data/raw/modeldata'",
        ),
        (
            ["ERROR: Unable to acquire lock. Most likely another DVC process is running"],
            "seed 1: `dvc exp run` failed (exit 255): Unable to acquire lock. Most likely "
            "another DVC process is running",
        ),
    ],
)
def test_a_failure_is_one_line_naming_the_seed_and_the_stages_message(
    output: list[str], expected: str
) -> None:
    assert failure_message(1, 255, output) == expected


def test_a_held_lock_is_waited_for_and_a_failed_stage_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = [
        (255, ["ERROR: Unable to acquire lock. Most likely another DVC process is running"]),
        (0, ["Ran experiment(s): vision-seed1"]),
        (255, VALIDATION_FAILED),
    ]
    monkeypatch.setattr(seeds, "stream_dvc", lambda arguments, project, echo: answers.pop(0))
    monkeypatch.setattr(seeds.time, "sleep", lambda seconds: None)
    assert seeds.run_dvc(["exp", "run"], ROOT) == (0, ["Ran experiment(s): vision-seed1"])
    assert seeds.run_dvc(["exp", "run"], ROOT) == (255, VALIDATION_FAILED)
    assert answers == [], "the lock was tried twice, the failed stage once"


@pytest.mark.parametrize("arguments", [["--seeds", "0"], ["--seeds", "1", "1"], ["--seeds", "-1"]])
def test_the_command_line_wants_two_distinct_non_negative_seeds(
    arguments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["pipelines.seeds", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        seeds.main()
    assert exit_info.value.code == 2


# --- For real, on a tiny project ------------------------------------------------------------

COMMAND = [sys.executable, "-m", "pipelines.seeds", "--seeds", "0", "1"]
RUN_TIMEOUT_SECONDS = 900


class SeedsRun(NamedTuple):
    """A tiny project, what it held before ``python -m pipelines.seeds --seeds 0 1``, and
    the command's result."""

    project: Path
    params_before: bytes
    scores_before: dict[str, dict[str, float]]
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def dvc_site_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep DVC's per-repository state of the throw-away projects out of /var/tmp."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site-cache")))
        yield


def dvc(project: Path, *arguments: str) -> str:
    result = run(
        [sys.executable, "-m", "dvc", *arguments], cwd=project, timeout=RUN_TIMEOUT_SECONDS
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def write_params_dvc_would_rewrite(project: Path) -> None:
    """Give params.yaml a layout DVC's round trip changes (an explicit null, an indented
    sequence) and a comment, so that the command must give the file its own bytes back."""
    params_file = project / "params.yaml"
    text = "# Written by hand: DVC keeps this comment, not the layout below.\n"
    text += params_file.read_text().replace(
        "  train_per_class: 6\n", "  train_per_class: 6\n  train_fraction: null\n"
    )
    # finetune.rules is the only sequence: indent its items.
    text = re.sub(r"^(  - |    freeze: )", r"  \1", text, flags=re.MULTILINE)
    params_file.write_text(text)
    # The premise: setting a seed the way `dvc exp run -S` does rewrites this layout.
    rewritten = project / ".dvc/tmp/rewritten-params.yaml"
    rewritten.parent.mkdir(parents=True, exist_ok=True)
    rewritten.write_text(text)
    apply_overrides(rewritten, ["prepare.seed=0"])
    assert rewritten.read_text() != text
    rewritten.unlink()
    for command in (["add", "-A"], ["commit", "-qm", "params written by hand"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *command],
                       cwd=project, check=True, capture_output=True)  # fmt: skip


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory: pytest.TempPathFactory, dvc_site_cache: None) -> SeedsRun:
    """Seeds 0 and 1 on a tiny project whose pipeline has run once with its own seed, 0."""
    if not RAW_FASHION_MNIST.exists():
        pytest.fail(f"{RAW_FASHION_MNIST} is missing: run `make assets` (scripts/fetch_assets.sh)")
    project = make_project_copy(tmp_path_factory.mktemp("seeds") / "project", SMALL_PARAMS)
    write_params_dvc_would_rewrite(project)
    dvc(project, "repro", "dvc.yaml")
    evaluation_file = project / "metrics/vision/evaluate.json"
    scores_before = read_model_scores(json.loads(evaluation_file.read_text()))
    params_before = (project / "params.yaml").read_bytes()
    result = run(COMMAND, cwd=project, timeout=RUN_TIMEOUT_SECONDS)
    return SeedsRun(project, params_before, scores_before, result)


@pytest.mark.slow
def test_seeds_json_holds_every_models_mean_and_sample_std(seeds_run: SeedsRun) -> None:
    result = seeds_run.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((seeds_run.project / "metrics/vision/seeds.json").read_text())
    assert report["seeds"] == [0, 1]
    assert report["std_ddof"] == 1
    assert {"prepare.seed", "train_head.seed", "finetune.seed"} <= set(report["seed_params"])
    assert set(report["models"]) == set(seeds_run.scores_before) >= {"head_only", "finetune"}
    runs = [report["runs"]["0"], report["runs"]["1"]]
    for model, statistics in report["models"].items():
        assert set(statistics) == SCORE_KEYS
        for score in ("accuracy", "macro_f1"):
            values = np.array([run_scores[model][score] for run_scores in runs])
            assert statistics[f"{score}_mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert statistics[f"{score}_std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    # Another seed draws another training subset: some figure must move.
    assert runs[0] != runs[1]
    assert "head_only" in result.stdout and " ± " in result.stdout
    experiments = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps"],
        cwd=seeds_run.project, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert {"vision-seed0", "vision-seed1"} <= set(experiments)
    assert report["dvc_experiments"] == {"0": "vision-seed0", "1": "vision-seed1"}


@pytest.mark.slow
def test_the_workspace_ends_as_it_began(seeds_run: SeedsRun) -> None:
    project = seeds_run.project
    assert seeds_run.result.returncode == 0, seeds_run.result.stdout[-3000:]
    assert (project / "params.yaml").read_bytes() == seeds_run.params_before
    assert "Data and pipelines are up to date." in dvc(project, "status", "dvc.yaml")
    # Seed 0, the params file's own, ran last: the workspace holds its run again.
    after = read_model_scores(json.loads((project / "metrics/vision/evaluate.json").read_text()))
    report = json.loads((project / "metrics/vision/seeds.json").read_text())
    assert after == seeds_run.scores_before == report["runs"]["0"]


@pytest.mark.slow
def test_a_failed_seed_stops_with_one_line_and_writes_no_seeds_json(
    tmp_path: Path, dvc_site_cache: None
) -> None:
    # Validation that no 6-per-class subset can pass: seed 1, run first, fails in validate.
    failing = _merge(SMALL_PARAMS, {"validate": {"min_examples_per_class": 1000}})
    project = make_project_copy(tmp_path / "project", failing)
    params_before = (project / "params.yaml").read_bytes()
    result = run(COMMAND, cwd=project, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 1, result.stdout[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "seeds: seed 1: stage 'validate' failed (exit 1): Data validation FAILED: "
    ), lines
    assert "critical failures" in result.stderr
    assert not (project / "metrics/vision/seeds.json").exists()
    assert (project / "params.yaml").read_bytes() == params_before
