"""What survives what: kill -9 inside a stage, a diverging loss, two pipelines at once.

Every fault is real: ``dvc repro`` runs the stage commands in a process group that the test
kills with SIGKILL once the run reaches a chosen point (a line of its output, or a temporary
output appearing on disk); the diverging loss comes from a huge learning rate in params.
After each fault the test checks what the README's "What survives what" table promises:

- DVC recorded nothing: dvc.lock is unchanged and the stage is reported stale;
- no output is half-written: each one is absent or complete, never a fragment;
- running the stage again finishes with the same metrics and, on CPU, the same parameters
  as the uninterrupted run (``small_project``, built once per session); fine-tuning resumes
  from its last finished epoch instead of starting over.

The tests share one copy of the project and leave it complete after each of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import _merge, run
from tests.small_project import copy_project, hash_outputs
from tlflax.models.weights import read_orbax

pytestmark = pytest.mark.slow

RESUME = Path(".cache/resume/models/vision/finetune")
# The outputs dvc.yaml declares for finetune (DVC deletes them before it runs the stage).
# What finetune writes when training is over; its dvclive log is written as epochs end.
FINETUNE_OUTPUTS = ("models/vision/finetune", "metrics/vision/finetune.json")


def dvc(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *arguments]


def force(stage: str) -> list[str]:
    # --force: the stage is up to date (the project is built); --single-item: only this one.
    return dvc("repro", "--force", "--single-item", stage)


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment["PATH"]
    # Stage output reaches the pipe line by line, so a kill point is seen when it happens.
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _wait_until_gone(group: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"process group {group} still runs after SIGKILL")


def kill_when(
    project: Path,
    command: list[str],
    *,
    line: str | None = None,
    path_glob: str | None = None,
    attempts: int = 3,
) -> str:
    """Run ``command`` in its own process group and SIGKILL the whole group as soon as its
    output shows ``line`` or a path matching ``path_glob`` exists in ``project``.

    A kill point only a fraction of a second long can be missed when the machine is busy;
    the (forced, repeatable) command then finishes, and it is run again, up to ``attempts``
    times. Returns the output of the killed run.
    """
    for _ in range(attempts):
        process = subprocess.Popen(
            command,
            cwd=project,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines: list[str] = []
        # list.extend appends each line as it arrives: the loop below sees them live.
        reader = threading.Thread(target=lines.extend, args=(process.stdout,), daemon=True)
        reader.start()
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            reached = (line is not None and any(line in seen for seen in list(lines))) or (
                path_glob is not None and next(project.glob(path_glob), None) is not None
            )
            if reached:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait()
        reader.join(timeout=30)
        _wait_until_gone(process.pid)
        output = "".join(lines)
        if process.returncode == -signal.SIGKILL:
            return output
        assert process.returncode == 0, output[-3000:]
    pytest.fail(f"{command} always finished before the kill point ({line or path_glob})")


def stage_is_recorded(project: Path, stage: str) -> bool:
    """Whether ``dvc status`` finds the stage up to date (DVC in this process: no start-up)."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo(str(project)) as repository:
        return not repository.status(targets=[stage])


