"""Orchestration for real: the Prefect flow over DVC on a tiny stand-in project.

The stand-in (benchmarks.orchestration.create_standin_project) has the real pipeline's six
stages, paths and exit statuses, but each stage is a small script, so these tests exercise
the real Prefect API (a test server), real DVC repositories and real git, independent of
the ML code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from benchmarks.orchestration import create_standin_project, git
from pipelines.flows import (
    PipelineError,
    StageFailed,
    TransientStageFailure,
    artifact_key,
    is_transient_failure,
    pipeline,
)

ALL_STAGES = ["prepare", "validate", "extract", "train_head", "finetune", "evaluate"]
# Waits for what the test server records asynchronously (task runs arrive as events).
API_WAIT_SECONDS = 30


@pytest.fixture(scope="session", autouse=True)
def dvc_site_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep DVC's per-repository state of the throw-away projects out of /var/tmp."""
    previous = os.environ.get("DVC_SITE_CACHE_DIR")
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvc-site-cache"))
    yield
    if previous is None:
        del os.environ["DVC_SITE_CACHE_DIR"]
    else:
        os.environ["DVC_SITE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API on a temporary database; yields its URL."""
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    return create_standin_project(tmp_path / "standin")


def stage_runs(project: Path) -> list[str]:
    """The stages whose commands really ran, in order (the stand-in logs each run)."""
    log = project / "stage-runs.log"
    return log.read_text().split() if log.exists() else []


def set_params(project: Path, **sections: dict[str, Any]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def add_stage(project: Path, name: str, command: str, outs: list[str]) -> None:
    pipeline_file = project / "dvc.yaml"
    definition = yaml.safe_load(pipeline_file.read_text())
    definition["stages"][name] = {"cmd": command, "outs": outs}
    pipeline_file.write_text(yaml.safe_dump(definition, sort_keys=False))


def run_flow(**parameters: Any) -> tuple[UUID, Any]:
    """Run the flow in this process; returns its flow-run id and final state."""
    state = pipeline(return_state=True, **parameters)
    return state.state_details.flow_run_id, state


def wait_for(read: Callable[[], Any], done: Callable[[Any], bool], what: str) -> Any:
    """Poll ``read`` until ``done`` holds for its value, at most API_WAIT_SECONDS."""
    deadline = time.monotonic() + API_WAIT_SECONDS
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last seen: {value!r}")
        time.sleep(0.5)


def finished_task_runs(flow_run_id: UUID, expected: set[str]) -> dict[str, Any]:
    """The flow run's task runs by name, once every name in ``expected`` has finished."""

    def read() -> dict[str, Any]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        return {run.name: run for run in runs}

    def done(runs: dict[str, Any]) -> bool:
        return all(name in runs and runs[name].state.is_final() for name in expected)

    return wait_for(read, done, f"task runs {sorted(expected)}")


def read_artifacts(flow_run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in artifacts}


# --- No-op and staleness ------------------------------------------------------------------------


def test_repeated_run_is_a_noop_and_a_changed_input_reruns_only_what_depends_on_it(
    prefect_api: str, standin: Path
) -> None:
    first = pipeline(project_dir=str(standin))
    assert first["stages_run"] == ALL_STAGES
    assert stage_runs(standin) == ALL_STAGES
    assert first["metrics"]["head_only"]["accuracy"] == pytest.approx(0.6)
    lock = (standin / "dvc.lock").read_text()

    again = pipeline(project_dir=str(standin))
    assert again["stages_run"] == []
    assert stage_runs(standin) == ALL_STAGES, "a no-op run must not start any stage"
    assert (standin / "dvc.lock").read_text() == lock

    # A changed param re-runs its stage and whatever its new outputs feed.
    set_params(standin, train_head={"learning_rate": 0.3})
    changed = pipeline(project_dir=str(standin))
    assert changed["stages_run"] == ["train_head", "finetune", "evaluate"]
    assert changed["metrics"]["head_only"]["accuracy"] == pytest.approx(0.8)

    # A deleted output makes its stage stale; DVC restores it from its run cache instead of
    # running the command, and (asked again after that stage) finds nothing downstream stale.
    runs_before = stage_runs(standin)
    (standin / "data/standin/features.json").unlink()
    restored = pipeline(project_dir=str(standin))
    assert restored["stages_run"] == ["extract"]
    assert stage_runs(standin) == runs_before
    assert (standin / "data/standin/features.json").is_file()


def test_stages_run_in_pipeline_order_whatever_order_they_are_asked_in(
    prefect_api: str, standin: Path
) -> None:
    result = pipeline(project_dir=str(standin), stages=["validate", "prepare"])
    assert result["stages_run"] == ["prepare", "validate"]
    assert result["metrics"] == {}, "no evaluation yet, and no failure because of it"
    with pytest.raises(PipelineError, match="unknown stage"):
        pipeline(project_dir=str(standin), stages=["prepare", "trian_head"])


# --- Retries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "return_code", "transient"),
    [
        ("ERROR: Unable to acquire lock. Most likely another DVC process is running", 255, True),
        (
            "ERROR: failed to reproduce 'train_head': failed to run: python x.py, exited with -9",
            255,
            True,
        ),
        (
            "ERROR: failed to reproduce 'train_head': failed to run: a && b, exited with 137",
            255,
            True,
        ),
        (
            "ERROR: failed to reproduce 'train_head': failed to run: a && b, exited with 143",
            255,
            True,
        ),
        (
            "ERROR: failed to reproduce 'validate': failed to run: python x.py, exited with 1",
            255,
            False,
        ),
        (
            "ERROR: failed to reproduce 'finetune': failed to run: python x.py, exited with 2",
            255,
            False,
        ),
        (
            "ERROR: failed to reproduce 'finetune': failed to run: python x.py, exited with -11",
            255,
            False,
        ),
        ("", -9, True),
        ("", -2, False),
    ],
)
def test_only_lock_contention_and_kills_count_as_transient(
    line: str, return_code: int, transient: bool
) -> None:
    assert is_transient_failure(return_code, [line] if line else []) is transient


def test_a_stage_killed_by_a_signal_is_retried_and_completes(
    prefect_api: str, standin: Path
) -> None:
    # The first attempt is SIGKILLed (as by the OOM killer); bash reports it as status 137.
    (standin / "kill_once.py").write_text(
        "import os, pathlib, signal\n"
        "marker = pathlib.Path('killed-once')\n"
        "if not marker.exists():\n"
        "    marker.touch()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    add_stage(standin, "flaky", "python kill_once.py && echo ok > flaky.txt", ["flaky.txt"])
    flow_run_id, state = run_flow(project_dir=str(standin), stages=["flaky"])
    assert state.is_completed(), state
    assert (standin / "killed-once").exists() and (standin / "flaky.txt").exists()
    assert finished_task_runs(flow_run_id, {"flaky"})["flaky"].run_count == 2


def test_dvc_lock_held_by_another_process_is_retried_and_completes(
    prefect_api: str, standin: Path
) -> None:
    # DVC releases its lock while a stage command runs. This command lets another process take
    # the lock for 5 s, so DVC cannot re-take it to record the stage (it waits 3 s, then fails
    # with "Unable to acquire lock"); the retry, 5 s later, finds the lock free.
    holder = (
        "import pathlib, time\n"
        "from dvc.repo import Repo\n"
        "with Repo('.').lock:\n"
        "    pathlib.Path('lock-taken').touch()\n"
        "    time.sleep(5)\n"
    )
    (standin / "take_lock.py").write_text(
        "import pathlib, subprocess, sys, time\n"
        "if not pathlib.Path('lock-taken').exists():\n"
        f"    subprocess.Popen([sys.executable, '-c', {holder!r}], start_new_session=True)\n"
        "    deadline = time.monotonic() + 30\n"
        "    while not pathlib.Path('lock-taken').exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
        "with open('contend-runs.log', 'a') as log:\n"
        "    log.write('ran\\n')\n"
        "pathlib.Path('contended.txt').write_text('done')\n"
    )
    add_stage(standin, "contend", "python take_lock.py", ["contended.txt"])
    flow_run_id, state = run_flow(project_dir=str(standin), stages=["contend"])
    assert state.is_completed(), state
    assert (standin / "contend-runs.log").read_text().split() == ["ran", "ran"]
    assert finished_task_runs(flow_run_id, {"contend"})["contend"].run_count == 2
    assert "contend" in (standin / "dvc.lock").read_text()


@pytest.mark.parametrize(
    ("failing_stage", "params"),
    [
        ("validate", {"validate": {"fail": True}}),  # exits 1: the data failed validation
        ("train_head", {"train_head": {"learning_rate": 0}}),  # exits 2: bad params
    ],
)
def test_a_stage_failing_by_its_own_verdict_is_not_retried_and_stops_the_flow(
    prefect_api: str, standin: Path, failing_stage: str, params: dict
) -> None:
    set_params(standin, **params)
    flow_run_id, state = run_flow(project_dir=str(standin))
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StageFailed) and not isinstance(error, TransientStageFailure)
    ran = stage_runs(standin)
    assert ran[-1] == failing_stage and ran.count(failing_stage) == 1
    assert finished_task_runs(flow_run_id, {failing_stage})[failing_stage].run_count == 1


# --- Reports --------------------------------------------------------------------------------


def test_reports_are_artifacts_with_stable_keys_and_stage_logs_reach_prefect(
    prefect_api: str, standin: Path
) -> None:
    first_run_id, _ = run_flow(project_dir=str(standin))
    second_run_id, _ = run_flow(project_dir=str(standin))
    report_key, table_key = artifact_key("standin", "report"), artifact_key("standin", "per-class")
    assert (report_key, table_key) == ("tlflax-standin-report", "tlflax-standin-per-class")
    first, second = read_artifacts(first_run_id), read_artifacts(second_run_id)
    # The same keys on every run: the server keeps them as versions of one report.
    assert set(first) == set(second) == {report_key, table_key}

    markdown = second[report_key].data
    assert "| head-only | 0.6000 | 0.5500 |" in markdown
    assert "| fine-tuned | 0.7000 | 0.6500 |" in markdown
    assert "**PASSED**: 1 checks, 0 critical failures" in markdown
    assert "reports/standin/data_docs/local_site/index.html" in markdown
    assert "reports/standin/dvc_plots/index.html" in markdown
    assert (standin / "reports/standin/dvc_plots/index.html").is_file()

    rows = json.loads(second[table_key].data)
    assert len(rows) == 4  # two models x two classes
    assert {"model": "fine-tuned", "class": "dog", "precision": 0.7, "recall": 0.7,
            "f1": 0.7, "support": 10} in rows  # fmt: skip

    def read_logs() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first_run_id]))
            )
        return [log.message for log in logs]

    wait_for(read_logs, lambda messages: "> python standin_stage.py evaluate" in messages,
             "the evaluate stage's output in the Prefect log")  # fmt: skip


