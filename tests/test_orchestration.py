"""Orchestration for real: the Prefect flow over DVC on a tiny stand-in project.

The stand-in (benchmarks.orchestration.create_standin_project) has the real pipeline's six
stages, paths and exit statuses, but each stage is a small script, so these tests exercise
the real Prefect API (a test server), real DVC repositories and real git, independent of
the ML code.
"""

from __future__ import annotations

import json
import os
import shutil
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
    is_transient_failure,
    main,
    pipeline,
)
from pipelines.reports import artifact_key

ROOT = Path(__file__).resolve().parent.parent
ALL_STAGES = ["prepare", "validate", "extract", "train_head", "finetune", "evaluate"]
# Waits for what the test server records asynchronously (task runs arrive as events).
API_WAIT_SECONDS = 30


@pytest.fixture(scope="module", autouse=True)
def dvc_site_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep DVC's per-repository state of the throw-away projects out of /var/tmp."""
    previous = os.environ.get("DVC_SITE_CACHE_DIR")
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvc-site-cache"))
    yield
    if previous is None:
        del os.environ["DVC_SITE_CACHE_DIR"]
    else:
        os.environ["DVC_SITE_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """A real Prefect API on a temporary database; yields its URL."""
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


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


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    """A stand-in project whose pipeline has never run."""
    return create_standin_project(tmp_path / "standin")


@pytest.fixture(scope="module")
def reproduced_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in after `dvc repro`, dvc.lock and the small outputs committed (as a team
    keeps the real project)."""
    project = create_standin_project(tmp_path_factory.mktemp("template") / "standin")
    dvc(project, "repro")
    (project / "stage-runs.log").unlink()
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipeline results")
    return project


@pytest.fixture
def reproduced(reproduced_template: Path, tmp_path: Path) -> Path:
    """A private copy of the reproduced stand-in, less DVC's scratch directory."""

    def dvc_scratch(directory: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(directory).name == ".dvc" else []

    return Path(shutil.copytree(reproduced_template, tmp_path / "standin", ignore=dvc_scratch))


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


def finished_task_run(flow_run_id: UUID, name: str) -> Any:
    """The flow run's task run called ``name``, once the server has it in a final state."""

    def read() -> dict[str, Any]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        return {run.name: run for run in runs}

    runs = wait_for(read, lambda runs: name in runs and runs[name].state.is_final(), name)
    return runs[name]


def read_artifacts(flow_run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    # Prefect adds unkeyed artifacts of its own (e.g. for a failed run); ours have keys.
    return {artifact.key: artifact for artifact in artifacts if artifact.key}


def assert_failed_once_without_retry(project: Path, flow_run_id: UUID, state: Any, stage: str):
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StageFailed) and not isinstance(error, TransientStageFailure)
    ran = stage_runs(project)
    assert ran[-1] == stage and ran.count(stage) == 1, ran
    assert finished_task_run(flow_run_id, stage).run_count == 1


# --- No-op and staleness ------------------------------------------------------------------------


def test_first_run_runs_every_stage_and_a_repeat_is_a_noop(prefect_api: str, standin: Path) -> None:
    first_run_id, first = run_flow(project_dir=str(standin))
    assert first.result()["stages_run"] == ALL_STAGES
    assert stage_runs(standin) == ALL_STAGES
    lock = (standin / "dvc.lock").read_text()

    again = pipeline(project_dir=str(standin))
    assert again["stages_run"] == []
    assert stage_runs(standin) == ALL_STAGES, "a no-op run must not start any stage"
    assert (standin / "dvc.lock").read_text() == lock

    def read_logs() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first_run_id]))
            )
        return [log.message for log in logs]

    wait_for(read_logs, lambda messages: "> python standin_stage.py evaluate" in messages,
             "the evaluate stage's output in the Prefect log")  # fmt: skip


def test_a_changed_input_reruns_only_what_depends_on_it(prefect_api: str, reproduced: Path) -> None:
    # A changed param re-runs its stage and whatever its new outputs feed.
    set_params(reproduced, train_head={"learning_rate": 0.3})
    changed = pipeline(project_dir=str(reproduced))
    assert changed["stages_run"] == ["train_head", "finetune", "evaluate"]
    assert stage_runs(reproduced) == ["train_head", "finetune", "evaluate"]
    assert changed["metrics"]["head_only"]["accuracy"] == pytest.approx(0.8)

    # A deleted output makes its stage stale; DVC restores it from its run cache instead of
    # running the command, and (asked again after that stage) finds nothing downstream stale.
    (reproduced / "data/standin/features.json").unlink()
    restored = pipeline(project_dir=str(reproduced))
    assert restored["stages_run"] == ["extract"]
    assert stage_runs(reproduced) == ["train_head", "finetune", "evaluate"]
    assert (reproduced / "data/standin/features.json").is_file()


