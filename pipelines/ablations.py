"""The training recipe, one lever at a time: each row of an ablation file run under every seed.

    python -m pipelines.ablations --job vision                # rows of experiments/ablations.yaml
    python -m pipelines.ablations --job text --rows reference max_length_128

A row is a set of params on top of the job's params file (``dvc exp run -S key=value``). Each
row runs the whole pipeline once per seed (as :mod:`pipelines.seeds` does; stages whose inputs
did not change come from DVC's run cache), and reads the fine-tuned model's validation
accuracy (``finetune.json``: the epoch it saved) and every model's test accuracy
(``evaluate.json``). A lever is *kept* when its validation accuracy beats the reference row's,
seed by seed, by more than the standard error of that mean gain (:func:`kept_levers`): the
choice is made on validation, never on test; test is reported beside it.

Writes ``metrics/<experiment>/ablations.json`` when every run has finished::

    {"seeds": [0, 1, 2], "reference": "reference", "std_ddof": 1,
     "rows": {"<row>": {"set": {"<key>": <value>}, "validation_accuracy_mean": ..,
                        "validation_accuracy_std": .., "test": {"<model>": {"accuracy_mean", "accuracy_std"}},
                        "runs": {"0": {"validation_accuracy": .., "test": {"<model>": ..}}}}},
     "kept": ["<row>", ...]}

Rows of an earlier ``ablations.json`` that this run does not repeat are kept only when its
reference row is the same, seed for seed, as the one just run (same seeds, same code: the
numbers are comparable); otherwise they are dropped and named. So rows can be added one at a
time (``--rows cutmix_0.5``) without re-running the others.

and prints the table the README shows. The workspace ends as it began: params file bytes
restored, then ``dvc repro`` (from the run cache where the reference row ran the file's seed).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipelines.flows import PipelineError, open_repository
from pipelines.seeds import (
    STANDARD_DEVIATION_DDOF,
    add_project_and_seeds,
    first_free_name,
    read_seed_params,
    restore_bytes,
    run_or_exit,
    run_seed,
    workspace_restored,
)
from pipelines.stages.common import ExperimentPaths
from tlflax.io import write_json

ABLATIONS_FILE = Path("experiments/ablations.yaml")
REFERENCE_ROW = "reference"


def load_rows(path: Path, job: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The pipeline file and the rows (name -> params to set) of ``job`` in ``path``.

    Raises:
        PipelineError: the file, the job or a row is malformed (naming which).
    """
    try:
        jobs = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PipelineError(f"{path}: unreadable ({error})") from None
    entry = jobs.get(job)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("rows"), Mapping):
        raise PipelineError(
            f"{path}: no job {job!r} with 'pipeline' and 'rows'; jobs: {list(jobs)}"
        )
    rows = {}
    for name, settings in entry["rows"].items():
        settings = settings or {}
        if not isinstance(settings, Mapping):
            raise PipelineError(
                f"{path}: {job}.rows.{name}: give a mapping of param keys to values"
            )
        rows[str(name)] = dict(settings)
    if REFERENCE_ROW not in rows or rows[REFERENCE_ROW]:
        raise PipelineError(
            f"{path}: {job}.rows needs a {REFERENCE_ROW!r} row that sets nothing: every lever "
            "is judged against the params file as it is"
        )
    return str(entry.get("pipeline", "dvc.yaml")), rows


def override(key: str, value: Any) -> str:
    """``key=value`` as ``dvc exp run -S`` reads it (YAML flow syntax)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    spread = float(array.std(ddof=STANDARD_DEVIATION_DDOF)) if len(array) > 1 else 0.0
    return float(array.mean()), spread


def summarize_row(settings: Mapping[str, Any], runs: Mapping[int, dict[str, Any]]) -> dict:
    """A row's entry of ``ablations.json`` from its runs (seed -> validation and test)."""
    validation = [run["validation_accuracy"] for run in runs.values()]
    mean, spread = _mean_std(validation)
    models = [
        m for m in next(iter(runs.values()))["test"] if all(m in r["test"] for r in runs.values())
    ]
    test = {}
    for model in models:
        model_mean, model_std = _mean_std([run["test"][model] for run in runs.values()])
        test[model] = {"accuracy_mean": model_mean, "accuracy_std": model_std}
    return {
        "set": dict(settings),
        "validation_accuracy_mean": mean,
        "validation_accuracy_std": spread,
        "test": test,
        "runs": {str(seed): run for seed, run in runs.items()},
    }