def test_a_failed_validation_still_publishes_its_verdict(prefect_api: str, standin: Path) -> None:
    set_params(standin, validate={"fail": True})
    flow_run_id, state = run_flow(project_dir=str(standin))
    assert state.is_failed()
    artifacts = read_artifacts(flow_run_id)
    assert set(artifacts) == {artifact_key("standin", "report")}, "no evaluation, no table"
    markdown = artifacts[artifact_key("standin", "report")].data
    assert "**FAILED**: 1 checks, 1 critical failures" in markdown
    assert "| balance.train.class_ratio | critical | 9.0 | 1.5 |" in markdown


def test_missing_or_unreadable_report_inputs_never_fail_the_flow(
    prefect_api: str, standin: Path
) -> None:
    flow_run_id, state = run_flow(project_dir=str(standin), stages=["prepare"])
    assert state.is_completed(), state
    assert state.result()["metrics"] == {}
    assert artifact_key("standin", "per-class") not in read_artifacts(flow_run_id)

    (standin / "metrics/standin").mkdir(parents=True)
    (standin / "metrics/standin/evaluate.json").write_text("{ not json")
    flow_run_id, state = run_flow(project_dir=str(standin), stages=["prepare"])
    assert state.is_completed(), state
    assert state.result()["metrics"] == {}


