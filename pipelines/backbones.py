"""Did the advisor's choice of backbone hold? Each candidate run through the whole job.

    python -m pipelines.backbones --seeds 0 \
        --backbones efficientnet_lite0 efficientnet_lite1 efficientnet_lite2

``extract.backbone: auto`` lets the ``advise`` stage pick the backbone from probes of each
candidate's frozen features on validation and their cost per example (``advice.md`` states
the rule). This command checks the pick the only honest way: every candidate, written as
``extract.backbone``, is a full run of the pipeline (``dvc exp run``, through
:func:`pipelines.seeds.run_seed`, every ``seed`` key at the seed): its probe, its head-only
and fine-tuned test scores, and its wall time. Nothing is chosen on test; the table only
shows whether the validation ranking foretold the test one.

Writes ``metrics/<experiment>/backbones.json`` once every run has finished::

    {"seeds": [0], "model": "finetune",
     "backbones": {"<name>": {"probe_accuracy": 0.93, "taps": [...], "flops_per_example": ...,
                              "finetune": {"accuracy_mean", "accuracy_std", "macro_f1_mean",
                                           "macro_f1_std"},
                              "head_only": {...}, "baseline": {...}, "seconds_mean": 650.0}},
     "advice": {"chosen": "<name>", "rule": "...", "ranking": ["<name>", ...]} | null,
     "runs": {"<name>": {"0": {"finetune": {...}, "head_only": {...}, ...}}}}

``advice`` is the ranking in the workspace's own ``advice.json`` when its params say
``extract.backbone: auto`` (the advise stage ranked every candidate there), else null. The
params file gets its original bytes back at the end, as with :mod:`pipelines.seeds`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.seed_statistics import mean_and_spread, read_model_scores
from pipelines.seeds import add_project_and_seeds, read_seed_params, run_or_exit
from pipelines.stages.common import ExperimentPaths
from pipelines.variant_runs import run_variants
from tlflax.io import write_json

MODELS = ("finetune", "head_only", "baseline")


def run_summary(project: Path, paths: ExperimentPaths) -> dict[str, Any]:
    """The probe the advise stage measured for this run's backbone, from its advice.json."""
    advice = json.loads((project / paths.metrics("advice")).read_text())
    taps = advice.get("taps") or {}
    return {
        "probe_accuracy": taps.get("validation_accuracy"),
        "taps": taps.get("taps"),
        "best_depth_probe_accuracy": advice["summary"]["best_probe_accuracy"],
    }


def advised_ranking(project: Path, paths: ExperimentPaths) -> dict[str, Any] | None:
    """The advise stage's ranking of the candidates in the workspace, if it ranked any."""
    advice_file = project / paths.metrics("advice")
    if not advice_file.exists():
        return None
    choice = json.loads(advice_file.read_text()).get("backbone")
    if not choice:
        return None
    return {
        "chosen": choice["chosen"],
        "rule": choice["rule"],
        "ranking": [candidate["name"] for candidate in choice["candidates"]],
        "candidates": choice["candidates"],
    }


def run_backbones(
    project_dir: str, seeds: Sequence[int], backbones: Sequence[str], pipeline_file: str
) -> dict[str, Any]:
    """Every (backbone, seed) run of ``pipeline_file``; writes and returns ``backbones.json``.

    Raises:
      SeedRunFailed: a run failed (nothing is written).
      PipelineError: the params file has no experiment or seed keys.
    """
    project = Path(project_dir).resolve()
    seed_params = read_seed_params(project, pipeline_file)
    paths = ExperimentPaths(seed_params.experiment)
    # Read before any run replaces the workspace's advice with a single backbone's.
    advice = advised_ranking(project, paths)
    runs: dict[str, dict[int, dict]] = {name: {} for name in backbones}
    probes: dict[str, dict[str, Any]] = {}
    seconds: dict[str, list[float]] = {name: [] for name in backbones}

    def record(name: str, seed: int, evaluation: dict[str, Any], wall_seconds: float) -> None:
        seconds[name].append(wall_seconds)
        runs[name][seed] = read_model_scores(evaluation)
        probes.setdefault(name, run_summary(project, paths))
        print(
            f"backbones: {name}, seed {seed}: {runs[name][seed]['finetune']} "
            f"({wall_seconds:.0f} s)",
            flush=True,
        )

    variants = {name: [f"extract.backbone={name}"] for name in backbones}
    run_variants(
        project, pipeline_file, seed_params, variants, seeds, paths.metrics("evaluate"), record
    )
    report = backbones_report(seeds, runs, probes, seconds, advice)
    write_json(project / paths.metrics("backbones"), report)
    print(f"backbones: wrote {paths.metrics('backbones')}")
    return report


def backbones_report(
    seeds: Sequence[int],
    runs: Mapping[str, Mapping[int, Mapping[str, Mapping[str, float]]]],
    probes: Mapping[str, Mapping[str, Any]],
    seconds: Mapping[str, Sequence[float]],
    advice: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``backbones.json`` document (see the module docstring)."""
    ranked = {c["name"]: c for c in advice["candidates"]} if advice is not None else None
    backbones = {}
    for name, by_seed in runs.items():
        entry: dict[str, Any] = dict(probes[name])
        if ranked is not None:
            entry["flops_per_example"] = ranked.get(name, {}).get("flops_per_example")
        for model in MODELS:
            if all(model in run for run in by_seed.values()):
                entry[model] = mean_and_spread([run[model] for run in by_seed.values()])
        entry["seconds_mean"] = round(sum(seconds[name]) / len(seconds[name]), 1)
        backbones[name] = entry
    return {
        "seeds": list(seeds),
        "model": "finetune",
        "backbones": backbones,
        "advice": advice,
        "runs": {name: {str(s): by_seed[s] for s in seeds} for name, by_seed in runs.items()},
    }


def format_table(report: Mapping[str, Any]) -> str:
    """Probe (validation) against fine-tuned and head-only test accuracy, per backbone."""
    lines = [
        "| backbone | probe (validation) | head only (test) | fine-tuned (test) | run time |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["backbones"].items():
        cells = [
            f"{entry[model]['accuracy_mean']:.4f} ± {entry[model]['accuracy_std']:.4f}"
            for model in ("head_only", "finetune")
        ]
        lines.append(
            f"| {name} | {entry['probe_accuracy']:.3f} | {' | '.join(cells)} "
            f"| {entry['seconds_mean'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_project_and_seeds(parser, "distinct seeds, each run with every backbone")
    parser.add_argument("--backbones", nargs="+", required=True, help="registered backbones")
    parser.add_argument("--pipeline-file", default="dvc.yaml", help="the pipeline to run")
    arguments = parser.parse_args()
    if len(set(arguments.seeds)) != len(arguments.seeds):
        parser.error("--seeds: give distinct seeds")
    report = run_or_exit(
        "backbones",
        lambda: run_backbones(
            arguments.project_dir, arguments.seeds, arguments.backbones, arguments.pipeline_file
        ),
    )
    print(format_table(report))


if __name__ == "__main__":
    main()
