"""Whole runs of a pipeline per (variant, seed): what the comparison commands share.

A *variant* is a name and the ``key=value`` settings it writes into the params file (a
remedy for :mod:`pipelines.imbalance`, a backbone for :mod:`pipelines.backbones`); each
(variant, seed) is one ``dvc exp run`` through :func:`pipelines.seeds.run_seed`, with every
``seed`` key at the seed, saved as the DVC experiment ``<experiment>-<variant>-seed<N>``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.seeds import SeedParams, experiment_names, run_seed, workspace_restored

# (variant, seed, that run's evaluate.json, its wall seconds) -> None, after each run.
OnRun = Callable[[str, int, dict[str, Any], float], None]


def run_variants(
    project: Path,
    pipeline_file: str,
    seed_params: SeedParams,
    variants: Mapping[str, Sequence[str]],
    seeds: Sequence[int],
    evaluation_file: Path,
    on_run: OnRun,
) -> None:
    """Run every variant under every seed, in order, calling ``on_run`` after each run; the
    params file gets its original bytes back at the end, after a failure too, and ``dvc
    repro`` then brings the workspace back to that params file's run (mostly from the run
    cache): its outputs and lock, not the last variant's.

    Raises:
      SeedRunFailed: a run failed, or wrote no usable ``evaluation_file``.
      PipelineError: restoring the workspace with ``dvc repro`` failed.
    """
    with workspace_restored(project, pipeline_file, seed_params):
        for variant, overrides in variants.items():
            names = experiment_names(project, f"{seed_params.experiment}-{variant}", seeds)
            for seed in seeds:
                started = time.perf_counter()
                run_seed(
                    project,
                    pipeline_file,
                    seed_params.seed_keys,
                    seed,
                    names[seed],
                    evaluation_file,
                    overrides=overrides,
                )
                evaluation = json.loads((project / evaluation_file).read_text())
                on_run(variant, seed, evaluation, time.perf_counter() - started)
