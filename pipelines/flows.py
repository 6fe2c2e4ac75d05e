"""The Prefect flow: the pipeline's DVC stages, each one a Prefect task.

DVC decides what is stale; Prefect adds what DVC lacks: schedules, retries of transient
failures, logs and reports on a server. Without a server it uses Prefect's ephemeral API:

    python -m pipelines.flows                                  # reproduce what is stale
    python -m pipelines.flows --set finetune.learning_rate=0.0005 --name lr-5e-4
    python -m pipelines.flows --pull --push                    # share data via the DVC remote

Why a repeated run costs a DVC no-op: one in-process ``dvc status`` compares each stage's
``dvc.lock`` entry (the md5 of its command, dependencies, parameters and outputs) with the
workspace, and only the stages it reports run, each as ``dvc repro --single-item <stage>``.
Prefect's own task cache stays off on purpose: it remembers inputs it has seen, not what the
workspace holds now, so after params A -> B -> A it would skip a stage whose outputs are B's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

# Offline by construction: no telemetry lookups, before Prefect or DVC is imported.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import networkx  # noqa: E402
from dvc.exceptions import DvcException  # noqa: E402
from dvc.lock import LockError  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipelines import reports  # noqa: E402

# The DVC helpers' names stay importable from here, the module that sets the environment first.
from pipelines.dvc_commands import (  # noqa: E402, F401
    ENVIRONMENT_REMOTE_NAME,
    LOCK_CONTENTION_MESSAGE,
    OUTPUT_TAIL_LINES,
    REMOTE_ENVIRONMENT_VARIABLE,
    RETRIES,
    RETRY_DELAYS_SECONDS,
    SHELL_SIGNAL_OFFSET,
    STAGE_EXIT_STATUS,
    TRANSIENT_SIGNALS,
    is_transient_failure,
    open_repository,
    remote_options,
    stream_dvc,
)
from pipelines.dvc_plots import DVC_PLOTS_TEMPLATE, experiment_plots  # noqa: E402
from tlflax.errors import MissingInputError  # noqa: E402
from tlflax.offline_pages import vendor_dvc_plots  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class PipelineError(RuntimeError):
    """The pipeline cannot go on; the message says why in one line."""


class StageFailed(PipelineError):
    """A DVC command exited non-zero; its own output, logged above, says why."""


class TransientStageFailure(StageFailed):
    """A DVC command failed in a way a later attempt can fix (see ``TRANSIENT_SIGNALS``)."""


class StagePlan(NamedTuple):
    """The requested stages in pipeline order, and those DVC reports as stale."""

    order: list[str]
    stale: list[str]


# --- DVC as a command, in Prefect's log ------------------------------------------------------


def _retry_only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry ``TransientStageFailure`` and DVC lock errors only."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, TransientStageFailure | LockError)


def run_dvc(arguments: list[str], project_dir: str, description: str) -> None:
    """Run ``dvc <arguments>`` in ``project_dir``, streaming its output into the Prefect log.

    Raises:
        TransientStageFailure: on lock contention or a kill by SIGKILL/SIGTERM.
        StageFailed: on any other non-zero exit.
    """
    return_code, tail = stream_dvc(arguments, project_dir, get_run_logger().info)
    if return_code == 0:
        return
    error_lines = [line for line in tail if line.startswith("ERROR")]
    failure = (
        TransientStageFailure if is_transient_failure(return_code, error_lines) else StageFailed
    )
    raise failure(f"{description} failed (exit {return_code}); see its log above")


# --- Tasks ----------------------------------------------------------------------------------

# The tasks that call DVC: retried on transient failures only, and out of Prefect's result
# cache, since DVC alone decides what is up to date.
_DVC_TASK_OPTIONS: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS_SECONDS,
    "retry_condition_fn": _retry_only_transient,
    "cache_policy": NO_CACHE,
}


@task(name="dvc-status", **_DVC_TASK_OPTIONS)
def plan_stages(project_dir: str, pipeline_file: str, stages: list[str] | None) -> StagePlan:
    """Order the stages of ``pipeline_file`` (only ``stages``, by name or DVC address, when
    given) as DVC's graph does, and find the stale ones; the plan holds DVC addresses."""
    with open_repository(project_dir) as repository:
        # Edges point from a stage to the stages it depends on, so the reversed topological
        # order puts every stage after its upstream stages.
        in_pipeline = [
            stage
            for stage in reversed(list(networkx.topological_sort(repository.index.graph)))
            if stage.cmd
            and os.path.relpath(stage.dvcfile.path, repository.root_dir)
            == os.path.normpath(pipeline_file)
        ]
        if not in_pipeline:
            raise PipelineError(f"{pipeline_file}: no pipeline stages in {project_dir}")
        wanted = set(stages or ())
        known = {stage.name for stage in in_pipeline} | {stage.addressing for stage in in_pipeline}
        if wanted - known:
            names = [stage.name for stage in in_pipeline]
            raise PipelineError(
                f"unknown stage(s) {sorted(wanted - known)}; {pipeline_file} has {names}"
            )
        order = [
            stage.addressing
            for stage in in_pipeline
            if stages is None or wanted & {stage.name, stage.addressing}
        ]
        changed = repository.status()
    return StagePlan(order=order, stale=[stage for stage in order if stage in changed])