def paired_validation_gain(row: Mapping[str, Any], reference: Mapping[str, Any]) -> tuple:
    """The row's mean validation gain over the reference, seed by seed, and the standard
    error of that mean (None with one seed: one difference has no spread)."""
    seeds = [seed for seed in row["runs"] if seed in reference["runs"]]
    gains = [
        row["runs"][seed]["validation_accuracy"] - reference["runs"][seed]["validation_accuracy"]
        for seed in seeds
    ]
    if len(gains) < 2:
        return (gains[0] if gains else 0.0), None
    return float(np.mean(gains)), float(np.std(gains, ddof=1) / np.sqrt(len(gains)))


def kept_levers(rows: Mapping[str, dict]) -> list[str]:
    """The rows whose validation accuracy beats the reference row's by more than the noise.

    Seed by seed (same data draw, same initialisation): the mean gain must exceed its standard
    error. A gain within one standard error - say +0.3 points from per-seed differences of
    +0.5, -1.5 and +2.0 - is no evidence that the lever helps. With one seed there is no
    spread to judge, and any gain keeps the lever.
    """
    reference = rows[REFERENCE_ROW]
    kept = []
    for name, row in rows.items():
        if name == REFERENCE_ROW:
            continue
        gain, standard_error = paired_validation_gain(row, reference)
        if gain > 0 and (standard_error is None or gain > standard_error):
            kept.append(name)
    return kept