def rerun(project: Path, stage: str) -> tuple[str, float]:
    started = time.monotonic()
    result = run(force(stage), cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, time.monotonic() - started


def leftovers(project: Path) -> list[Path]:
    """Temporary outputs of killed writers still on disk."""
    return [
        path
        for root in ("data/vision", "models/vision", "metrics/vision", "dvclive/vision")
        for path in (project / root).rglob(".*")
        if ".tmp-" in path.name or ".old-" in path.name or "orbax-checkpoint-tmp" in path.name
    ]


def assert_same_arrays(path: Path, reference: Path) -> None:
    actual, expected = read_orbax(path), read_orbax(reference)
    assert actual.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(actual[name], array, err_msg=name)


def but_live_log(hashes: dict[str, str], stage: str) -> dict[str, str]:
    """Output hashes without ``stage``'s dvclive log (rewritten as its epochs end)."""
    live = f"dvclive/vision/{stage}/"
    return {path: digest for path, digest in hashes.items() if not path.startswith(live)}


def assert_live_log_is_a_whole_prefix(project: Path, reference: Path, stage: str) -> None:
    """A killed run's dvclive log, where one was written yet, holds whole epochs: the first
    rows of the finished run's, never a torn one."""
    live = Path("dvclive/vision") / stage
    for tsv in sorted((reference / live / "plots/metrics").glob("*.tsv")):
        written = project / live / "plots/metrics" / tsv.name
        if not written.exists():
            continue
        rows = [row.split("\t")[1:] for row in written.read_text().splitlines()]
        expected = [row.split("\t")[1:] for row in tsv.read_text().splitlines()]
        assert rows == expected[: len(rows)], tsv.name


def assert_same_live_log(project: Path, reference: Path, stage: str) -> None:
    """The dvclive log holds the same epochs with the same values (only timestamps differ)."""
    live = Path("dvclive/vision") / stage
    assert (project / live / "metrics.json").read_text() == (
        reference / live / "metrics.json"
    ).read_text()
    for tsv in sorted((reference / live / "plots/metrics").glob("*.tsv")):
        values = [
            row.split("\t")[1:]
            for row in (project / live / "plots/metrics" / tsv.name).read_text().splitlines()
        ]
        expected = [row.split("\t")[1:] for row in tsv.read_text().splitlines()]
        assert values == expected, tsv.name


def assert_nothing_recorded(project: Path, lock: bytes, stage: str) -> None:
    assert (project / "dvc.lock").read_bytes() == lock
    assert not stage_is_recorded(project, stage)


@pytest.fixture(scope="module")
def project(small_project: Path, tmp_path_factory) -> Path:
    """A copy of the built project, with its git and DVC state, that the faults run in."""
    return copy_project(small_project, tmp_path_factory.mktemp("faults") / "project")


# ------------------------------------------------------------------------------- kill -9


def test_extract_killed_midway_leaves_no_features_and_a_rerun_writes_the_same_bytes(
    project: Path, small_project: Path
) -> None:
    lock = (project / "dvc.lock").read_bytes()
    kill_when(project, force("extract"), line="extract: train:")
    assert_nothing_recorded(project, lock, "extract")
    # DVC deleted the old features before the run; the new ones were never renamed in.
    assert not (project / "data/vision/features").exists()
    assert leftovers(project), "the killed writer's temporary folder should be there"

    rerun(project, "extract")
    for split in ("train", "validation", "test"):
        relative = f"data/vision/features/{split}.npz"
        assert (project / relative).read_bytes() == (small_project / relative).read_bytes()
    # Equal bytes: DVC records the same hashes, so nothing downstream becomes stale.
    assert (project / "dvc.lock").read_bytes() == lock
    assert stage_is_recorded(project, "train_head")
    assert not leftovers(project)


def test_train_head_killed_while_writing_leaves_whole_outputs_only(
    project: Path, small_project: Path
) -> None:
    lock = (project / "dvc.lock").read_bytes()
    # Killed while the head is being written (its dvclive log, written as epochs end, is
    # whole by then): the head is absent, never a part of one.
    kill_when(project, force("train_head"), path_glob="models/vision/.head.tmp-*")
    assert_nothing_recorded(project, lock, "train_head")
    head = project / "models/vision/head"
    assert not head.exists()
    assert not (project / "metrics/vision/train_head.json").exists()
    assert_same_live_log(project, small_project, "train_head")

    rerun(project, "train_head")
    relative = "metrics/vision/train_head.json"
    assert (project / relative).read_text() == (small_project / relative).read_text()
    assert_same_arrays(head, small_project / "models/vision/head")
    assert_same_live_log(project, small_project, "train_head")
    assert not leftovers(project)


@pytest.mark.parametrize(
    ("kill_point", "resumed_after"),
    [
        ({"line": "finetune: epoch 0:"}, None),  # epoch 0's checkpoint may still be saving
        ({"line": "finetune: epoch 1:"}, "epoch 0"),
        ({"path_glob": "models/vision/.finetune.tmp-*"}, "epoch 2"),  # writing the outputs
    ],
    ids=["after_epoch_0", "after_epoch_1", "writing_the_outputs"],
)
def test_finetune_killed_resumes_and_ends_with_the_same_parameters(
    project: Path, small_project: Path, kill_point: dict, resumed_after: str | None
) -> None:
    lock = (project / "dvc.lock").read_bytes()
    kill_when(project, force("finetune"), **kill_point)
    assert_nothing_recorded(project, lock, "finetune")
    for output in FINETUNE_OUTPUTS:
        assert not (project / output).exists(), output
    assert_live_log_is_a_whole_prefix(project, small_project, "finetune")
    # The checkpoints of the finished epochs live outside the outputs DVC deletes.
    assert (project / RESUME).is_dir()

    output, _ = rerun(project, "finetune")
    if resumed_after:
        assert f"resuming after {resumed_after}" in output, output
    for relative in ("metrics/vision/finetune.json",):
        assert (project / relative).read_text() == (small_project / relative).read_text()
    assert_same_arrays(
        project / "models/vision/finetune/model", small_project / "models/vision/finetune/model"
    )
    assert_same_live_log(project, small_project, "finetune")
    assert not (project / RESUME).exists()
    assert not leftovers(project)


def test_checkpoints_of_another_run_are_never_resumed(tmp_path: Path) -> None:
    """The resume fingerprint sees every starting value, dropout RNG keys included, and a
    different fingerprint discards the checkpoints instead of continuing them."""
    import jax
    from flax import nnx

    from tlflax.checkpoint import TrainingCheckpoints, tree_digest

    class Model(nnx.Module):
        def __init__(self, seed: int) -> None:
            self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(seed))
            self.weight = nnx.Param(jax.numpy.ones(3))

    digest = tree_digest(nnx.state(Model(0)))
    assert digest == tree_digest(nnx.state(Model(0)))
    assert digest != tree_digest(nnx.state(Model(1)))  # only the RNG key differs
    changed = Model(0)
    changed.weight[...] = changed.weight[...].at[2].set(1.5)
    assert digest != tree_digest(nnx.state(changed))

    state = {"weights": {"w": np.ones(2, np.float32)}}
    first = TrainingCheckpoints(tmp_path, keep_best=1, fingerprint="run-a")
    first.save(0, state, {"epoch": 1}, {"validation_loss": 1.0})
    first.close()
    same = TrainingCheckpoints(tmp_path, keep_best=1, fingerprint="run-a")
    assert (same.discarded, same.latest_step()) == (False, 0)
    same.close()
    other = TrainingCheckpoints(tmp_path, keep_best=1, fingerprint="run-b")
    assert (other.discarded, other.latest_step()) == (True, None)
    other.close()