@task(name="dvc-stage", task_run_name="{stage}", **_DVC_TASK_OPTIONS)
def run_stage(stage: str, project_dir: str) -> None:
    """Reproduce one DVC stage (and only it), streaming its output into the Prefect log."""
    run_dvc(["repro", "--single-item", stage], project_dir, f"stage '{stage}'")


@task(name="dvc-exp-run", **_DVC_TASK_OPTIONS)
def run_experiment(
    project_dir: str,
    pipeline_file: str,
    overrides: list[str],
    stages: list[str] | None,
    name: str | None,
) -> None:
    """``dvc exp run -S key=value ...``: the pipeline (or ``stages``) with overridden params,
    saved as a DVC experiment.

    DVC runs and records an experiment as one unit (one commit under refs/exps), so it is one
    task here; DVC still skips the stages the overrides do not reach.
    """
    arguments = ["exp", "run"]
    for override in overrides:
        arguments += ["--set-param", override]
    if name:
        arguments += ["--name", name]
    if stages:
        # A stage of another pipeline file is addressed as <file>:<stage>.
        arguments += ["--single-item"]
        arguments += [stage if ":" in stage else f"{pipeline_file}:{stage}" for stage in stages]
    else:
        arguments.append(pipeline_file)
    run_dvc(arguments, project_dir, f"`dvc {' '.join(arguments)}`")


@task(name="dvc-pull", **_DVC_TASK_OPTIONS)
def pull_data(project_dir: str, remote: str | None) -> int:
    """``dvc pull``: fetch and check out the outputs ``dvc.lock`` names; returns the fetched count.

    Outputs the remote lacks are skipped, not an error: the stages reproduce them.
    """
    with open_repository(project_dir, **remote_options(remote)) as repository:
        stats = repository.pull(allow_missing=True)["stats"]
    changed = sum(count for kind, count in stats.items() if kind != "fetched")
    get_run_logger().info(
        f"dvc pull: {stats['fetched']} file(s) fetched, {changed} workspace path(s) updated"
    )
    return stats["fetched"]


@task(name="dvc-push", **_DVC_TASK_OPTIONS)
def push_data(project_dir: str, remote: str | None) -> int:
    """``dvc push``: upload the cached outputs to the remote; returns how many were sent."""
    with open_repository(project_dir, **remote_options(remote)) as repository:
        count = repository.push()
    get_run_logger().info(f"dvc push: {count} file(s) uploaded")
    return count


# --- Reports --------------------------------------------------------------------------------


def _render_dvc_plots(project: Path, experiment: str, refresh: bool) -> Path | None:
    """``dvc plots show`` of the experiment's pipeline into reports/<experiment>/dvc_plots/,
    re-rendered only when ``refresh`` or absent, so a no-op run does not pay for it."""
    output = project / "reports" / experiment / "dvc_plots"
    index = output / "index.html"
    if refresh or not index.is_file():
        plots = experiment_plots(project, experiment)
        arguments = ["plots", "show", "--html-template", str(DVC_PLOTS_TEMPLATE), "--out"]
        output.mkdir(parents=True, exist_ok=True)
        try:
            run_dvc([*arguments, str(output), *plots], str(project), "dvc plots show")
            vendor_dvc_plots(output)
        except (StageFailed, MissingInputError) as error:
            get_run_logger().warning(f"DVC plots left out of the report, or blank: {error}")
    return index if index.is_file() else None


@task(name="publish-reports", cache_policy=NO_CACHE)
def publish_reports(project_dir: str, experiment: str, refresh_plots: bool) -> list[str]:
    """Markdown report, strategy advice and per-class table as Prefect artifacts; returns keys.

    Each part appears only when its input file exists: a missing report input never fails.
    """
    project = Path(project_dir)
    warn = get_run_logger().warning
    written = []
    plots_index = _render_dvc_plots(project, experiment, refresh_plots)
    markdown = reports.report_markdown(project, experiment, warn, plots_index)
    if markdown is not None:
        key = reports.artifact_key(experiment, "report")
        create_markdown_artifact(
            markdown, key=key, description=f"tlflax {experiment}: metrics, validation, reports"
        )
        written.append(key)
    advice = reports.advice_report(project, experiment, warn)
    if advice is not None:
        key = reports.artifact_key(experiment, "advice")
        create_markdown_artifact(
            advice, key=key, description=f"tlflax {experiment}: transfer strategy advice"
        )
        written.append(key)
    rows = reports.per_class_rows(project, experiment, warn)
    if rows:
        key = reports.artifact_key(experiment, "per-class")
        create_table_artifact(
            rows, key=key, description=f"tlflax {experiment}: per-class test metrics"
        )
        written.append(key)
    return written


