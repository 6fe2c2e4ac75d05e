"""The long-tail job under each remedy for imbalance, several seeds each: does a remedy pay?

    python -m pipelines.imbalance --seeds 0 1 2 --remedies none weights sampler logit_adjustment

Each (remedy, seed) is a full run of ``experiments/longtail/dvc.yaml`` through
:func:`pipelines.seeds.run_seed` (``dvc exp run``, every ``seed`` key at the seed) with
``class_balance.remedy`` set to the remedy. With ``none`` nothing trains against the long
tail, so the data gate would stop the run: its label-balance thresholds are loosened the way
a user without a remedy would have to (:data:`GATE_WITHOUT_REMEDY`). Nothing is chosen on
test: the remedies are compared as written.

Writes ``metrics/<experiment>/imbalance.json`` once every run has finished::

    {"seeds": [0, 1, 2], "model": "finetune",
     "none": {"accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std",
              "min_recall_mean", "min_recall_std", "balanced_accuracy_mean", ...},
     "weights": {...},
     "head_only": {"none": {...}, "weights": {...}},
     "runs": {"none": {"0": {"finetune": {...}, "head_only": {...}}, ...}, ...}}

The fine-tuned model's scores are at the top level (MEASURE.md item 8), the head-only
model's under ``head_only``; each ``*_std`` is the sample standard deviation (ddof 1).

``--reference`` adds a run per seed that is not a remedy: the same number of training
images as the long tail, spread evenly over the classes (:data:`BALANCED_REFERENCE`). Its
scores go under ``references`` (runs under ``runs``, as a remedy's): what the imbalance
itself costs, the ceiling a remedy's gain over ``none`` can be read against.
The params file gets its original bytes back at the end, as with :mod:`pipelines.seeds`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.flows import PipelineError
from pipelines.seed_statistics import mean_and_spread
from pipelines.seeds import (
    add_project_and_seeds,
    read_seed_params,
    run_or_exit,
)
from pipelines.stages.common import ExperimentPaths
from pipelines.variant_runs import run_variants
from tlflax.config import load_params
from tlflax.data.subsets import long_tail_sizes
from tlflax.data.tfds_store import read_class_names
from tlflax.io import write_json

PIPELINE_FILE = "experiments/longtail/dvc.yaml"
REMEDIES = ("none", "weights", "sampler", "logit_adjustment")
SCORES = ("accuracy", "macro_f1", "min_recall", "balanced_accuracy")
MODELS = ("finetune", "head_only")
# What a user without a remedy must do to get past the gate on a 10:1 long tail: accept the
# ratio and the label distributions it implies (KL of the tail from uniform: 0.23 and 0.25).
GATE_WITHOUT_REMEDY = (
    "validate.max_class_ratio=10.0",
    "validate.max_label_kl_divergence=0.3",
    "validate.max_split_kl_divergence=0.3",
)


# Not a remedy: the long tail's training images in equal shares (its mean per class).
BALANCED_REFERENCE = "balanced_same_size"


def balanced_reference_overrides(largest: int, ratio: float, num_classes: int) -> list[str]:
    """The params of :data:`BALANCED_REFERENCE`: a long tail of ``largest`` images for the
    first class down by ``ratio`` has this many in all; here each class gets an equal
    share, with no remedy (nothing is imbalanced)."""
    total = sum(long_tail_sizes(num_classes, largest, ratio).values())
    return [
        f"prepare.train_per_class={round(total / num_classes)}",
        "prepare.train_imbalance_ratio=null",
        "class_balance.remedy=none",
    ]


def remedy_overrides(remedy: str) -> list[str]:
    """The params a run of ``remedy`` sets: the remedy, and without one the loosened gate."""
    overrides = [f"class_balance.remedy={remedy}"]
    return overrides + list(GATE_WITHOUT_REMEDY) if remedy == "none" else overrides


def model_scores(evaluation: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """:data:`SCORES` of each of :data:`MODELS` in one run's ``evaluate.json``.

    Raises:
      ValueError: a model or score missing (an evaluate.json from before these scores).
    """
    scores = {}
    for model in MODELS:
        entry = evaluation.get(model)
        if not isinstance(entry, Mapping) or any(key not in entry for key in SCORES):
            raise ValueError(f"'{model}' lacks one of {SCORES}: run evaluate again")
        scores[model] = {key: float(entry[key]) for key in SCORES}
    return scores


def summarize(runs: Mapping[int, Mapping[str, Mapping[str, float]]], model: str) -> dict:
    """Mean and sample standard deviation of each score of ``model`` over the seeds' runs."""
    return mean_and_spread([run[model] for run in runs.values()], SCORES)


def imbalance_report(seeds: Sequence[int], runs: Mapping[str, Mapping[int, Mapping]]) -> dict:
    """The ``imbalance.json`` document from each remedy's runs (remedy -> seed -> scores)."""
    report: dict[str, Any] = {"seeds": list(seeds), "model": "finetune"}
    references = {}
    for remedy, by_seed in runs.items():
        # The reference is kept apart: at the top level it would read as a remedy.
        (references if remedy == BALANCED_REFERENCE else report)[remedy] = summarize(
            by_seed, "finetune"
        )
    if references:
        report["references"] = references
    report["head_only"] = {
        remedy: summarize(by_seed, "head_only") for remedy, by_seed in runs.items()
    }
    report["runs"] = {
        remedy: {str(seed): by_seed[seed] for seed in seeds} for remedy, by_seed in runs.items()
    }
    return report


