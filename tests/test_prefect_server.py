"""A real Prefect server on 127.0.0.1: both deployments register with their schedule, and a
triggered run completes, once on a process worker (prefect.yaml) and once under ``flow.serve``.

Every process this module starts (server, worker, serve) is stopped by its process id, and
every wait is bounded. The runs use the stand-in project of benchmarks.orchestration.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from benchmarks.orchestration import create_standin_project

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_SECONDS = 120
REGISTER_SECONDS = 60
RUN_SECONDS = 240
STOP_SECONDS = 15
WORK_POOL = "tlflax-process"
REPORT_KEYS = {"tlflax-standin-report", "tlflax-standin-per-class"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], environment: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``command`` from the repository root in a session of its own, logging to ``log``."""
    with log.open("w") as output:
        return subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    """Stop a process this module started, and whatever it spawned, by its process id (which
    is also its process-group id)."""
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, stop_signal)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for(read: Callable[[], Any], done: Callable[[Any], bool], what: str, seconds: float):
    """Poll ``read`` until ``done`` holds for its value, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}: {value!r}")
        time.sleep(1)


def prefect(environment: dict[str, str], *arguments: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *arguments],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"prefect {' '.join(arguments)}:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free 127.0.0.1 port; yields the environment that uses it."""
    scratch = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    environment = dict(
        os.environ,
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        PREFECT_HOME=str(scratch / "home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(scratch / "dvc-site-cache"),
        TLFLAX_DVC_REMOTE=str(scratch / "dvc-remote"),
    )
    command = [sys.executable, "-m", "prefect", "server", "start"]
    process = start(
        [*command, "--host", "127.0.0.1", "--port", str(port)], environment, scratch / "server.log"
    )
    try:

        def health() -> int | str:
            if process.poll() is not None:
                raise AssertionError((scratch / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{environment['PREFECT_API_URL']}/health", timeout=5) as reply:  # fmt: skip
                    return reply.status
            except (urllib.error.URLError, ConnectionError) as error:
                return str(error)

        wait_for(health, lambda status: status == 200, "the server's health", SERVER_START_SECONDS)
        yield environment
    finally:
        stop(process)


@pytest.fixture
def client(server: dict[str, str]) -> Iterator[SyncPrefectClient]:
    with SyncPrefectClient(server["PREFECT_API_URL"]) as api_client:
        yield api_client


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    return create_standin_project(tmp_path / "standin")


def read_deployment(client: SyncPrefectClient, name: str) -> Any:
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def scheduled_runs(client: SyncPrefectClient, deployment_id: UUID) -> list[Any]:
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        )
    )


def assert_nightly_schedule(client: SyncPrefectClient, deployment: Any) -> None:
    """The deployment carries prefect.yaml's cron, and the server has scheduled runs from it."""
    assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 3 * * *"]
    runs = wait_for(
        lambda: scheduled_runs(client, deployment.id), bool, "scheduled runs", REGISTER_SECONDS
    )
    for run in runs:
        start_time = run.expected_start_time
        assert (start_time.hour, start_time.minute) == (3, 0), start_time


def assert_completed_with_reports(client: SyncPrefectClient, flow_run_id: UUID) -> None:
    run = client.read_flow_run(flow_run_id)
    assert run.state.is_completed(), run.state
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    assert {artifact.key for artifact in artifacts if artifact.key} == REPORT_KEYS


def test_prefect_yaml_deployment_is_scheduled_and_runs_on_a_process_worker(
    server: dict[str, str], client: SyncPrefectClient, standin: Path, tmp_path: Path
) -> None:
    work_pools = subprocess.run(
        [str(ROOT / "infra/work-pools.sh")], cwd=ROOT, env=server, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert work_pools.returncode == 0, work_pools.stdout + work_pools.stderr
    prefect(server, "--no-prompt", "deploy", "--all")
    assert client.read_work_pool("tlflax-gpu").concurrency_limit == 1
    deployment = client.read_deployment_by_name("tlflax-pipeline/nightly")
    assert deployment.work_pool_name == WORK_POOL
    assert deployment.parameters == {"pull": True, "push": True}
    assert_nightly_schedule(client, deployment)
    text_job = client.read_deployment_by_name("tlflax-pipeline/nightly-text")
    assert text_job.parameters["pipeline_file"] == "experiments/text/dvc.yaml"

    run = client.create_flow_run_from_deployment(
        deployment.id, parameters={"project_dir": str(standin)}
    )
    worker = start(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--run-once"],
        server,
        tmp_path / "worker.log",
    )
    try:
        worker.wait(timeout=RUN_SECONDS)
    finally:
        stop(worker)
    assert_completed_with_reports(client, run.id)
    assert (standin / "dvc.lock").is_file()
    remote = Path(server["TLFLAX_DVC_REMOTE"])
    assert any(path.is_file() for path in remote.rglob("*")), "the run's `dvc push` sent nothing"


def test_flow_serve_registers_the_schedule_and_runs_a_triggered_run(
    server: dict[str, str], client: SyncPrefectClient, standin: Path, tmp_path: Path
) -> None:
    served = start(
        [sys.executable, "-m", "pipelines.deploy", "serve"], server, tmp_path / "serve.log"
    )
    try:
        deployment = wait_for(
            lambda: read_deployment(client, "tlflax-pipeline/nightly-served"),
            lambda found: found is not None,
            "the served deployment",
            REGISTER_SECONDS,
        )
        assert_nightly_schedule(client, deployment)
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"project_dir": str(standin), "pull": False, "push": False}
        )
        wait_for(
            lambda: client.read_flow_run(run.id).state,
            lambda state: state.is_final(),
            "the served run to finish",
            RUN_SECONDS,
        )
    finally:
        stop(served)
    assert_completed_with_reports(client, run.id)