# --- The flow -------------------------------------------------------------------------------


def reproduce_stale_stages(
    project_dir: str, pipeline_file: str, stages: list[str] | None
) -> list[str]:
    """Run the stale stages (among ``stages``) in pipeline order; returns those that ran."""
    plan = plan_stages(project_dir, pipeline_file, stages)
    stale = set(plan.stale)
    ran = []
    for position, stage in enumerate(plan.order):
        if stage not in stale:
            continue
        run_stage(stage, project_dir)
        ran.append(stage)
        later = plan.order[position + 1 :]
        if later:
            # The stage's new outputs may have made later stages stale: ask DVC again.
            stale = set(plan_stages(project_dir, pipeline_file, later).stale)
    up_to_date = [stage for stage in plan.order if stage not in ran]
    get_run_logger().info(f"ran {ran or 'no stage'}; up to date: {up_to_date or 'none'}")
    return ran


def _announce_test_metrics(project: str, experiment: str | None) -> dict[str, Any]:
    """The experiment's test metrics, printed as one line; empty before an evaluation."""
    metrics = None
    if experiment is not None:
        metrics = reports.read_json(
            Path(project) / "metrics" / experiment / "evaluate.json", get_run_logger().warning
        )
    if isinstance(metrics, dict):
        print(reports.summary_line(metrics))
    else:
        print(f"no evaluation metrics yet (experiment {experiment})")
    return metrics if isinstance(metrics, dict) else {}


@flow(name="tlflax-pipeline", log_prints=True)
def pipeline(
    stages: list[str] | None = None,
    project_dir: str | None = None,
    pipeline_file: str = "dvc.yaml",
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    pull: bool = False,
    push: bool = False,
    remote: str | None = None,
) -> dict[str, Any]:
    """Reproduce the pipeline's stale DVC stages, publish reports, return the test metrics.

    Args:
        stages: stage names to consider (default: all of ``pipeline_file``), run in DVC's order.
        project_dir: the DVC project (default: this repository).
        pipeline_file: the pipeline, relative to ``project_dir``: dvc.yaml (the vision job) or
            experiments/text/dvc.yaml; its experiment is named in the params.yaml beside it.
        overrides: ``key=value`` params; when given, the run is ``dvc exp run -S ...``.
        experiment_name: the DVC experiment's name (with ``overrides``; DVC picks one if None).
        pull: ``dvc pull`` before running, so stages a teammate ran are not run again.
        push: ``dvc push`` after running.
        remote: a DVC remote name; default $TLFLAX_DVC_REMOTE, else the project's default.

    Returns:
        ``experiment`` (from params.yaml), ``stages_run`` (None for ``dvc exp run``, which
        logs what it ran), ``dvc_experiment`` and ``metrics`` (empty before an evaluation).

    Raises:
        StageFailed: a stage failed (after retries, when transient); reports still publish.
    """
    project = str(Path(project_dir or PROJECT_ROOT).resolve())
    stages_run: list[str] | None = None
    try:
        if pull:
            pull_data(project, remote)
        if overrides:
            run_experiment(project, pipeline_file, overrides, stages, experiment_name)
        else:
            stages_run = reproduce_stale_stages(project, pipeline_file, stages)
        if push:
            push_data(project, remote)
    finally:
        # Reports publish even after a failed stage: a failed data validation is worth reading.
        experiment = reports.read_experiment(Path(project), pipeline_file)
        if experiment is not None:
            publish_reports(project, experiment, refresh_plots=stages_run != [])

    return {
        "experiment": experiment,
        "stages_run": stages_run,
        "dvc_experiment": experiment_name,
        "metrics": _announce_test_metrics(project, experiment),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT), help="the DVC project")
    parser.add_argument(
        "--pipeline-file",
        default="dvc.yaml",
        help="the pipeline, e.g. experiments/text/dvc.yaml (default: dvc.yaml)",
    )
    parser.add_argument(
        "--stage", action="append", dest="stages", help="a stage to consider (repeatable)"
    )
    parser.add_argument(
        "--set",
        action="append",
        dest="overrides",
        metavar="KEY=VALUE",
        help="override a param; runs `dvc exp run -S` (repeatable)",
    )
    parser.add_argument("--name", help="the DVC experiment's name (with --set)")
    parser.add_argument("--pull", action="store_true", help="dvc pull before running")
    parser.add_argument("--push", action="store_true", help="dvc push after running")
    parser.add_argument(
        "--remote", help=f"DVC remote name (default ${REMOTE_ENVIRONMENT_VARIABLE})"
    )
    arguments = parser.parse_args()
    try:
        pipeline(
            stages=arguments.stages,
            project_dir=arguments.project_dir,
            pipeline_file=arguments.pipeline_file,
            overrides=arguments.overrides,
            experiment_name=arguments.name,
            pull=arguments.pull,
            push=arguments.push,
            remote=arguments.remote,
        )
    except (PipelineError, DvcException) as error:  # DVC's: a held lock, a missing remote
        print(f"pipeline: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
