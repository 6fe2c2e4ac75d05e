"""The pipeline under several seeds: each model's test accuracy and macro-F1, mean and spread.

    python -m pipelines.seeds                                     # seeds 0 1 2, the vision job
    python -m pipelines.seeds --seeds 0 1 2 3 4 --pipeline-file experiments/text/dvc.yaml

Each seed is a full run of the pipeline with that seed everywhere: every ``seed`` key of the
params file beside the pipeline file (``prepare.seed`` draws the training subset, the training
stages' seeds initialise and order) is set to it. The keys are found in the file - every
top-level section holding a ``seed`` - so a new stage's seed is varied without a code change.
A run is ``dvc exp run -S <params file>:<section>.seed=N ... <pipeline file>``, saved as the
DVC experiment ``<experiment>-seed<N>`` (``-2``, ``-3``, ... when that name is taken on the
current commit), so ``dvc exp show`` lists every run.

Writes ``metrics/<experiment>/seeds.json`` once every seed has run (atomically; nothing when a
run fails)::

    {"seeds": [0, 1, 2],
     "seed_params": ["prepare.seed", "train_head.seed", ...],
     "std_ddof": 1,
     "models": {"<model>": {"accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std"}},
     "runs": {"0": {"<model>": {"accuracy", "macro_f1"}}, ...},
     "dvc_experiments": {"0": "<experiment>-seed0", ...}}

``models`` holds every entry of ``evaluate.json`` that reports an accuracy (head_only, finetune,
scratch, baseline, ...) in every seed's run, so a new model is picked up without a code change.
Each ``*_std`` is the *sample* standard deviation over the seeds (``numpy.std(ddof=1)``, hence at
least two seeds): the estimate of the seed-to-seed spread, a little wider than these runs' own.

The workspace ends as it began. ``dvc exp run`` leaves the workspace at its last run's params
and outputs, so the params file's own seed runs last (when its seed keys share one value that
is among the seeds; otherwise ``dvc repro`` follows the seeds, with the original params): stages
computed before come back from DVC's run cache instead of training again, and ``dvc.lock``
describes the original params, so ``dvc status`` is as clean as it was. Setting a value makes
DVC rewrite the params file's layout (``null`` becomes empty, flow-style lists and indented
sequences are re-flowed), so the file gets its original bytes back at the end, after a failure
too. A failed run leaves its outputs in the workspace; ``dvc repro <pipeline file>`` brings them
back to the original params (from the run cache where it can).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from dvc.exceptions import DvcException
from dvc.repo.experiments.refs import ExpRefInfo

from pipelines.flows import (
    PROJECT_ROOT,
    RETRIES,
    RETRY_DELAYS_SECONDS,
    STAGE_EXIT_STATUS,
    PipelineError,
    is_transient_failure,
    open_repository,
    stream_dvc,
)

# Still importable from here, as before the statistics had a module of their own.
from pipelines.seed_statistics import (  # noqa: F401
    SCORES,
    STANDARD_DEVIATION_DDOF,
    SeedScores,
    format_table,
    read_model_scores,
    seeds_report,
    summarize,
)
from pipelines.stages.common import ExperimentPaths
from tlflax.io import atomic_path, write_json

T = TypeVar("T")

DEFAULT_SEEDS = (0, 1, 2)

# What `dvc exp run` prints when a stage fails, and where that stage's own output starts.
FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)': (.*)")
COMMAND_FAILED = "failed to run:"  # the stage's command ran, and exited with a status
RUNNING_STAGE = "Running stage '"
# A stage's own account of its failure: "<stage>: error: ..." (pipelines/stages/common.py),
# "Data validation FAILED: ..." (validate) or a traceback's last line ("ValueError: ...").
STAGE_FAILURE_LINE = re.compile(r": error: |\bFAILED\b|^[\w.]*(Error|Exception)\b")


class SeedRunFailed(PipelineError):
    """One seed's run failed; the message names the seed and the failing stage's message."""


# --- Pure parts: params, names, failures -----------------------------------------------------


def find_seed_keys(params: Mapping[str, Any]) -> list[str]:
    """``<section>.seed`` for every top-level section of ``params`` holding a ``seed`` key."""
    return [
        f"{section}.seed"
        for section, values in params.items()
        if isinstance(values, Mapping) and "seed" in values
    ]


def own_seed(params: Mapping[str, Any], seed_keys: Sequence[str]) -> int | None:
    """The seed the params file itself runs with: its seed keys' shared value, None if they
    differ (then no seed of this command reproduces the file's own run)."""
    values = {params[key.removesuffix(".seed")]["seed"] for key in seed_keys}
    return values.pop() if len(values) == 1 else None


def run_order(seeds: Sequence[int], last: int | None) -> list[int]:
    """``seeds`` with ``last`` moved to the end, where ``dvc exp run`` leaves the workspace."""
    return [seed for seed in seeds if seed != last] + [seed for seed in seeds if seed == last]


def first_free_name(name: str, is_taken: Callable[[str], bool]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : the first that ``is_taken`` refuses."""
    candidate, suffix = name, 2
    while is_taken(candidate):
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return candidate


def failure_message(seed: int, status: int, output: Sequence[str]) -> str:
    """One line naming the seed, the stage that failed and that stage's own message.

    Args:
        seed: the seed whose run failed.
        status: the exit status of ``dvc exp run``.
        output: the last lines ``dvc exp run`` printed (stages' output included).
    """
    error_at = next((index for index, line in enumerate(output) if line.startswith("ERROR")), None)
    if error_at is None:
        last = output[-1] if output else "no output"
        return f"seed {seed}: `dvc exp run` failed (exit {status}): {last}"
    dvc_error = output[error_at].removeprefix("ERROR:").strip()
    failed_stage = FAILED_STAGE.search(dvc_error)
    if failed_stage is None:  # DVC failed before any stage: a held lock, a bad -S
        return f"seed {seed}: `dvc exp run` failed (exit {status}): {dvc_error}"
    stage, reason = failed_stage.groups()
    stage_status = STAGE_EXIT_STATUS.search(reason)
    if COMMAND_FAILED not in reason or stage_status is None:
        # DVC stopped the stage itself (a missing dependency, say): its reason is the message.
        return f"seed {seed}: stage '{stage}' failed: {reason}"
    stage_started = max(
        (index + 1 for index, line in enumerate(output[:error_at]) if RUNNING_STAGE in line),
        default=0,
    )
    stage_output = [line.strip() for line in output[stage_started:error_at] if line.strip()]
    explained = [line for line in stage_output if STAGE_FAILURE_LINE.search(line)]
    message = (explained or stage_output or [reason])[-1]
    return f"seed {seed}: stage '{stage}' failed (exit {stage_status.group(1)}): {message}"


# --- DVC ------------------------------------------------------------------------------------


def params_file_of(pipeline_file: str) -> Path:
    """The params file of a pipeline: the params.yaml beside it (as ``reports`` reads it)."""
    return Path(pipeline_file).parent / "params.yaml"


@dataclass(frozen=True)
class SeedParams:
    """A pipeline's params file as a seed run finds it: its bytes (given back at the end),
    the experiment it names and the keys that hold a seed."""

    path: Path
    original: bytes
    experiment: str
    seed_keys: list[str]


def read_seed_params(project: Path, pipeline_file: str) -> SeedParams:
    """The params file beside ``pipeline_file``, checked for what a seed run needs.

    Raises:
        PipelineError: the file names no experiment, or no section holds a ``seed``.
    """
    path = project / params_file_of(pipeline_file)
    original = path.read_bytes()
    params = yaml.safe_load(original) or {}
    experiment, seed_keys = params.get("experiment"), find_seed_keys(params)
    if not experiment or not seed_keys:
        raise PipelineError(f"{path}: needs an 'experiment' and a section with a 'seed'")
    return SeedParams(path, original, str(experiment), seed_keys)


def experiment_names(project: Path, experiment: str, seeds: Sequence[int]) -> dict[int, str]:
    """A DVC experiment name per seed, ``<experiment>-seed<N>``, made unique on HEAD.

    DVC refuses a name already used on the same commit unless forced, and ``--force`` would
    also re-run every stage; a fresh name keeps the earlier run and the run cache.
    """
    with open_repository(str(project)) as repository:
        baseline = repository.scm.get_rev()

        def is_taken(name: str) -> bool:
            return repository.scm.get_ref(str(ExpRefInfo(baseline, name))) is not None

        return {seed: first_free_name(f"{experiment}-seed{seed}", is_taken) for seed in seeds}


def echo(line: str) -> None:
    """Show a line of DVC's output as it comes: a seed's run takes minutes."""
    print(line, flush=True)


def run_dvc(arguments: list[str], project: Path) -> tuple[int, list[str]]:
    """Run ``dvc <arguments>`` in ``project``, echoing its output; returns its exit status and
    last lines. Transient failures (a held lock, a kill: ``flows.is_transient_failure``) are
    tried again after the flow's retry delays."""
    for delay in RETRY_DELAYS_SECONDS[:RETRIES]:
        status, output = stream_dvc(arguments, str(project), echo)
        errors = [line for line in output if line.startswith("ERROR")]
        if status == 0 or not is_transient_failure(status, errors):
            return status, output
        print(f"seeds: `dvc {arguments[0]}` failed (exit {status}), again in {delay} s")
        time.sleep(delay)
    return stream_dvc(arguments, str(project), echo)


def run_seed(
    project: Path,
    pipeline_file: str,
    seed_keys: Sequence[str],
    seed: int,
    experiment_name: str,
    evaluation_file: Path,
    overrides: Sequence[str] = (),
) -> SeedScores:
    """One full run of the pipeline with every seed key at ``seed`` (and each ``key=value``
    of ``overrides`` set in the params file); returns its scores.

    Raises:
        SeedRunFailed: the run failed, or wrote no usable ``evaluation_file``.
    """
    params_file = params_file_of(pipeline_file)
    arguments = ["exp", "run", "--name", experiment_name]
    for key in seed_keys:
        arguments += ["--set-param", f"{params_file}:{key}={seed}"]
    for override in overrides:
        arguments += ["--set-param", f"{params_file}:{override}"]
    arguments.append(pipeline_file)
    print(f"seeds: seed {seed}: dvc {' '.join(arguments)}", flush=True)
    status, output = run_dvc(arguments, project)
    if status != 0:
        raise SeedRunFailed(failure_message(seed, status, output))
    # `dvc exp run` leaves its results in the workspace: this seed's evaluation is there now.
    try:
        evaluation = json.loads((project / evaluation_file).read_text())
        if not isinstance(evaluation, dict):
            raise ValueError("not a JSON object")
        scores = read_model_scores(evaluation)
    except (OSError, ValueError) as error:
        raise SeedRunFailed(f"seed {seed}: {evaluation_file}: {error}") from error
    if not scores:
        raise SeedRunFailed(f"seed {seed}: {evaluation_file} reports no model's accuracy")
    return scores


def restore_bytes(path: Path, original: bytes) -> None:
    """Put ``original`` back into ``path`` (atomically) unless it is there already."""
    if path.read_bytes() != original:
        with atomic_path(path) as temporary:
            temporary.write_bytes(original)


def repro_failure(project: Path, pipeline_file: str) -> str | None:
    """``dvc repro`` the pipeline, bringing outputs and dvc.lock back in line with its params
    file (mostly from the run cache): None where it succeeded, else why it failed."""
    status, output = run_dvc(["repro", pipeline_file], project)
    if status == 0:
        return None
    errors = [line for line in output if line.startswith("ERROR")]
    reason = (errors or output or ["no output"])[0]
    return f"restoring the workspace: `dvc repro` failed: {reason}"


@contextlib.contextmanager
def workspace_restored(
    project: Path, pipeline_file: str, seed_params: SeedParams
) -> Iterator[None]:
    """Run the body, then give the params file its original bytes back and ``dvc repro`` the
    pipeline: the workspace ends as the params file's own run, not as the body's last ``dvc
    exp run`` left it - after a failure of the body too.

    Raises:
      PipelineError: the body ended normally and ``dvc repro`` failed. After a failure of the
        body, that failure propagates, and a failed ``dvc repro`` is only printed.
    """
    body_failed = True
    try:
        yield
        body_failed = False
    finally:
        restore_bytes(seed_params.path, seed_params.original)
        failure = repro_failure(project, pipeline_file)
        if failure and body_failed:
            print(failure, file=sys.stderr)
        elif failure:
            raise PipelineError(failure)


def refresh_report(project: Path, pipeline_file: str) -> None:
    """Re-run the pipeline's ``report`` stage, which shows seeds.json but cannot depend on it
    (a pipeline does not write it). A pipeline without that stage is left as it is."""
    stages = (yaml.safe_load((project / pipeline_file).read_text()) or {}).get("stages", {})
    if "report" not in stages:
        return
    status, output = run_dvc(
        ["repro", "--force", "--single-item", f"{pipeline_file}:report"], project
    )
    if status != 0:
        errors = [line for line in output if line.startswith("ERROR")]
        print(f"seeds: the report was not refreshed: {(errors or output or ['no output'])[0]}")


def run_seeds(project_dir: str, pipeline_file: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Run ``pipeline_file`` once per seed; write and return the ``seeds.json`` report.

    Args:
        project_dir: the DVC project (a git repository: DVC experiments need commits).
        pipeline_file: the pipeline, relative to ``project_dir``: dvc.yaml or
            experiments/text/dvc.yaml; its params file is the params.yaml beside it.
        seeds: two or more distinct seeds, reported in this order.

    Raises:
        SeedRunFailed: a seed's run failed (no seeds.json is written).
        PipelineError: the params file has no experiment or seed keys, or restoring the
            workspace with ``dvc repro`` failed.
    """
    project = Path(project_dir).resolve()
    seed_params = read_seed_params(project, pipeline_file)
    params_path, original_params = seed_params.path, seed_params.original
    experiment, seed_keys = seed_params.experiment, seed_params.seed_keys
    paths = ExperimentPaths(experiment)
    names = experiment_names(project, experiment, seeds)
    original_seed = own_seed(yaml.safe_load(original_params), seed_keys)
    runs: dict[int, SeedScores] = {}
    try:
        for seed in run_order(seeds, original_seed):
            runs[seed] = run_seed(
                project, pipeline_file, seed_keys, seed, names[seed], paths.metrics("evaluate")
            )
        report = seeds_report(seeds, seed_keys, runs, names)
        write_json(project / paths.metrics("seeds"), report)
        print(f"seeds: wrote {paths.metrics('seeds')}")
        refresh_report(project, pipeline_file)
        if original_seed not in seeds:
            # No seed run reproduced the params file's own; run it (mostly from the run cache)
            # so that outputs and dvc.lock match the params file again.
            restore_bytes(params_path, original_params)
            print(f"seeds: back to {params_file_of(pipeline_file)}: dvc repro {pipeline_file}")
            failure = repro_failure(project, pipeline_file)
            if failure:
                raise PipelineError(failure)
    finally:
        restore_bytes(params_path, original_params)
    left_out = set().union(*runs.values()) - set(report["models"])
    if left_out:
        print(f"seeds: left out {sorted(left_out)}: not reported by every seed's run")
    return report


# --- Command line ---------------------------------------------------------------------------


def non_negative_seed(text: str) -> int:
    seed = int(text)
    if seed < 0:
        raise argparse.ArgumentTypeError(f"a seed is a non-negative integer, not {text}")
    return seed


def add_project_and_seeds(parser: argparse.ArgumentParser, seeds_help: str) -> None:
    """``--project-dir`` and ``--seeds``: what every command running seeds through DVC takes."""
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT), help="the DVC project")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=non_negative_seed,
        default=list(DEFAULT_SEEDS),
        help=f"{seeds_help} (default: {' '.join(map(str, DEFAULT_SEEDS))})",
    )


def run_or_exit(command: str, run: Callable[[], T]) -> T:
    """``run()``; a failure DVC or the pipeline reports (not a git repository, a lock, a
    failed run) ends the command with one line and exit status 1."""
    try:
        return run()
    except (PipelineError, DvcException) as error:
        print(f"{command}: {error}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_project_and_seeds(parser, "two or more distinct seeds")
    parser.add_argument(
        "--pipeline-file",
        default="dvc.yaml",
        help="the pipeline, e.g. experiments/text/dvc.yaml (default: dvc.yaml)",
    )
    arguments = parser.parse_args()
    if len(set(arguments.seeds)) != len(arguments.seeds) or len(arguments.seeds) < 2:
        parser.error("--seeds: give two or more distinct seeds (a sample std needs two)")
    report = run_or_exit(
        "seeds", lambda: run_seeds(arguments.project_dir, arguments.pipeline_file, arguments.seeds)
    )
    print(format_table(report))


if __name__ == "__main__":
    main()
