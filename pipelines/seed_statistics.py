"""The seeds report's figures: each model's scores per run, their mean and sample spread.

Pure functions over the numbers :mod:`pipelines.seeds` collects from ``evaluate.json``; the
layout of the ``seeds.json`` they build is in that module's docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The figures averaged over the seeds, as evaluate.json names them.
SCORES = ("accuracy", "macro_f1")
STANDARD_DEVIATION_DDOF = 1

SeedScores = dict[str, dict[str, float]]


def read_model_scores(evaluation: Mapping[str, Any]) -> SeedScores:
    """Accuracy and macro-F1 of every model in ``evaluate.json``: each top-level entry that
    is a mapping with an ``accuracy``.

    Raises:
        ValueError: a model reports an accuracy but no macro-F1.
    """
    scores = {}
    for model, entry in evaluation.items():
        if isinstance(entry, Mapping) and "accuracy" in entry:
            missing = [score for score in SCORES if not isinstance(entry.get(score), int | float)]
            if missing:
                raise ValueError(f"'{model}' has no number for {missing}")
            scores[model] = {score: float(entry[score]) for score in SCORES}
    return scores


def mean_and_spread(
    runs: Sequence[Mapping[str, float]], scores: Sequence[str] = SCORES
) -> dict[str, float]:
    """``<score>_mean`` and ``<score>_std`` of each of ``scores`` over ``runs`` (one mapping
    of scores per seed): the sample standard deviation (ddof 1), 0 for a single run."""
    summary = {}
    for score in scores:
        values = np.array([run[score] for run in runs])
        summary[f"{score}_mean"] = float(values.mean())
        summary[f"{score}_std"] = (
            float(values.std(ddof=STANDARD_DEVIATION_DDOF)) if len(values) > 1 else 0.0
        )
    return summary


def summarize(runs: Mapping[int, SeedScores]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) of each score, for each model that every
    run reports, in the first run's order.

    Args:
        runs: each seed's scores, as ``read_model_scores`` returns them; at least two.
    """
    if len(runs) < 2:
        raise ValueError(f"a sample standard deviation needs two runs or more, not {len(runs)}")
    first = next(iter(runs.values()))
    summary = {}
    for model in first:
        if not all(model in scores for scores in runs.values()):
            continue
        summary[model] = mean_and_spread([scores[model] for scores in runs.values()])
    return summary


def seeds_report(
    seeds: Sequence[int],
    seed_keys: Sequence[str],
    runs: Mapping[int, SeedScores],
    experiment_names: Mapping[int, str],
) -> dict[str, Any]:
    """The content of ``seeds.json`` (see :mod:`pipelines.seeds`), runs in ``seeds`` order."""
    in_order = {seed: runs[seed] for seed in seeds}
    return {
        "seeds": list(seeds),
        "seed_params": list(seed_keys),
        "std_ddof": STANDARD_DEVIATION_DDOF,
        "models": summarize(in_order),
        "runs": {str(seed): scores for seed, scores in in_order.items()},
        "dvc_experiments": {str(seed): experiment_names[seed] for seed in seeds},
    }


def format_table(report: Mapping[str, Any]) -> str:
    """The models' mean ± sample standard deviation over the seeds, as a text table."""
    seeds = ", ".join(map(str, report["seeds"]))
    rows = [("model", "accuracy", "macro-F1")]
    for model, statistics in report["models"].items():
        rows.append(
            (
                model,
                f"{statistics['accuracy_mean']:.4f} ± {statistics['accuracy_std']:.4f}",
                f"{statistics['macro_f1_mean']:.4f} ± {statistics['macro_f1_std']:.4f}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [f"seeds {seeds}: mean ± sample standard deviation (ddof=1)"]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
