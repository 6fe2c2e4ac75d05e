"""Fine-tuning as several JAX processes (tlflax.distributed): the command and environment of
the Kubernetes Indexed Job (infra/k8s/multihost-job.yaml), run as 2 local CPU processes in
place of 2 pods, against the same stage run as one process with the same global batch (the
small project's own finetune run). The Kubernetes part itself is untested here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from tests.small_project import copy_project

STAGE = [sys.executable, "-m", "pipelines.stages.finetune"]
ROOT = Path(__file__).resolve().parent.parent


def _job_container() -> tuple[dict, int]:
    """The Job's container and its number of processes."""
    documents = yaml.safe_load_all((ROOT / "infra/k8s/multihost-job.yaml").read_text())
    job = next(document for document in documents if document["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    declared = {variable["name"]: variable for variable in container["env"]}
    processes = int(declared["JAX_NUM_PROCESSES"]["value"])
    assert processes == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert "JAX_COORDINATOR_ADDRESS" in declared and "JAX_PROCESS_ID" in declared
    return container, processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _environment(**variables: str) -> dict[str, str]:
    environment = dict(os.environ)
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment["PATH"]
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        environment.pop(name, None)
    environment.update(variables)
    return environment


def _run_job(project: Path) -> list[subprocess.CompletedProcess]:
    """The Job's command, one process per pod, meeting on this machine."""
    container, count = _job_container()
    # The image's `python` is its virtualenv's; here that is this interpreter.
    assert container["command"][0] == "python"
    command = [sys.executable, *container["command"][1:], *container.get("args", [])]
    address = f"localhost:{_free_port()}"  # pod 0's DNS name, on one machine
    started = [
        subprocess.Popen(
            command,
            cwd=project,
            env=_environment(
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES=str(count),
                JAX_PROCESS_ID=str(index),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(count)
    ]
    finished = []
    try:
        for process in started:
            stdout, stderr = process.communicate(timeout=600)
            finished.append(
                subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
            )
    finally:
        for process in started:  # one process failing leaves the other waiting for it
            process.kill()
            process.wait()
    return finished


def _epochs(project: Path) -> dict[str, list[float]]:
    """The dvclive history of the finetune run: metric -> value per epoch."""
    folder = project / "dvclive/vision/finetune/plots/metrics"
    history = {}
    for table in sorted(folder.glob("*.tsv")):
        rows = table.read_text().splitlines()[1:]
        history[table.stem] = [float(row.split("\t")[-1]) for row in rows]
    return history


def _weights(project: Path) -> dict[str, np.ndarray]:
    """The saved fine-tuned model's arrays by their path in the state."""
    restored = ocp.StandardCheckpointer().restore(
        (project / "models/vision/finetune/model").absolute()
    )
    leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.slow
def test_the_multihost_job_fine_tunes_as_one_process(small_project: Path, tmp_path: Path):
    project = copy_project(small_project, tmp_path / "project", with_history=False)
    for output in (
        "models/vision/finetune",
        "metrics/vision/finetune.json",
        "dvclive/vision/finetune",
    ):
        target = project / output
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    results = _run_job(project)

    for index, result in enumerate(results):
        assert result.returncode == 0, f"process {index}:\n{result.stderr[-3000:]}"
    # Both processes joined one run of 2 devices.
    assert "Rank 1 is connected to 1 peer" in results[1].stderr + results[1].stdout
    alone = json.loads((small_project / "metrics/vision/finetune.json").read_text())
    together = json.loads((project / "metrics/vision/finetune.json").read_text())
    assert together.keys() == alone.keys()
    for key, value in alone.items():
        assert together[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    alone_epochs, together_epochs = _epochs(small_project), _epochs(project)
    assert together_epochs.keys() == alone_epochs.keys() and alone_epochs["train_loss"]
    for metric, values in alone_epochs.items():
        np.testing.assert_allclose(together_epochs[metric], values, rtol=1e-5, atol=1e-6)
    # The saved model, written by process 0 alone, holds the same weights.
    alone_weights, together_weights = _weights(small_project), _weights(project)
    assert together_weights.keys() == alone_weights.keys()
    for name, value in alone_weights.items():
        np.testing.assert_allclose(
            together_weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name
        )
    # No checkpoint folder or temporary file of either process is left behind.
    leftovers = [
        path.name for path in (project / "models/vision").iterdir() if path.name.startswith(".")
    ]
    assert leftovers == []


def test_several_processes_without_a_coordinator_is_refused(small_project: Path, tmp_path: Path):
    project = copy_project(small_project, tmp_path / "project", with_history=False)
    result = subprocess.run(
        STAGE,
        cwd=project,
        env=_environment(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "JAX_COORDINATOR_ADDRESS" in message and "Traceback" not in result.stderr


def test_a_process_index_out_of_range_is_refused(small_project: Path, tmp_path: Path):
    project = copy_project(small_project, tmp_path / "project", with_history=False)
    result = subprocess.run(
        STAGE,
        cwd=project,
        env=_environment(
            JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2", JAX_COORDINATOR_ADDRESS="localhost:1"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "JAX_PROCESS_ID=2" in result.stderr and "Traceback" not in result.stderr