# ------------------------------------------------------------------------- NaN and Inf


def _with_params(project: Path, **sections: dict) -> Path:
    """A params file beside params.yaml with ``sections`` merged in."""
    path = project / "diverging.yaml"
    path.write_text(
        yaml.safe_dump(_merge(yaml.safe_load((project / "params.yaml").read_text()), sections))
    )
    return path


def test_diverging_head_training_stops_naming_the_step_and_keeps_outputs(project: Path) -> None:
    params = _with_params(project, train_head={"learning_rate": 1e30})
    before = hash_outputs(project)
    result = run(
        [sys.executable, "-m", "pipelines.stages.train_head", "--params", str(params)],
        cwd=project,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # Which loss shows it first depends on the numbers; either message names epoch and step.
    assert re.search(
        r"^train_head: error: (training loss became (nan|inf) at epoch \d+, step \d+|"
        r"validation loss became (nan|inf) after epoch \d+ \(step \d+ of training\))",
        result.stderr,
        flags=re.MULTILINE,
    ), result.stderr
    # Every output as it was, but the dvclive log: written as epochs end, it holds the epochs
    # that finished before the loss diverged (where it diverged is what it shows).
    assert but_live_log(hash_outputs(project), "train_head") == but_live_log(before, "train_head")


def test_diverging_finetuning_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    project: Path,
) -> None:
    # One step per epoch and a warmup of one step: epoch 0 trains at learning rate 0 and is
    # checkpointed; epoch 1's single step at 1e30 blows the weights up.
    params = _with_params(
        project,
        finetune={"learning_rate": 1e30, "batch_size": 60, "warmup_fraction": 0.34},
    )
    # finetune reads its settings only from the plan: resolve one from the diverging params,
    # and put the project's own plan back afterwards (the tests share one built project).
    plan_file = project / "metrics/vision/plan.json"
    good_plan = plan_file.read_bytes()
    before = hash_outputs(project)
    try:
        planned = run(
            [sys.executable, "-m", "pipelines.stages.plan", "--params", str(params)],
            cwd=project,
            timeout=300,
        )
        assert planned.returncode == 0, planned.stderr[-3000:]
        assert json.loads(plan_file.read_text())["finetune"]["learning_rate"] == 1e30
        result = run(
            [sys.executable, "-m", "pipelines.stages.finetune", "--params", str(params)],
            cwd=project,
            timeout=300,
        )
    finally:
        plan_file.write_bytes(good_plan)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("finetune:")]
    # Which epoch first shows it depends on the numbers; the message names it and its step.
    diverged = re.search(
        r"validation loss became (nan|inf) after epoch (\d+) \(step (\d+) of training\)", message
    )
    assert diverged, message
    epoch, step = int(diverged.group(2)), int(diverged.group(3))
    assert epoch >= 1 and step == epoch + 1  # one step per epoch
    resume = (project / RESUME).absolute()
    assert f"the last good checkpoint, epoch {epoch - 1}, is kept in {resume}" in message
    weights = read_orbax(resume / str(epoch - 1) / "trainable")
    assert all(np.isfinite(array).all() for array in weights.values())
    # Nothing of the diverged epoch was saved.
    assert not (resume / str(epoch)).exists()
    # The outputs of the last good run are untouched, but the log of the epochs that ran.
    assert but_live_log(hash_outputs(project), "finetune") == but_live_log(before, "finetune")
    params.unlink()