def merge_earlier_rows(
    earlier: Mapping[str, Any] | None, report: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``report`` with the rows of ``earlier`` it did not run, where both references agree.

    Returns the merged report and the names of earlier rows dropped because the reference
    moved (other code, data or seeds: their numbers would not be comparable).
    """
    if not earlier:
        return report, []
    missing = [name for name in earlier.get("rows", {}) if name not in report["rows"]]
    same_reference = (
        earlier.get("seeds") == report["seeds"]
        and earlier.get("rows", {}).get(REFERENCE_ROW, {}).get("runs")
        == report["rows"][REFERENCE_ROW]["runs"]
    )
    if not same_reference:
        return report, missing
    rows = {**report["rows"], **{name: earlier["rows"][name] for name in missing}}
    return {**report, "rows": rows, "kept": kept_levers(rows)}, []


def format_table(report: Mapping[str, Any], model: str = "finetune") -> str:
    """The rows as the README's markdown table: what each sets, validation, test."""
    seeds = len(report["seeds"])
    lines = [
        f"| row | sets | validation accuracy ({seeds} seeds) | test accuracy, {model} ({seeds} seeds) | kept |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        sets = ", ".join(f"`{key}: {json.dumps(value)}`" for key, value in row["set"].items())
        test = row["test"].get(model)
        test_cell = f"{test['accuracy_mean']:.4f} ± {test['accuracy_std']:.4f}" if test else "-"
        kept = (
            "reference"
            if name == report["reference"]
            else ("yes" if name in report["kept"] else "no")
        )
        lines.append(
            f"| {name} | {sets or '(params file)'} | {row['validation_accuracy_mean']:.4f} ± "
            f"{row['validation_accuracy_std']:.4f} | {test_cell} | {kept} |"
        )
    return "\n".join(lines)


def taken_names(project: Path) -> Callable[[str], bool]:
    """Whether a DVC experiment name is taken on the current commit, or by this command."""
    with open_repository(str(project)) as repository:
        baseline = repository.scm.get_rev()
        existing = {
            ref.rsplit("/", 1)[-1]
            for ref in repository.scm.iter_refs(base=f"refs/exps/{baseline[:2]}/{baseline[2:]}/")
        }
    claimed: set[str] = set()

    def is_taken(name: str) -> bool:
        if name in existing or name in claimed:
            return True
        claimed.add(name)  # the caller takes the first free name it is told of
        return False

    return is_taken


def _selected_rows(
    rows: dict[str, dict[str, Any]], only: Sequence[str], job: str
) -> dict[str, dict[str, Any]]:
    """The rows named in ``only`` (all when empty), the reference always among them."""
    unknown = [name for name in only if name not in rows]
    if unknown:
        raise PipelineError(f"{ABLATIONS_FILE}: {job} has no row {unknown}; rows: {list(rows)}")
    if only:
        rows = {name: rows[name] for name in rows if name in only or name == REFERENCE_ROW}
    return rows


def _run_row(
    project: Path,
    pipeline_file: str,
    seed_keys: Sequence[str],
    paths: ExperimentPaths,
    name: str,
    settings: Mapping[str, Any],
    seeds: Sequence[int],
    is_taken: Callable[[str], bool],
) -> dict[int, dict[str, Any]]:
    """Run the row ``name`` (its ``settings``) under every seed; per seed, the fine-tuned
    model's validation accuracy and every model's test accuracy."""
    runs = {}
    for seed in seeds:
        run_name = first_free_name(
            f"{paths.experiment}-{name}-seed{seed}".replace(".", "_"), is_taken
        )
        overrides = [override(key, value) for key, value in settings.items()]
        print(f"ablations: {name}, seed {seed}", flush=True)
        scores = run_seed(
            project,
            pipeline_file,
            seed_keys,
            seed,
            run_name,
            paths.metrics("evaluate"),
            overrides,
        )
        finetune = json.loads((project / paths.metrics("finetune")).read_text())
        runs[seed] = {
            "validation_accuracy": float(finetune["validation_accuracy"]),
            "test": {model: score["accuracy"] for model, score in scores.items()},
        }
    return runs


def _write_report(
    project: Path, paths: ExperimentPaths, seeds: Sequence[int], results: dict[str, dict]
) -> dict[str, Any]:
    """Write ``ablations.json`` for ``results``, with the comparable rows of an earlier one."""
    report = {
        "seeds": list(seeds),
        "reference": REFERENCE_ROW,
        "std_ddof": STANDARD_DEVIATION_DDOF,
        "rows": results,
        "kept": kept_levers(results),
    }
    report_path = project / paths.metrics("ablations")
    earlier = json.loads(report_path.read_text()) if report_path.is_file() else None
    report, dropped = merge_earlier_rows(earlier, report)
    if dropped:
        print(
            f"ablations: dropped earlier rows {dropped} of {paths.metrics('ablations')}: "
            "their reference differs from this run's (other code, data or seeds)"
        )
    write_json(report_path, report)
    print(f"ablations: wrote {paths.metrics('ablations')}")
    return report


def run_ablations(
    project_dir: str, job: str, seeds: Sequence[int], only: Sequence[str] = ()
) -> dict[str, Any]:
    """Run every row of ``job`` (or those in ``only``, plus the reference) under ``seeds``;
    write and return ``ablations.json``."""
    project = Path(project_dir).resolve()
    pipeline_file, rows = load_rows(project / ABLATIONS_FILE, job)
    rows = _selected_rows(rows, only, job)
    rows = {REFERENCE_ROW: rows[REFERENCE_ROW], **rows}  # first: the others are judged by it
    seed_params = read_seed_params(project, pipeline_file)
    params_path, original_params = seed_params.path, seed_params.original
    seed_keys, paths = seed_params.seed_keys, ExperimentPaths(seed_params.experiment)
    results: dict[str, dict] = {}
    is_taken = taken_names(project)
    # The workspace ends as it began (params bytes, outputs, dvc.lock), after a failed row too.
    with workspace_restored(project, pipeline_file, seed_params):
        for name, settings in rows.items():
            # `dvc exp run` leaves the run's params file in the workspace: without this, a
            # row would also run with every setting of the rows before it.
            restore_bytes(params_path, original_params)
            runs = _run_row(
                project, pipeline_file, seed_keys, paths, name, settings, seeds, is_taken
            )
            results[name] = summarize_row(settings, runs)
            # Written after every row (the reference runs first): a row that fails, or a
            # stopped run, keeps the rows that finished.
            report = _write_report(project, paths, seeds, results)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_project_and_seeds(parser, "distinct seeds")
    parser.add_argument("--job", default="vision", help=f"a job of {ABLATIONS_FILE}")
    parser.add_argument("--rows", nargs="+", default=[], help="only these rows (and the reference)")
    arguments = parser.parse_args()
    if len(set(arguments.seeds)) != len(arguments.seeds):
        parser.error("--seeds: give distinct seeds")
    report = run_or_exit(
        "ablations",
        lambda: run_ablations(
            arguments.project_dir, arguments.job, arguments.seeds, arguments.rows
        ),
    )
    print(format_table(report))


if __name__ == "__main__":
    main()