# --- Experiments, remotes, the command line ---------------------------------------------------


def dvc(project: Path, *arguments: str, timeout: float = 120) -> str:
    """Run the dvc command line in ``project`` (with this interpreter as `python`)."""
    environment = dict(os.environ)
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment["PATH"]
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *arguments],
        cwd=project, env=environment, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, f"dvc {' '.join(arguments)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def experiments(project: Path) -> dict[str, dict]:
    """``dvc exp show --json`` as {experiment name: {"params": ..., "metrics": ...}}."""
    rows = json.loads(dvc(project, "exp", "show", "--json"))
    found = {}
    for row in rows:
        for branch in row.get("experiments") or []:
            for revision in branch["revs"]:
                data = revision["data"]
                found[revision["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data["metrics"]["metrics/standin/evaluate.json"]["data"],
                }
    return found


def test_overrides_run_a_dvc_experiment_that_shows_in_exp_show(
    prefect_api: str, standin: Path
) -> None:
    result = pipeline(
        project_dir=str(standin),
        overrides=["train_head.learning_rate=0.3"],
        experiment_name="lr-03",
    )
    assert result["metrics"]["head_only"]["accuracy"] == pytest.approx(0.8)
    found = experiments(standin)
    assert found["lr-03"]["params"]["train_head"]["learning_rate"] == 0.3
    assert found["lr-03"]["metrics"]["head_only"]["accuracy"] == pytest.approx(0.8)


def test_two_experiment_sweep_through_the_dvc_queue(standin: Path) -> None:
    for rate, name in ((0.2, "lr-02"), (0.4, "lr-04")):
        dvc(standin, "exp", "run", "--queue", "-S", f"train_head.learning_rate={rate}", "-n", name)
    dvc(standin, "queue", "start", "--jobs", "1")
    try:
        wait_for(
            lambda: dvc(standin, "queue", "status"),
            lambda status: status.count("Success") == 2 or "Failed" in status,
            "both queued experiments",
        )
    finally:
        # The queue's workers are DVC's own background processes: DVC stops them.
        dvc(standin, "queue", "stop")
    found = experiments(standin)
    assert found["lr-02"]["metrics"]["head_only"]["accuracy"] == pytest.approx(0.7)
    assert found["lr-04"]["metrics"]["head_only"]["accuracy"] == pytest.approx(0.9)
    assert found["lr-02"]["params"]["train_head"]["learning_rate"] == 0.2


def test_a_fresh_clone_pulls_what_a_teammate_pushed_instead_of_rerunning(
    prefect_api: str, standin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = tmp_path / "dvc-remote"
    monkeypatch.setenv("TLFLAX_DVC_REMOTE", str(remote))
    pushed = pipeline(project_dir=str(standin), push=True)
    assert pushed["stages_run"] == ALL_STAGES
    assert any(path.is_file() for path in remote.rglob("*")), "dvc push sent nothing"
    # What a teammate commits: dvc.lock and the small, git-tracked metrics and reports.
    git(standin, "add", "-A")
    git(standin, "commit", "-qm", "results")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(standin), str(clone)], check=True)
    pulled = pipeline(project_dir=str(clone), pull=True)
    assert pulled["stages_run"] == [], "pulled outputs must make every stage up to date"
    assert stage_runs(clone) == []
    assert (clone / "models/standin/finetune.json").read_text() == (
        standin / "models/standin/finetune.json"
    ).read_text()
    assert pulled["metrics"] == pushed["metrics"]


def test_the_command_line_prints_the_summary_and_exits_1_on_a_failed_stage(
    prefect_api: str, standin: Path
) -> None:
    environment = dict(os.environ, PREFECT_API_URL=prefect_api)

    def main(*arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipelines.flows", "--project-dir", str(standin)]
        return subprocess.run(
            [*command, *arguments], env=environment, capture_output=True, text=True, timeout=300
        )

    succeeded = main()
    assert succeeded.returncode == 0, succeeded.stderr[-3000:]
    assert (
        "test set: 20 images, trained on 60; head-only accuracy 0.6000 (macro-F1 0.5500); "
        "fine-tuned accuracy 0.7000 (macro-F1 0.6500)"
    ) in succeeded.stdout + succeeded.stderr

    failed = main("--set", "validate.fail=true")
    assert failed.returncode == 1
    assert "pipeline: `dvc exp run --set-param validate.fail=true` failed (exit 255)" in (
        failed.stderr
    )