# -------------------------------------------------------------------- two pipelines at once


def test_second_pipeline_on_one_repository_is_refused_while_copies_run_side_by_side(
    project: Path, small_project: Path, tmp_path: Path
) -> None:
    beside = copy_project(small_project, tmp_path / "beside")
    runs = {
        name: subprocess.Popen(
            force("finetune"),
            cwd=where,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, where in (("first", project), ("beside", beside))
    }
    outputs = {name: [] for name in runs}
    readers = [
        threading.Thread(target=outputs[name].extend, args=(runs[name].stdout,), daemon=True)
        for name in runs
    ]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 300
        # From here to its end, the first pipeline holds DVC's locks on the stage's files.
        while not any("Running stage 'finetune'" in line for line in list(outputs["first"])):
            assert runs["first"].poll() is None and time.monotonic() < deadline, outputs
            time.sleep(0.05)
        second = run(dvc("repro"), cwd=project, timeout=120)
        assert runs["first"].poll() is None, "the first pipeline should still be running"
    finally:
        for process in runs.values():
            process.wait(timeout=600)
        for reader in readers:
            reader.join(timeout=30)
    # DVC refuses: the repository lock ("Unable to acquire lock"), or, while the first runs
    # a stage's command, the per-file lock on a path both need.
    refusal = second.stdout + second.stderr
    assert second.returncode != 0, refusal
    assert re.search(r"Unable to acquire lock|is busy, it is being blocked by", refusal), refusal
    for name, process in runs.items():
        assert process.returncode == 0, "".join(outputs[name])[-3000:]
    # Same seed, two processes in two copies: identical metrics and parameters on CPU.
    for copy in (project, beside):
        relative = "metrics/vision/finetune.json"
        assert (copy / relative).read_text() == (small_project / relative).read_text()
        assert_same_arrays(
            copy / "models/vision/finetune/model",
            small_project / "models/vision/finetune/model",
        )


def test_after_every_fault_the_test_metrics_equal_the_uninterrupted_run(
    project: Path, small_project: Path
) -> None:
    result = run([sys.executable, "-m", "pipelines.stages.evaluate"], cwd=project, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    relative = "metrics/vision/evaluate.json"
    metrics = json.loads((project / relative).read_text())
    assert metrics == json.loads((small_project / relative).read_text())
    assert metrics["n_test"] == 10000


def test_the_live_log_is_rewritten_at_most_every_interval_and_always_at_the_end(tmp_path):
    from pipelines.stages.common import LiveLog

    def logged_steps(live_dir):
        tsv = live_dir / "plots/metrics/validation_accuracy.tsv"
        return len(tsv.read_text().splitlines()) - 1 if tsv.exists() else 0

    epochs = [{"validation_accuracy": 0.5 + i / 100} for i in range(4)]
    every_time = LiveLog(tmp_path / "every", interval_seconds=0.0)
    for count in range(1, 5):
        every_time.update(epochs[:count])
        assert logged_steps(tmp_path / "every") == count  # readable while training runs
    throttled = LiveLog(tmp_path / "throttled", interval_seconds=3600.0)
    for count in range(1, 5):
        throttled.update(epochs[:count])
    assert logged_steps(tmp_path / "throttled") == 1  # the first write only
    throttled.update(epochs, final=True)
    assert logged_steps(tmp_path / "throttled") == 4