def format_table(report: Mapping[str, Any], remedies: Sequence[str]) -> str:
    """The fine-tuned model's means per remedy (and the balanced reference, where run), as
    the README's table rows."""
    lines = [
        "| remedy | accuracy | macro-F1 | min recall | balanced accuracy |",
        "|---|---|---|---|---|",
    ]
    references = report.get("references", {})
    for remedy in [*remedies, *references]:
        scores = references.get(remedy) or report[remedy]
        cells = [f"{scores[f'{key}_mean']:.4f} ± {scores[f'{key}_std']:.4f}" for key in SCORES]
        lines.append(f"| {remedy} | {' | '.join(cells)} |")
    return "\n".join(lines)


def earlier_runs(
    path: Path, seeds: Sequence[int], rerun: Sequence[str]
) -> dict[str, dict[int, dict]]:
    """The runs of the remedies not in ``rerun`` from an earlier ``imbalance.json`` at
    ``path`` (empty when there is none).

    Raises:
      PipelineError: the earlier file ran other seeds (their runs would not compare).
    """
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if list(earlier.get("seeds", [])) != list(seeds):
        raise PipelineError(
            f"{path}: ran seeds {earlier.get('seeds')}, not {list(seeds)}; run every remedy "
            "with these seeds instead of --keep-others"
        )
    return {
        remedy: {int(seed): scores for seed, scores in by_seed.items()}
        for remedy, by_seed in earlier["runs"].items()
        if remedy not in rerun
    }


def run_remedies(
    project_dir: str,
    seeds: Sequence[int],
    remedies: Sequence[str],
    pipeline_file: str,
    *,
    keep_others: bool = False,
    reference: bool = False,
) -> dict[str, Any]:
    """Every (remedy, seed) run of ``pipeline_file`` (and of :data:`BALANCED_REFERENCE` with
    ``reference``); writes and returns ``imbalance.json`` (with ``keep_others``, also holding
    the other remedies' runs of the file it replaces).

    Raises:
      SeedRunFailed: a run failed (nothing is written).
      PipelineError: the params file has no experiment or seed keys.
    """
    project = Path(project_dir).resolve()
    seed_params = read_seed_params(project, pipeline_file)
    paths = ExperimentPaths(seed_params.experiment)
    variants = {remedy: remedy_overrides(remedy) for remedy in remedies}
    if reference:
        prepare = load_params(seed_params.path).prepare
        if prepare.train_imbalance_ratio is None or prepare.train_per_class is None:
            raise PipelineError(
                f"{seed_params.path}: --reference needs a long tail (prepare.train_per_class "
                "and prepare.train_imbalance_ratio)"
            )
        num_classes = len(read_class_names(project / paths.dataset_dir, prepare.stored_name))
        variants[BALANCED_REFERENCE] = balanced_reference_overrides(
            prepare.train_per_class, prepare.train_imbalance_ratio, num_classes
        )
    runs: dict[str, dict[int, dict]] = {variant: {} for variant in variants}

    def record(remedy: str, seed: int, evaluation: dict[str, Any], wall_seconds: float) -> None:
        runs[remedy][seed] = model_scores(evaluation)
        print(
            f"imbalance: {remedy}, seed {seed}: {runs[remedy][seed]['finetune']} "
            f"({wall_seconds:.0f} s)",
            flush=True,
        )

    run_variants(
        project, pipeline_file, seed_params, variants, seeds, paths.metrics("evaluate"), record
    )
    if keep_others:
        runs = {**earlier_runs(project / paths.metrics("imbalance"), seeds, list(runs)), **runs}
    report = imbalance_report(seeds, runs)
    write_json(project / paths.metrics("imbalance"), report)
    print(f"imbalance: wrote {paths.metrics('imbalance')}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_project_and_seeds(parser, "distinct seeds, each run under every remedy")
    parser.add_argument(
        "--remedies",
        nargs="*",
        choices=REMEDIES,
        default=["none", "weights"],
        help="remedies (none at all: only --reference)",
    )
    parser.add_argument("--pipeline-file", default=PIPELINE_FILE, help="the long-tail pipeline")
    parser.add_argument(
        "--keep-others",
        action="store_true",
        help="keep the other remedies' runs of the existing imbalance.json (same seeds)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help=f"also run {BALANCED_REFERENCE}: the long tail's images spread evenly",
    )
    arguments = parser.parse_args()
    if len(set(arguments.seeds)) != len(arguments.seeds):
        parser.error("--seeds: give distinct seeds")
    if not (arguments.remedies or arguments.reference):
        parser.error("--remedies: give a remedy, or --reference")
    report = run_or_exit(
        "imbalance",
        lambda: run_remedies(
            arguments.project_dir,
            arguments.seeds,
            arguments.remedies,
            arguments.pipeline_file,
            keep_others=arguments.keep_others,
            reference=arguments.reference,
        ),
    )
    print(format_table(report, [remedy for remedy in REMEDIES if remedy in report["runs"]]))


if __name__ == "__main__":
    main()