def test_stages_run_in_pipeline_order_whatever_order_they_are_asked_in(
    prefect_api: str, standin: Path
) -> None:
    result = pipeline(project_dir=str(standin), stages=["validate", "prepare"])
    assert result["stages_run"] == ["prepare", "validate"]
    with pytest.raises(PipelineError, match="unknown stage"):
        pipeline(project_dir=str(standin), stages=["prepare", "trian_head"])


def test_one_pipeline_file_at_a_time(prefect_api: str, reproduced: Path) -> None:
    # A second pipeline in the same repository, as experiments/text/dvc.yaml is in the real one.
    second = reproduced / "experiments/second"
    second.mkdir(parents=True)
    (second / "params.yaml").write_text("experiment: second\n")
    command = "echo 2 > second.txt && echo second >> stage-runs.log"
    stage = {"wdir": "../..", "cmd": command, "outs": ["second.txt"]}
    (second / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"count": stage}}))

    default = pipeline(project_dir=str(reproduced))
    assert default["stages_run"] == [] and default["experiment"] == "standin"
    chosen = pipeline(project_dir=str(reproduced), pipeline_file="experiments/second/dvc.yaml")
    assert chosen["stages_run"] == ["experiments/second/dvc.yaml:count"]
    assert chosen["experiment"] == "second"
    assert stage_runs(reproduced) == ["second"]


# --- Retries --------------------------------------------------------------------------------

REPRODUCE_FAILED = "ERROR: failed to reproduce 'stage': failed to run: python s.py"


@pytest.mark.parametrize(
    ("return_code", "line", "transient"),
    [
        (255, "ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
        (255, f"{REPRODUCE_FAILED}, exited with -9", True),  # SIGKILL
        (255, f"{REPRODUCE_FAILED} && b, exited with 137", True),  # SIGKILL, via the shell
        (255, f"{REPRODUCE_FAILED} && b, exited with 143", True),  # SIGTERM, via the shell
        (255, f"{REPRODUCE_FAILED}, exited with 1", False),  # failed validation
        (255, f"{REPRODUCE_FAILED}, exited with 2", False),  # bad params or input
        (255, f"{REPRODUCE_FAILED}, exited with -11", False),  # a crash
        (-9, "", True),  # DVC itself killed
        (-2, "", False),  # DVC interrupted by the user
    ],
)
def test_only_lock_contention_and_kills_count_as_transient(
    return_code: int, line: str, transient: bool
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
    assert finished_task_run(flow_run_id, "flaky").run_count == 2


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
    assert finished_task_run(flow_run_id, "contend").run_count == 2
    assert "contend" in (standin / "dvc.lock").read_text()


def test_bad_params_stop_the_flow_without_a_retry(prefect_api: str, reproduced: Path) -> None:
    set_params(reproduced, train_head={"learning_rate": 0})  # the stage exits 2
    flow_run_id, state = run_flow(project_dir=str(reproduced))
    assert_failed_once_without_retry(reproduced, flow_run_id, state, "train_head")


def test_a_failed_validation_stops_the_flow_without_a_retry_and_reports_its_verdict(
    prefect_api: str, reproduced: Path
) -> None:
    set_params(reproduced, validate={"fail": True})  # the stage exits 1
    flow_run_id, state = run_flow(project_dir=str(reproduced))
    assert_failed_once_without_retry(reproduced, flow_run_id, state, "validate")
    markdown = read_artifacts(flow_run_id)[artifact_key("standin", "report")].data
    assert "**FAILED**: 1 checks, 1 critical failures" in markdown
    assert "| balance.train.class_ratio | critical | 9.0 | 1.5 |" in markdown


# --- Reports --------------------------------------------------------------------------------


def test_reports_are_artifacts_with_stable_keys(prefect_api: str, reproduced: Path) -> None:
    first_run_id, _ = run_flow(project_dir=str(reproduced))
    second_run_id, _ = run_flow(project_dir=str(reproduced))
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
    assert (reproduced / "reports/standin/dvc_plots/index.html").is_file()

    rows = json.loads(second[table_key].data)
    assert len(rows) == 4  # two models x two classes
    assert {"model": "fine-tuned", "class": "dog", "precision": 0.7, "recall": 0.7,
            "f1": 0.7, "support": 10} in rows  # fmt: skip


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

    (standin / "metrics/standin/evaluate.json").write_text('{"head_only": {"accuracy": 0.5}}')
    flow_run_id, state = run_flow(project_dir=str(standin), stages=["prepare"])
    assert state.is_completed(), state
    markdown = read_artifacts(flow_run_id)[artifact_key("standin", "report")].data
    assert "| head-only | 0.5000 | ? |" in markdown


# --- Experiments, remotes, the command line ---------------------------------------------------


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
    prefect_api: str, reproduced: Path
) -> None:
    result = pipeline(
        project_dir=str(reproduced),
        overrides=["train_head.learning_rate=0.3"],
        experiment_name="lr-03",
    )
    assert result["metrics"]["head_only"]["accuracy"] == pytest.approx(0.8)
    # DVC re-ran only the stages the changed param reaches.
    assert stage_runs(reproduced) == ["train_head", "finetune", "evaluate"]
    found = experiments(reproduced)
    assert found["lr-03"]["params"]["train_head"]["learning_rate"] == 0.3
    assert found["lr-03"]["metrics"]["head_only"]["accuracy"] == pytest.approx(0.8)


def test_two_experiment_sweep_through_the_dvc_queue(reproduced: Path) -> None:
    for rate, name in ((0.2, "lr-02"), (0.4, "lr-04")):
        dvc(
            reproduced,
            "exp",
            "run",
            "--queue",
            "-S",
            f"train_head.learning_rate={rate}",
            "-n",
            name,
        )
    dvc(reproduced, "queue", "start", "--jobs", "1")
    try:
        wait_for(
            lambda: dvc(reproduced, "queue", "status"),
            lambda status: status.count("Success") == 2 or "Failed" in status,
            "both queued experiments",
        )
    finally:
        # The queue's workers are DVC's own background processes: DVC stops them.
        dvc(reproduced, "queue", "stop")
    found = experiments(reproduced)
    assert found["lr-02"]["params"]["train_head"]["learning_rate"] == 0.2
    assert found["lr-02"]["metrics"]["head_only"]["accuracy"] == pytest.approx(0.7)
    assert found["lr-04"]["metrics"]["head_only"]["accuracy"] == pytest.approx(0.9)


def test_a_fresh_clone_pulls_what_a_teammate_pushed_instead_of_rerunning(
    prefect_api: str, reproduced: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = tmp_path / "dvc-remote"
    monkeypatch.setenv("TLFLAX_DVC_REMOTE", str(remote))
    pushed = pipeline(project_dir=str(reproduced), push=True)
    assert any(path.is_file() for path in remote.rglob("*")), "dvc push sent nothing"

    # The clone has what git holds (dvc.lock, metrics, reports), none of the DVC outputs.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(reproduced), str(clone)], check=True)
    assert not (clone / "models/standin/finetune.json").exists()
    pulled = pipeline(project_dir=str(clone), pull=True)
    assert pulled["stages_run"] == [], "pulled outputs must make every stage up to date"
    assert stage_runs(clone) == []
    assert (clone / "models/standin/finetune.json").read_text() == (
        reproduced / "models/standin/finetune.json"
    ).read_text()
    assert pulled["metrics"] == pushed["metrics"]


def test_the_command_line_prints_the_summary(prefect_api: str, reproduced: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.flows", "--project-dir", str(reproduced)],
        env=dict(os.environ, PREFECT_API_URL=prefect_api),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "test set: 20 examples, trained on 60; head-only accuracy 0.6000 (macro-F1 0.5500); "
        "fine-tuned accuracy 0.7000 (macro-F1 0.6500)"
    ) in result.stdout + result.stderr


def test_the_command_line_exits_1_with_one_line_on_a_failed_stage(
    prefect_api: str,
    reproduced: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = ["--project-dir", str(reproduced), "--set", "validate.fail=true", "--name", "bad"]
    monkeypatch.setattr(sys, "argv", ["pipelines.flows", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert (
        "pipeline: `dvc exp run --set-param validate.fail=true --name bad dvc.yaml` failed (exit 255)"
        in capsys.readouterr().err
    )
